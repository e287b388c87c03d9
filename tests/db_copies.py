"""A copy of a migrated SQLite template configured as DATABASE_URL for one test."""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

from billing_core import db
from billing_core.settings import reset_settings_cache


@contextmanager
def configured_sqlite_copy(template: Path, path: Path, monkeypatch):
    shutil.copy(template, path)
    url = f"sqlite:///{path}"
    monkeypatch.setenv("DATABASE_URL", url)
    reset_settings_cache()
    try:
        yield url
    finally:
        engine = db._engines.pop(url, None)
        if engine is not None:
            engine.dispose()
