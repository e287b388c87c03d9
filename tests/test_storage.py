"""Engine factory, migrations and the catalog."""
import threading

import pytest
from sqlalchemy import text

from billing_core import catalog, db
from billing_core.settings import load_settings


def test_sqlite_engine_uses_wal_busy_timeout_and_foreign_keys(sqlite_url):
    with db.get_engine(sqlite_url).connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == db.SQLITE_BUSY_TIMEOUT_MS
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_foreign_keys_are_enforced(database_url):
    with pytest.raises(Exception, match="(?i)foreign key"):
        with db.write_session() as s:
            s.execute(text("INSERT INTO subscription (id, user_id, tier, status, cancel_at_period_end, state_at, "
                           "created_at, updated_at) VALUES ('sub_x', 'nobody', 'none', 'active', false, 0, "
                           "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))


def test_sqlite_writers_queue_instead_of_failing(sqlite_url):
    """A write transaction held open makes the next writer wait (BEGIN IMMEDIATE), not fail."""
    engine = db.get_engine(sqlite_url)
    holding = threading.Event()
    release = threading.Event()
    order = []

    def first():
        with db.write_session(engine) as s:
            s.execute(text("INSERT INTO account (user_id, flagged, open_disputes, created_at, updated_at) "
                           "VALUES ('a', false, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
            holding.set()
            release.wait(10)
            order.append("first")

    def second():
        holding.wait(10)
        with db.write_session(engine) as s:
            count = s.execute(text("SELECT count(*) FROM account")).scalar()
            order.append(f"second saw {count}")

    t1, t2 = threading.Thread(target=first), threading.Thread(target=second)
    t1.start(), t2.start()
    holding.wait(10)
    release.set()
    t1.join(20), t2.join(20)
    assert order == ["first", "second saw 1"]


def test_readers_do_not_wait_for_a_writer_on_sqlite(sqlite_url):
    engine = db.get_engine(sqlite_url)
    with db.write_session(engine) as w:
        w.execute(text("INSERT INTO account (user_id, flagged, open_disputes, created_at, updated_at) "
                       "VALUES ('a', false, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
        result = []
        reader = threading.Thread(target=lambda: result.append(_count_accounts(engine)))
        reader.start()
        reader.join(5)
        assert result == [0]  # the writer's row is not committed yet, and the reader did not block


def _count_accounts(engine):
    with db.read_session(engine) as r:
        return r.execute(text("SELECT count(*) FROM account")).scalar()


def test_migrate_brings_an_empty_database_to_head_and_is_repeatable(tmp_path):
    url = f"sqlite:///{tmp_path}/fresh.db"
    with pytest.raises(db.SchemaOutOfDate, match="init-db"):
        db.ensure_schema_current(url)
    assert db.migrate(url) == db.head_revision(url)
    db.migrate(url)
    db.ensure_schema_current(url)
    assert {"account", "ledger_entry", "payment", "stripe_event", "checkout_link", "operator"} <= set(
        db.table_names(db.get_engine(url)))


def test_out_of_date_schema_is_refused_with_the_command_to_run(tmp_path):
    from alembic import command

    url = f"sqlite:///{tmp_path}/old.db"
    db.migrate(url)
    cfg = db.alembic_config(url)
    with db.get_engine(url).begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    with pytest.raises(db.SchemaOutOfDate, match=r"python -m billing_core init-db"):
        db.ensure_schema_current(url)


def test_models_and_migrations_agree(tmp_path):
    """A model change without a migration would be caught here."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlmodel import SQLModel

    url = f"sqlite:///{tmp_path}/check.db"
    db.migrate(url)
    with db.get_engine(url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == []


def test_postgres_url_uses_psycopg3():
    assert db.normalize_url("postgresql://u@h/d") == "postgresql+psycopg://u@h/d"
    assert db.normalize_url("postgres://u@h/d") == "postgresql+psycopg://u@h/d"


# --- catalog ------------------------------------------------------------------------------

def test_catalog_matches_the_price_list():
    expected = {"starter": (999, 100, "plan"), "professional": (2999, 500, "plan"), "business": (9999, 2000, "plan"),
                "pack_100": (1000, 100, "pack"), "pack_250": (2000, 250, "pack"), "pack_500": (3500, 500, "pack"),
                "pack_1000": (6000, 1000, "pack")}
    assert {k: (i.amount_cents, i.credits, i.kind) for k, i in catalog.CATALOG.items()} == expected
    assert all(i.currency == "usd" for i in catalog.CATALOG.values())


def test_catalog_lookup_works_both_ways():
    settings = load_settings({"BILLING_ENV_FILE": "/nonexistent", "STRIPE_PRICE_PACK_250": "price_pk250"})
    assert catalog.price_id_for("pack_250", settings) == "price_pk250"
    assert catalog.item_for_price("price_pk250", settings).key == "pack_250"
    with pytest.raises(catalog.UnknownPrice, match="price_nope"):
        catalog.item_for_price("price_nope", settings)
    with pytest.raises(catalog.UnknownPrice, match="STRIPE_PRICE_STARTER"):
        catalog.price_id_for("starter", settings)
    with pytest.raises(catalog.UnknownItem, match="pack_7"):
        catalog.get_item("pack_7")
    assert catalog.allowance("business") == 2000 and catalog.allowance("none") == 0
