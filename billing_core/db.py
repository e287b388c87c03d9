"""The one engine factory, session scopes and migrations.

SQLite: WAL, busy_timeout and foreign keys on; write transactions start with BEGIN IMMEDIATE so
concurrent writers queue for the lock instead of failing with "database is locked"; read
transactions start DEFERRED so the dashboard never waits for a writer.
PostgreSQL: psycopg 3; writers lock the account row (SELECT ... FOR UPDATE).
"""
from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import event, inspect
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import QueuePool
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, create_engine

from .settings import Settings, get_settings

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
_SQLITE_BEGIN = {mode: f"BEGIN {mode}" for mode in ("IMMEDIATE", "DEFERRED", "EXCLUSIVE")}


class SchemaOutOfDate(RuntimeError):
    pass


class PoolExhausted(sa_exc.TimeoutError):
    """Every connection of this process's pool is in use and none came free within DB_POOL_TIMEOUT.

    A subclass of SQLAlchemy's pool TimeoutError, so code that already handles that keeps working."""


class FastFailQueuePool(QueuePool):
    """A QueuePool whose timeout names the pool's limits and the settings that set them."""

    def _do_get(self):
        try:
            return super()._do_get()
        except PoolExhausted:
            raise
        except sa_exc.TimeoutError:
            raise PoolExhausted(
                f"all {self.size() + self._max_overflow} database connections of this process are in use "
                f"(DB_POOL_SIZE {self.size()} + DB_MAX_OVERFLOW {self._max_overflow}) and none came free "
                f"within {self._timeout:g} s (DB_POOL_TIMEOUT)") from None


def pool_status(engine: Engine) -> dict | None:
    """How much of the engine's pool is in use right now; None for a pool without a fixed size."""
    pool = engine.pool
    if not isinstance(pool, QueuePool):
        return None
    limit = pool.size() + pool._max_overflow
    return {"in_use": pool.checkedout(), "idle": pool.checkedin(), "limit": limit,
            "size": pool.size(), "max_overflow": pool._max_overflow}


def normalize_url(url: str) -> str:
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str, settings: Settings | None = None) -> Engine:
    """PostgreSQL: a pool of DB_POOL_SIZE connections (+ DB_MAX_OVERFLOW in bursts) per process; a caller that
    finds them all busy for DB_POOL_TIMEOUT seconds gets PoolExhausted instead of waiting SQLAlchemy's 30 s."""
    settings = settings or get_settings()
    url = normalize_url(url)
    if url.startswith("sqlite"):
        return _sqlite_engine(url, settings)
    return create_engine(url, poolclass=FastFailQueuePool, pool_pre_ping=True, pool_size=settings.db_pool_size,
                         max_overflow=settings.db_max_overflow, pool_timeout=settings.db_pool_timeout,
                         pool_recycle=1800)


def _sqlite_engine(url: str, settings: Settings) -> Engine:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    # A local file: connections are cheap and count against no server's limit, so the pool stays large.
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
                           poolclass=FastFailQueuePool, pool_size=20, max_overflow=40,
                           pool_timeout=max(settings.db_pool_timeout, 1.0))

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        if conn._echo or conn.dispatch.before_cursor_execute:  # seen by statement counters and echo
            conn.exec_driver_sql(f"BEGIN {mode}")
            return
        try:  # straight to the driver: SQLAlchemy's execution path cost more than the BEGIN itself
            conn.connection.dbapi_connection.execute(_SQLITE_BEGIN[mode])
        except sqlite3.Error as error:
            raise sa_exc.DBAPIError.instance(_SQLITE_BEGIN[mode], (), error, sqlite3.Error) from error

    return engine


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def get_engine(url: str | None = None) -> Engine:
    """One engine per database URL per process."""
    url = url or get_settings().database_url
    with _engines_lock:
        if url not in _engines:
            _engines[url] = make_engine(url)
        return _engines[url]


def dispose_engines() -> None:
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


_sqlite_write_locks: dict[str, threading.RLock] = {}


def _sqlite_write_lock(engine: Engine) -> threading.RLock:
    with _engines_lock:
        return _sqlite_write_locks.setdefault(str(engine.url), threading.RLock())


