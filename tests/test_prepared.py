"""billing_core/prepared.py: ledger statements run straight on SQLite's connection write and read exactly what
SQLAlchemy's own path writes and reads, stay visible to statement listeners, and raise SQLAlchemy's errors."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.exc import IntegrityError

from billing_core import db, ledger
from billing_core.models import Consumption, LedgerEntry
from billing_core.prepared import Prepared

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)  # microsecond 0: SQLite still stores ".000000"


def spend_twice(engine, *, with_listener: bool) -> list[str]:
    seen: list[str] = []

    def record(conn, cursor, statement, *args):
        seen.append(statement.split()[0] + " " + statement.split()[2 if statement.startswith("INSERT") else 1])

    if with_listener:
        event.listen(engine, "before_cursor_execute", record)
    try:
        for user in ("lean", "listened"):
            with db.write_session(engine) as session:
                ledger.grant_pack(session, user_id=f"{user}-{with_listener}", credits=10,
                                  source_key=f"p:{user}{with_listener}", now=T0)
            with db.write_session(engine) as session:
                ledger.consume(session, user_id=f"{user}-{with_listener}", credits=3, reference="r1", now=T0,
                               token_name="default")
    finally:
        if with_listener:
            event.remove(engine, "before_cursor_execute", record)
    return seen


def test_the_lean_path_stores_what_sqlalchemy_stores(engine):
    assert spend_twice(engine, with_listener=False) == []
    spend_twice(engine, with_listener=True)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT user_id, created_at, balance_after FROM consumption ORDER BY user_id")).all()
        stored = {user: (str(created)[:10], after) for user, created, after in rows}
    assert stored["lean-False"][1] == stored["listened-True"][1] == 7
    with db.read_session(engine) as session:
        for user in ("lean-False", "listened-True"):
            assert ledger.balance(session, user) == 7
            assert ledger.account_summary(session, user).as_dict()["spendable_balance"] == 7
            spend = session.execute(select(Consumption).where(Consumption.user_id == user)).scalar_one()
            assert spend.created_at == T0 and spend.token_name == "default"
            kinds = session.execute(select(LedgerEntry.kind).where(LedgerEntry.user_id == user)).scalars().all()
            assert sorted(kinds) == ["pack_grant", "spend"]


def test_listeners_still_see_every_statement_of_a_spend(engine):
    seen = spend_twice(engine, with_listener=True)
    spend = seen[seen.index("INSERT consumption") - 5:seen.index("INSERT consumption") + 1]
    assert [s.split()[0] for s in spend[1:]] == ["SELECT", "INSERT", "UPDATE", "UPDATE", "INSERT"]


def test_driver_errors_are_sqlalchemy_errors(engine):
    if not db.is_sqlite(engine):
        pytest.skip("the lean path is SQLite's")
    insert = Prepared(Consumption.__table__.insert())
    values = {"user_id": "nobody", "reference": "r", "credits": 1, "balance_after": 0, "spendable_after": 0,
              "created_at": T0, "token_name": None}
    with pytest.raises(IntegrityError):  # no such account: the foreign key refuses it
        with engine.begin() as conn:
            insert.run(conn, values)


def test_returning_rows_scalars_and_new_ids_match_sqlalchemys_path(engine):
    """An upsert's RETURNING row, an insert's new id and a row count come out the same lean or not."""
    from billing_core.handlers.common import ensure_account_state

    seen: list[str] = []

    def record(conn, cursor, statement, *args):
        seen.append(statement)

    for listened in (False, True):
        if listened:
            event.listen(engine, "before_cursor_execute", record)
        try:
            user = f"returning-{listened}"
            with db.write_session(engine) as session:
                first = ensure_account_state(session, user_id=user, email="a@example.com",
                                             stripe_customer_id=f"cus_{listened}")
                again = ensure_account_state(session, user_id=user, email="b@example.com")
                assert (first.user_id, first.balance, first.debt, bool(first.created)) == (user, 0, 0, True)
                assert (again.user_id, bool(again.created), again.flagged) == (user, False, False)
                entry = ledger.grant_pack(session, user_id=user, credits=5, source_key=f"k:{user}", now=T0)
                assert entry is not None and entry.id > 0
                assert ledger.grant_pack(session, user_id=user, credits=5, source_key=f"k:{user}", now=T0) is None
                lot_ids = session.execute(text("SELECT id FROM credit_lot WHERE user_id = :u"), {"u": user}).scalars()
                assert len(list(lot_ids)) == 1
        finally:
            if listened:
                event.remove(engine, "before_cursor_execute", record)
    assert any(statement.startswith("INSERT INTO account") for statement in seen)
    with db.read_session(engine) as session:
        for listened in (False, True):
            summary = ledger.account_summary(session, f"returning-{listened}")
            assert (summary.balance, summary.email, summary.stripe_customer_id) == (5, "a@example.com",
                                                                                   f"cus_{listened}")


def test_an_in_over_a_fixed_list_runs_lean(engine):
    """SQLAlchemy renders `status IN (...)` only as it executes; the lean path binds the values one by one."""
    from sqlalchemy import bindparam, update

    from billing_core.models import StripeEvent

    table = StripeEvent.__table__
    mark = Prepared(update(table).where(table.c.id == bindparam("event_id"), table.c.status.in_(("received", "failed")))
                    .values(status="processed"))
    with engine.begin() as conn:
        for event_id, status in (("evt_in_received", "received"), ("evt_in_ignored", "ignored")):
            conn.execute(table.insert().values(id=event_id, type="x.y", livemode=False, created=1, payload="{}",
                                               received_at=T0, status=status, attempts=0, source="webhook"))
        assert mark.run(conn, {"event_id": "evt_in_received"}) == 1
        assert mark.run(conn, {"event_id": "evt_in_ignored"}) == 0
        statuses = dict(conn.execute(select(table.c.id, table.c.status).where(table.c.id.like("evt_in_%"))).all())
    assert statuses == {"evt_in_received": "processed", "evt_in_ignored": "ignored"}


def test_a_missing_parameter_is_refused_and_python_side_defaults_are_applied(engine):
    """Lean or not, a parameter left out is never bound as NULL, and a column left out of an INSERT gets the
    model's Python-side default (SQLAlchemy's path computes it; the lean path hands such a form to it)."""
    from sqlalchemy import bindparam, update
    from sqlalchemy.exc import InvalidRequestError, StatementError

    from billing_core.models import Account, Dispute

    accounts = Account.__table__
    rename = Prepared(update(accounts).where(accounts.c.user_id == bindparam("who")).values(email=bindparam("email")))
    with db.write_session(engine) as session:
        ledger.grant_pack(session, user_id="defaults", credits=1, source_key="k:defaults", now=T0)
    with pytest.raises((InvalidRequestError, StatementError), match="'email'"):
        with engine.begin() as conn:
            rename.run(conn, {"who": "defaults"})
    dispute = Prepared(Dispute.__table__.insert())
    with engine.begin() as conn:  # amount_cents left out: the column's default, as SQLAlchemy sets it
        dispute.run(conn, {"id": "dp_defaults", "user_id": "defaults", "charge_id": "ch_d", "status": "open",
                           "created_at": T0})
        row = conn.execute(select(Dispute.__table__).where(Dispute.__table__.c.id == "dp_defaults")).one()
    assert row.amount_cents == 0 and row.status == "open"
