"""A dump of the whole database, to check that something changed nothing: SQLite's `iterdump()` (schema and
every row), PostgreSQL's every row of every table of the test's schema, in a stable order."""
from __future__ import annotations

from sqlalchemy import text

from billing_core import db


def database_dump(url: str) -> list[str]:
    engine = db.get_engine(url)
    if db.is_sqlite(engine):
        raw = engine.raw_connection()
        try:
            return list(raw.driver_connection.iterdump())
        finally:
            raw.close()
    with engine.connect() as conn:
        tables = [r[0] for r in conn.execute(text(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY tablename"))]
        lines = []
        for table in tables:
            rows = conn.execute(text(f'SELECT * FROM "{table}"')).all()
            lines += sorted(f"{table}: {tuple(row)!r}" for row in rows)
        return lines
