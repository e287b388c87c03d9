"""`check-config --database`: connect, and compare what this deployment may open with what the server allows.

Every process keeps its own pool: a sidecar with N workers is N pools, each up to DB_POOL_SIZE +
DB_MAX_OVERFLOW connections, and so is each dashboard process. PostgreSQL refuses connections past
max_connections minus the slots reserved for superusers, and a refused connection is a 500 to Stripe
and a 503 to the DevOps Agent. CLI runs, `init-db`, backups and psql sessions need a few more.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from . import db
from .settings import Problem, Settings, mask_url_password

HEADROOM = 5  # connections left for CLI runs, init-db, pg_dump and an operator's psql


@dataclass(frozen=True)
class ServerLimits:
    version: str
    max_connections: int
    reserved: int  # superuser_reserved_connections (+ reserved_connections on PostgreSQL 16 and later)
    open_now: int

    @property
    def available(self) -> int:
        return self.max_connections - self.reserved


@dataclass(frozen=True)
class Budget:
    processes: int  # sidecar processes (on every host) running with this configuration
    workers: int  # WEBHOOK_WORKERS (or --workers) per sidecar process
    dashboards: int  # Streamlit dashboard processes
    per_pool: int  # DB_POOL_SIZE + DB_MAX_OVERFLOW
    pool_size: int
    max_overflow: int

    @classmethod
    def from_settings(cls, settings: Settings, *, processes: int, dashboards: int) -> "Budget":
        return cls(processes=processes, workers=settings.webhook_workers, dashboards=dashboards,
                   per_pool=settings.connections_per_process, pool_size=settings.db_pool_size,
                   max_overflow=settings.db_max_overflow)

    @property
    def total(self) -> int:
        return (self.processes * self.workers + self.dashboards) * self.per_pool

    def explain(self) -> str:
        return (f"{self.processes} sidecar process(es) × {self.workers} worker(s) + {self.dashboards} dashboard(s), "
                f"each pool up to {self.per_pool} (DB_POOL_SIZE {self.pool_size} + DB_MAX_OVERFLOW "
                f"{self.max_overflow}) = {self.total} connections at most")


def budget_problems(budget: Budget, limits: ServerLimits) -> list[Problem]:
    server = (f"the server allows {limits.available} (max_connections {limits.max_connections} − "
              f"{limits.reserved} reserved for superusers)")
    if budget.total > limits.available:
        return [Problem("warning", "DB_POOL_SIZE",
                        f"{budget.explain()}, but {server}: under load connections will be refused (500s to "
                        "Stripe, 503s from the credits API); lower DB_POOL_SIZE / DB_MAX_OVERFLOW or the "
                        "workers, or raise max_connections")]
    if budget.total > limits.available - HEADROOM:
        return [Problem("warning", "DB_POOL_SIZE",
                        f"{budget.explain()}, and {server}: that leaves {limits.available - budget.total}, fewer "
                        f"than {HEADROOM} for CLI runs, init-db and backups")]
    return []


def read_server_limits(connection) -> ServerLimits:
    rows = dict(connection.execute(text(
        "SELECT name, setting FROM pg_settings WHERE name IN "
        "('max_connections', 'superuser_reserved_connections', 'reserved_connections')")).all())
    open_now = connection.execute(text(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")).scalar_one()
    version = connection.execute(text("SHOW server_version")).scalar_one()
    reserved = int(rows.get("superuser_reserved_connections", 0)) + int(rows.get("reserved_connections", 0))
    return ServerLimits(version=str(version).split()[0], max_connections=int(rows["max_connections"]),
                        reserved=reserved, open_now=int(open_now))


def check_database(settings: Settings, *, processes: int, dashboards: int) -> tuple[list[str], list[Problem]]:
    """(what was found, problems): the connection, the schema, and on PostgreSQL the connection budget."""
    url = settings.database_url
    shown_url = mask_url_password(url)
    sqlite_file = make_url(db.normalize_url(url)).database if url.startswith("sqlite") else None
    if sqlite_file and sqlite_file != ":memory:" and not Path(sqlite_file).is_file():  # connecting would create it
        return [], [Problem("warning", "DATABASE_URL", f"{shown_url}: no such database file yet; "
                                                       "`python -m billing_core init-db` creates it")]
    engine = create_engine(db.normalize_url(url), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            limits = read_server_limits(connection) if engine.dialect.name == "postgresql" else None
        current = db.current_revision(engine)
    except Exception as exc:
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())[:300]
        return [], [Problem("error", "DATABASE_URL", f"could not connect to {shown_url}: {type(exc).__name__}: "
                                                     f"{mask_url_password(reason)}")]
    finally:
        engine.dispose()
    found, problems = [], []
    head = db.head_revision(url)
    if current != head:
        where = "empty" if current is None else f"at revision {current}"
        problems.append(Problem("warning", "DATABASE_URL", f"schema {where}, latest is {head}: run "
                                "`python -m billing_core init-db` before starting the new processes"))
    if limits is None:
        found.append(f"database: SQLite at {shown_url} (one sidecar process, one worker; no connection budget)")
        return found, problems
    budget = Budget.from_settings(settings, processes=processes, dashboards=dashboards)
    found.append(f"database: PostgreSQL {limits.version}, max_connections {limits.max_connections}, "
                 f"{limits.reserved} reserved, {limits.open_now} open now")
    found.append(f"connection budget: {budget.explain()}; the server allows {limits.available}")
    return found, problems + budget_problems(budget, limits)