@contextmanager
def _writer_turn(engine: Engine) -> Iterator[None]:
    # SQLite admits one writer at a time. Threads of this process queue here and get the lock the moment
    # it is free, instead of polling SQLite's busy handler, which sleeps up to 100 ms between tries (p99 of
    # seconds under 16 concurrent writers; see docs/BENCHMARKS.md). Other processes still meet busy_timeout;
    # after that long without the lock, go on and let SQLite's busy handling decide, as before.
    lock = _sqlite_write_lock(engine) if is_sqlite(engine) else None
    acquired = lock.acquire(timeout=SQLITE_BUSY_TIMEOUT_MS / 1000) if lock is not None else False
    try:
        yield
    finally:
        if acquired:
            lock.release()


def loaded_copy(session, model, key):
    """The ORM object of that row this session holds, or None (at no cost when it holds none)."""
    if not session.identity_map:
        return None
    return session.identity_map.get(session.identity_key(model, key))


def write_lock_timed_out(exc: BaseException) -> bool:
    """SQLite's write lock stayed with another connection past the busy timeout."""
    return isinstance(exc, sa_exc.OperationalError) and "database is locked" in str(exc.orig)


@contextmanager
def write_session(engine: Engine | None = None) -> Iterator[Session]:
    """One unit of work that writes: commits on success, rolls back on any error."""
    engine = engine or get_engine()
    with _writer_turn(engine):
        with Session(engine, expire_on_commit=False) as session:
            with session.begin():
                yield session


@contextmanager
def write_connection(engine: Engine) -> Iterator[Connection]:
    """A write transaction on a Core connection, without an ORM session (the credits API's spends): commits on
    success, rolls back on any error; on SQLite it queues for the write lock as write_session does."""
    with _writer_turn(engine):
        with engine.begin() as connection:
            yield connection


_deferred_engines: dict[int, tuple[Engine, Engine]] = {}


def _deferred(engine: Engine) -> Engine:
    """The engine's read-only twin (BEGIN DEFERRED), made once: execution_options() builds a new engine
    object each call, which cost more than the short reads it wraps."""
    found = _deferred_engines.get(id(engine))
    if found is None or found[0] is not engine:
        found = (engine, engine.execution_options(sqlite_begin="DEFERRED"))
        _deferred_engines[id(engine)] = found
    return found[1]


@contextmanager
def read_session(engine: Engine | None = None) -> Iterator[Session]:
    """A read-only unit of work; never takes SQLite's write lock."""
    engine = engine or get_engine()
    if is_sqlite(engine):
        engine = _deferred(engine)
    with Session(engine, expire_on_commit=False) as session:
        with session.begin():
            yield session


@contextmanager
def read_connection(engine: Engine) -> Iterator[Connection]:
    """A read-only Core connection for one or two quick statements (no ORM session); never takes SQLite's
    write lock."""
    with (_deferred(engine) if is_sqlite(engine) else engine).connect() as connection:
        yield connection


def for_update(statement, session: Session):
    """Row lock on PostgreSQL; SQLite's BEGIN IMMEDIATE already holds the database write lock."""
    if session.get_bind().dialect.name == "postgresql":
        return statement.with_for_update()
    return statement


# --- migrations ---------------------------------------------------------------------------

def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def head_revision(url: str) -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def migrate(url: str | None = None) -> str:
    """Bring the database to the latest schema; returns the head revision."""
    from alembic import command

    url = url or get_settings().database_url
    engine = get_engine(url)
    cfg = alembic_config(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return head_revision(url)


def ensure_schema_current(url: str | None = None) -> None:
    """Refuse to run on a database whose schema is not the latest."""
    url = url or get_settings().database_url
    engine = get_engine(url)
    current = current_revision(engine)
    head = head_revision(url)
    if current != head:
        where = "empty" if current is None else f"at revision {current}"
        raise SchemaOutOfDate(
            f"the database schema is out of date ({where}, latest is {head}); "
            "run `python -m billing_core init-db` (or `make migrate`) first")


def table_names(engine: Engine) -> list[str]:
    return inspect(engine).get_table_names()


def session_factory(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, class_=Session, expire_on_commit=False)
