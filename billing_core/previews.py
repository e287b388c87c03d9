"""Dry runs: what an event would change, computed by running the real handler and rolling it back.

`preview_event` (replay --dry-run, the Preview buttons) and the refund preview (billing_core.refunds) both
run the same handler the webhook runs, inside a write transaction that is never committed:

1. the handler runs in a SAVEPOINT; the ledger entries it adds are those with an id above the largest before
   (exact: on PostgreSQL the transaction reads one REPEATABLE READ snapshot, on SQLite it holds the write
   lock); the accounts it touched are the event's user and those of the new entries;
2. the touched accounts' state (balance, tier, flag, their payments and subscriptions) is read, then the
   SAVEPOINT is rolled back and the same state is read again: the "before" and "after" of the diff;
3. the whole transaction is rolled back, so nothing of the run stays (tests compare a dump of the database).

Nothing here talks to Stripe except the handler's own `prefetch` (a read), before the transaction opens.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from . import db, handlers, ledger
from .catalog import UnknownItem, UnknownPrice
from .events import UnknownEvent
from .handlers import EventContext, NeedsAttention
from .models import LedgerEntry, Payment, StripeEvent, Subscription
from .settings import Settings

PAYMENT_FIELDS = ("status", "amount_cents", "currency", "amount_refunded", "amount_disputed_lost", "credits_granted",
                  "user_id")
SUBSCRIPTION_FIELDS = ("tier", "status", "current_period_end", "cancel_at_period_end", "user_id")
MAX_REASON_CHARS = 1000


@dataclass
class AccountChange:
    """One account's state before and after the previewed event, and the ledger entries it would add."""
    user_id: str
    balance_before: int
    balance_after: int
    spendable_before: int
    spendable_after: int
    tier_before: str
    tier_after: str
    flagged_before: bool
    flagged_after: bool
    flag_reason_after: str | None
    entries: list[dict] = field(default_factory=list)

    @property
    def credits_taken_back(self) -> int:
        """Credits a refund or lost dispute would claw back (positive)."""
        return -sum(e["credits"] for e in self.entries if e["kind"] == "clawback")

    def as_dict(self) -> dict:
        return {"user_id": self.user_id, "balance_before": self.balance_before, "balance_after": self.balance_after,
                "spendable_before": self.spendable_before, "spendable_after": self.spendable_after,
                "tier_before": self.tier_before, "tier_after": self.tier_after,
                "flagged_before": self.flagged_before, "flagged_after": self.flagged_after,
                "flag_reason_after": self.flag_reason_after, "entries": self.entries}


@dataclass
class FieldChange:
    """A payment's or subscription's field the event would change (`before` None: the row is new)."""
    table: str
    row_id: str
    field: str
    before: object
    after: object

    def as_dict(self) -> dict:
        return {"table": self.table, "id": self.row_id, "field": self.field, "before": self.before,
                "after": self.after}


@dataclass
class Preview:
    event_id: str
    event_type: str
    status_before: str | None
    status_after: str
    reason_after: str | None
    accounts: list[AccountChange]
    changes: list[FieldChange]

    @property
    def changes_anything(self) -> bool:
        return bool(self.changes) or any(a.entries or a.tier_before != a.tier_after
                                         or a.flagged_before != a.flagged_after for a in self.accounts)

    def as_dict(self) -> dict:
        return {"event_id": self.event_id, "type": self.event_type, "status_before": self.status_before,
                "status_after": self.status_after, "reason_after": self.reason_after, "dry_run": True,
                "accounts": [a.as_dict() for a in self.accounts],
                "changes": [c.as_dict() for c in self.changes]}


class _RollBack(Exception):
    """Raised at the end of a preview so write_session rolls the transaction back."""

    def __init__(self, result):
        super().__init__("preview rolled back")
        self.result = result


SERIALIZATION_RETRIES = 3


