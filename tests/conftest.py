"""Shared fixtures.

`database_url` runs a test on SQLite and, when TEST_DATABASE_URL is set, on PostgreSQL. Each test
session gets its own PostgreSQL schema (so parallel runs don't collide); tables are emptied
between tests. Every test starts with a clean environment: no config/.env, no Stripe settings.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy import create_engine, text

from billing_core import db
from db_copies import configured_sqlite_copy
from billing_core.settings import KNOWN_NAMES, reset_settings_cache

pytest_plugins = ["stripe_fixtures"]  # Stripe double fixtures: fake_stripe, stripe_server, stripe_prices
PG_URL = os.environ.get("TEST_DATABASE_URL", "")
PG_SCHEMA = f"test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
BACKENDS = ["sqlite"] + (["postgresql"] if PG_URL else [])


def _pg_url_for_schema(base: str, schema: str) -> str:
    base = db.normalize_url(base)
    joiner = "&" if "?" in base else "?"
    return f"{base}{joiner}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    for name in KNOWN_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BILLING_ENV_FILE", str(tmp_path / "no-such.env"))
    reset_settings_cache()
    yield
    reset_settings_cache()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    url = f"sqlite:///{path}"
    db.migrate(url)
    db.get_engine(url).dispose()
    return path


@pytest.fixture(scope="session")
def pg_schema_url():
    if not PG_URL:
        pytest.skip("TEST_DATABASE_URL is not set")
    admin = create_engine(db.normalize_url(PG_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{PG_SCHEMA}"'))
    url = _pg_url_for_schema(PG_URL, PG_SCHEMA)
    db.migrate(url)
    yield url
    db.dispose_engines()
    with admin.connect() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{PG_SCHEMA}" CASCADE'))
    admin.dispose()


def _empty_pg_tables(url: str) -> None:
    engine = db.get_engine(url)
    with engine.begin() as conn:
        names = [r[0] for r in conn.execute(text(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename <> 'alembic_version'"))]
        if names:
            conn.execute(text("TRUNCATE " + ", ".join(f'"{n}"' for n in names) + " RESTART IDENTITY CASCADE"))


@pytest.fixture(params=BACKENDS)
def database_url(request, tmp_path, monkeypatch, sqlite_template) -> str:
    if request.param == "sqlite":
        with configured_sqlite_copy(sqlite_template, tmp_path / "billing.db", monkeypatch) as url:
            yield url
        return
    url = request.getfixturevalue("pg_schema_url")
    _empty_pg_tables(url)
    monkeypatch.setenv("DATABASE_URL", url)
    reset_settings_cache()
    yield url


@pytest.fixture
def sqlite_url(tmp_path, monkeypatch, sqlite_template) -> str:
    """SQLite only, for tests that don't need to run on both databases."""
    with configured_sqlite_copy(sqlite_template, tmp_path / "billing.db", monkeypatch) as url:
        yield url


@pytest.fixture
def engine(database_url):
    return db.get_engine(database_url)
