"""What an entry point hands the domain code: the settings, read once, and the engine for their database."""
from __future__ import annotations

from billing_core import db
from billing_core.settings import get_settings


def wiring() -> dict:
    settings = get_settings()
    return {"settings": settings, "engine": db.get_engine(settings.database_url)}