def rolled_back(engine: Engine, work: Callable[[Session], object]):
    """`work(session)` inside a write transaction that is always rolled back; returns what it returned.
    On PostgreSQL the transaction sees one snapshot, so rows other transactions commit meanwhile don't show;
    a row lock meeting a newer version of the row (a concurrent write) starts the preview again."""
    for attempt in range(SERIALIZATION_RETRIES):
        try:
            with db.write_session(engine) as session:
                if not db.is_sqlite(engine):
                    session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
                raise _RollBack(work(session))
        except _RollBack as done:
            return done.result
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) != "40001" or attempt == SERIALIZATION_RETRIES - 1:
                raise


# --- reading what a handler changed -----------------------------------------------------------
# The ledger and the handlers write with ORM objects and Core statements alike, so changes are found in the
# tables themselves: entries by id, payments and subscriptions by the accounts the event touched.

_ENTRIES = LedgerEntry.__table__


def _last_entry_id(session: Session) -> int:
    return int(session.execute(select(func.coalesce(func.max(_ENTRIES.c.id), 0))).scalar_one())


def _entries_after(session: Session, last_id: int) -> list[dict]:
    rows = session.execute(select(_ENTRIES).where(_ENTRIES.c.id > last_id).order_by(_ENTRIES.c.id)).mappings()
    return [{"user_id": r["user_id"], "credits": r["credits"], "kind": r["kind"], "lot": r["lot_key"],
             "source_key": r["source_key"], "reason": r["reason"],
             "expires_at": r["expires_at"].isoformat() if r["expires_at"] else None} for r in rows]


def _account_state(session: Session, user_id: str) -> dict:
    summary = ledger.account_summary(session, user_id)
    return {"balance": summary.balance, "spendable": summary.spendable_balance, "tier": summary.tier,
            "flagged": summary.flagged, "flag_reason": summary.flag_reason}


def _rows_of(session: Session, model, users: list[str], fields: tuple[str, ...]) -> dict:
    """{row id: {field: value}} of the users' payments or subscriptions."""
    if not users:
        return {}
    table = model.__table__
    rows = session.execute(select(table.c.id, *(table.c[name] for name in fields))
                           .where(table.c.user_id.in_(users))).mappings()
    return {str(row["id"]): {name: row[name] for name in fields} for row in rows}


def _field_changes(table: str, before: dict, after: dict) -> list[FieldChange]:
    changes = []
    for row_id, fields in after.items():
        old = before.get(row_id, {})
        changes += [FieldChange(table, row_id, name, old.get(name), value)
                    for name, value in fields.items() if old.get(name) != value]
    return changes


def _run_handler(session: Session, ctx: EventContext) -> tuple[str, str | None, str | None]:
    """The status the event would get, as events.py decides it (its effects stay in the savepoint)."""
    try:
        with session.begin_nested():
            handled = handlers.handle(session, ctx)
    except NeedsAttention as exc:
        return "needs_attention", handlers.printable(exc.reason, MAX_REASON_CHARS), None
    except (ledger.LedgerError, UnknownPrice, UnknownItem) as exc:
        return "needs_attention", handlers.printable(f"{type(exc).__name__}: {exc}", MAX_REASON_CHARS), None
    if handled.ignored:
        return "ignored", handled.note, handled.user_id
    return "processed", None, handled.user_id


def diff_in_session(session: Session, ctx: EventContext, *, status_before: str | None = None) -> Preview:
    """Run `ctx`'s handler in a savepoint of `session`, read the state it leaves, roll the savepoint back and
    read the state again. The caller rolls back the enclosing transaction."""
    last_entry = _last_entry_id(session)
    savepoint = session.begin_nested()
    try:
        status, reason, user_id = _run_handler(session, ctx)
        session.flush()
        added = _entries_after(session, last_entry)
        users = sorted({u for u in ({user_id} | {e["user_id"] for e in added}) if u})
        entries = {u: [{k: v for k, v in e.items() if k != "user_id"} for e in added if e["user_id"] == u]
                   for u in users}
        after = {u: _account_state(session, u) for u in users}
        payments_after = _rows_of(session, Payment, users, PAYMENT_FIELDS)
        subscriptions_after = _rows_of(session, Subscription, users, SUBSCRIPTION_FIELDS)
    finally:
        savepoint.rollback()
    session.expire_all()  # objects the handler loaded hold its (rolled back) values
    before = {u: _account_state(session, u) for u in users}  # a missing account reads as empty
    changes = (_field_changes("payment", _rows_of(session, Payment, users, PAYMENT_FIELDS), payments_after)
               + _field_changes("subscription", _rows_of(session, Subscription, users, SUBSCRIPTION_FIELDS),
                                subscriptions_after))
    accounts = [_account_change(u, before[u], after[u], entries[u]) for u in users]
    return Preview(event_id=ctx.id, event_type=ctx.type, status_before=status_before, status_after=status,
                   reason_after=reason, accounts=accounts, changes=changes)


def _account_change(user_id: str, before: dict, after: dict, entries: list[dict]) -> AccountChange:
    return AccountChange(user_id=user_id, balance_before=before["balance"], balance_after=after["balance"],
                         spendable_before=before["spendable"], spendable_after=after["spendable"],
                         tier_before=before["tier"], tier_after=after["tier"], flagged_before=before["flagged"],
                         flagged_after=after["flagged"], flag_reason_after=after["flag_reason"], entries=entries)


# --- previews of stored events ----------------------------------------------------------------

def preview_event(event_id: str, *, engine: Engine, settings: Settings,
                  assigned_user_id: str | None = None) -> Preview:
    """What `reprocess(event_id, assigned_user_id=...)` would change, without changing anything."""
    if assigned_user_id is not None:
        assigned_user_id = ledger.check_user_id(assigned_user_id)
    with db.read_session(engine) as session:
        row = session.get(StripeEvent, event_id)
        if row is None:
            raise UnknownEvent(f"no stored event {event_id}")
        event, status_before = json.loads(row.payload), row.status
        assigned_user_id = assigned_user_id or row.assigned_user_id
    facts = handlers.prefetch(event, settings=settings, read_session=lambda: db.read_session(engine))
    ctx = EventContext(event=event, settings=settings, assigned_user_id=assigned_user_id, source="replay",
                       facts=facts)
    return preview_context(ctx, engine=engine, status_before=status_before)


def preview_context(ctx: EventContext, *, engine: Engine, status_before: str | None = None) -> Preview:
    return rolled_back(engine, lambda session: diff_in_session(session, ctx, status_before=status_before))


def describe(preview: Preview) -> list[str]:
    """The preview as lines of text (the CLI's output and the page's caption)."""
    lines = [f"{preview.event_id} ({preview.event_type}): {preview.status_before or 'new'} -> {preview.status_after}"
             + (f": {preview.reason_after}" if preview.reason_after else "") + " [dry run, nothing changed]"]
    for account in preview.accounts:
        tier = (f", tier {account.tier_before} -> {account.tier_after}" if account.tier_before != account.tier_after
                else f", tier {account.tier_after}")
        flag = (f", flagged -> {account.flagged_after}" if account.flagged_before != account.flagged_after else "")
        lines.append(f"  {account.user_id}: balance {account.balance_before} -> {account.balance_after}{tier}{flag}")
        lines += [f"    {e['credits']:+d} {e['kind']}" + (f" ({e['reason']})" if e["reason"] else "")
                  for e in account.entries]
    rows: dict[tuple[str, str], list[FieldChange]] = {}
    for change in preview.changes:
        rows.setdefault((change.table, change.row_id), []).append(change)
    for (table, row_id), changes in rows.items():
        if all(c.before is None for c in changes):
            lines.append(f"  {table} {row_id} (new): " + ", ".join(f"{c.field} {c.after!r}" for c in changes))
        else:
            lines.append(f"  {table} {row_id}: " + ", ".join(f"{c.field} {c.before!r} -> {c.after!r}"
                                                           for c in changes))
    if not preview.changes_anything:
        lines.append("  no changes")
    return lines
