"""The credit ledger: append-only entries grouped in lots, with each lot and each account's totals kept
as rows beside them.

Every grant opens a lot whose key is the grant's own source key; spends, expiries, clawbacks and
dispute holds are entries drawing on a lot (`lot_key`). Debt (a clawback beyond what a payment's lots
still hold) is an entry with no lot, settled by the next grant. `ledger_entry` is the append-only record
of truth; `credit_lot` (granted, remaining, held, closed) and the account's `balance` and `debt` are kept
in the same transaction as the entries that change them, so no operation reads the account's history:
they touch the account row, its open lots (partial index) and rows found by a unique key.

A lot is closed when an `expire` entry closes it (cancellation, the next period's grant), when its
`expires_at` has passed (closed on the account's next write; reads leave it out meanwhile), or when it
is a pack or adjustment lot with nothing left and nothing held (nothing can ever be added to it again).
Nothing is ever added to a closed lot, so its remaining credits simply stop counting.

Every function here runs inside the caller's write transaction and first locks the account, so
concurrent writers on one account queue up: SQLite by BEGIN IMMEDIATE, PostgreSQL by SELECT ... FOR
UPDATE on the account row. `python -m billing_core check-ledger` verifies the lots and totals against
the entries.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
import uuid
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from types import SimpleNamespace

from sqlalchemy import and_, bindparam, case, false, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session

from .catalog import allowance
from .db import for_update, loaded_copy
from .prepared import Prepared, literal_in
from .models import (DISPUTE_KINDS_SQL, Account, Consumption, CreditLot, LedgerEntry, Payment, Subscription,
                     from_epoch, utcnow)

GRANT_KINDS = ("subscription_grant", "upgrade_topup", "pack_grant", "adjustment")
SUBSCRIPTION_GRANT_KINDS = ("subscription_grant", "upgrade_topup")
FROZEN_STATUSES = ("past_due", "unpaid")
LIVE_STATUSES = ("active", "trialing", "past_due", "unpaid")
MAX_CREDITS = 1_000_000_000
MAX_REFERENCE_LENGTH = 200
MAX_REASON_LENGTH = 500
MAX_OPERATOR_LENGTH = 200
INVISIBLE_CATEGORIES = {"Cc", "Cf", "Zl", "Zp"}


class LedgerError(ValueError):
    """A refused ledger operation; the message says why in plain words."""


class InsufficientCredits(LedgerError):
    pass


class UnknownAccount(InsufficientCredits):
    pass


class AccountFlagged(LedgerError):
    pass


class ReferenceConflict(LedgerError):
    pass


class WouldGoNegative(LedgerError):
    pass


@dataclass
class Lot:
    """A credit_lot row as one write (or read) sees it; writes change it in memory and in the table."""
    id: int
    key: str
    source: str
    granted: int
    remaining: int
    held: int
    expires_at: datetime | None
    subscription_id: str | None
    period_end: int | None
    payment_id: int | None
    created_at: datetime
    closed: bool
    frozen: bool = False  # a subscription lot whose subscription is past due or unpaid

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def open_at(self, now: datetime) -> bool:
        return not self.closed and not self.expired(now)


@dataclass
class ConsumeResult:
    user_id: str
    credits: int
    reference: str
    balance: int
    spendable_balance: int
    replayed: bool = False

    def as_dict(self) -> dict:
        return {"user_id": self.user_id, "credits": self.credits, "reference": self.reference,
                "balance": self.balance, "spendable_balance": self.spendable_balance}


@dataclass
class AccountSummary:
    user_id: str
    exists: bool
    balance: int
    spendable_balance: int
    tier: str
    subscription_status: str | None
    subscription_id: str | None
    current_period_end: int | None
    cancel_at_period_end: bool
    flagged: bool
    flag_reason: str | None
    email: str | None
    stripe_customer_id: str | None
    breakdown: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "user_id": self.user_id, "balance": self.balance, "spendable_balance": self.spendable_balance,
            "tier": self.tier, "subscription_status": self.subscription_status,
            "subscription_id": self.subscription_id,
            "current_period_end": self.current_period_end, "cancel_at_period_end": self.cancel_at_period_end,
            "flagged": self.flagged, "flag_reason": self.flag_reason, "email": self.email,
            "stripe_customer_id": self.stripe_customer_id, "breakdown": self.breakdown,
        }


# --- input checks -------------------------------------------------------------------------

def _has_invisible_characters(text: str, *, allow_newlines: bool = False) -> bool:
    """Control, format (zero-width, bidi) and line/paragraph separator characters."""
    return any(unicodedata.category(c) in INVISIBLE_CATEGORIES and not (allow_newlines and c == "\n") for c in text)


def check_text(value, *, what: str, max_length: int, allow_newlines: bool = False) -> str:
    """A person's or a caller's text (reason, operator, reference): non-empty, bounded, printable."""
    text = value.strip() if isinstance(value, str) else ""
    if not text:
        raise LedgerError(f"{what} is required")
    if len(text) > max_length:
        raise LedgerError(f"{what} is longer than {max_length} characters")
    if _has_invisible_characters(text, allow_newlines=allow_newlines):
        raise LedgerError(f"{what} contains control or invisible characters")
    return text


def check_user_id(user_id) -> str:
    if not isinstance(user_id, str) or not user_id.strip():
        raise LedgerError("user id must be a non-empty string")
    user_id = user_id.strip()
    if len(user_id) > 200:
        raise LedgerError("user id is longer than 200 characters")
    if _has_invisible_characters(user_id):
        raise LedgerError("user id contains control or invisible characters")
    return user_id


def check_credits(credits, *, allow_negative: bool) -> int:
    if isinstance(credits, bool) or not isinstance(credits, int):
        raise LedgerError(f"credits must be a whole number, not {credits!r}")
    if credits == 0:
        raise LedgerError("credits must not be zero")
    if credits < 0 and not allow_negative:
        raise LedgerError("credits must be positive")
    if abs(credits) > MAX_CREDITS:
        raise LedgerError(f"credits must be at most {MAX_CREDITS:,} in size")
    return credits


def parse_credits(text: str, *, allow_negative: bool) -> int:
    """A credits amount typed by a person: a whole number, e.g. '250' or '-40'."""
    raw = str(text).strip().replace("_", "")
    if not re.fullmatch(r"[+-]?[0-9]+", raw):
        raise LedgerError(f"credits must be a whole number, not {text!r}")
    return check_credits(int(raw), allow_negative=allow_negative)


# --- accounts -----------------------------------------------------------------------------

def _insert_ignore(session: Session, values: dict) -> None:
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    session.execute(insert(Account).values(**values).on_conflict_do_nothing(index_elements=["user_id"]))


def _select_locked(session: Session, user_id: str) -> Account | None:
    """The account row as the database has it now (not a stale copy from the session), locked."""
    stmt = for_update(select(Account).where(Account.user_id == user_id), session)
    return session.exec(stmt.execution_options(populate_existing=True)).scalars().first()


def lock_account(session: Session, *, user_id: str, create: bool = True, email: str | None = None,
                 stripe_customer_id: str | None = None) -> Account | None:
    """The account row, locked for this transaction; created first when missing and `create`."""
    user_id = check_user_id(user_id)
    account = _select_locked(session, user_id)
    if account is None and create:  # only a new account pays for the insert (most calls find it)
        now = utcnow()
        _insert_ignore(session, {"user_id": user_id, "email": email, "flagged": False, "open_disputes": 0,
                                 "created_at": now, "updated_at": now})
        account = _select_locked(session, user_id)
    if account is None:
        return None
    changed = False
    if email and not account.email:
        account.email = email.strip()
        changed = True
    if stripe_customer_id and account.stripe_customer_id != stripe_customer_id:
        owner = session.exec(select(Account.user_id).where(Account.stripe_customer_id == stripe_customer_id)).first()
        if owner is None and not account.stripe_customer_id:
            account.stripe_customer_id = stripe_customer_id
            changed = True
    if changed:
        account.updated_at = utcnow()
        session.add(account)
        session.flush()
    return account


def current_subscription(session: Session, user_id: str) -> Subscription | None:
    """The live subscription when there is one, else the most recent."""
    live_first = case((Subscription.status.in_(LIVE_STATUSES), 0), else_=1)
    stmt = (select(Subscription).where(Subscription.user_id == user_id)
            .order_by(live_first, Subscription.current_period_end.desc().nulls_last(), Subscription.updated_at.desc())
            .limit(1))
    return session.exec(stmt).scalars().first()


# --- tables and statements built once ---------------------------------------------------------

LOT = CreditLot.__table__
ENTRY = LedgerEntry.__table__
ACCOUNT = Account.__table__
CONSUMPTION = Consumption.__table__
SUBSCRIPTION = Subscription.__table__
OPEN = LOT.c.closed == false()  # rendered as a literal, so both databases use the partial index on open lots

_LOT_COLUMNS = (LOT.c.id, LOT.c.lot_key, LOT.c.source, LOT.c.granted, LOT.c.remaining, LOT.c.held, LOT.c.expires_at,
                LOT.c.subscription_id, LOT.c.period_end, LOT.c.payment_id, LOT.c.created_at, LOT.c.closed)
_FROZEN = and_(LOT.c.source == "subscription", literal_in(SUBSCRIPTION.c.status, FROZEN_STATUSES))
_OPEN_LOTS = (select(*_LOT_COLUMNS, case((_FROZEN, True), else_=False))
              .select_from(LOT.outerjoin(SUBSCRIPTION, and_(SUBSCRIPTION.c.id == LOT.c.subscription_id,
                                                            SUBSCRIPTION.c.user_id == LOT.c.user_id)))
              .where(LOT.c.user_id == bindparam("user_id"), OPEN))
_LOTS_OF_PAYMENT = select(*_LOT_COLUMNS).where(LOT.c.payment_id == bindparam("payment_id"),
                                               LOT.c.user_id == bindparam("user_id"))
_ACCOUNT_STATE = select(ACCOUNT.c.user_id, ACCOUNT.c.flagged, ACCOUNT.c.flag_reason, ACCOUNT.c.open_disputes,
                        ACCOUNT.c.balance, ACCOUNT.c.debt).where(ACCOUNT.c.user_id == bindparam("user_id"))
_ACCOUNT_STATE_LOCKED = _ACCOUNT_STATE.with_for_update()
_DONE_SPEND = select(CONSUMPTION.c.credits, CONSUMPTION.c.balance_after, CONSUMPTION.c.spendable_after).where(
    CONSUMPTION.c.user_id == bindparam("user_id"), CONSUMPTION.c.reference == bindparam("reference"))
# On SQLite (BEGIN IMMEDIATE: one writer at a time) a spend locks the account and finds an earlier spend with the
# same reference in one statement. Not on PostgreSQL: after waiting for the row lock, FOR UPDATE re-reads the
# account row but not the joined spend, so a concurrent retry of the same spend would go unseen.
_SPEND_STATE = (select(*_ACCOUNT_STATE.selected_columns, CONSUMPTION.c.credits.label("done_credits"),
                       CONSUMPTION.c.balance_after.label("done_balance"),
                       CONSUMPTION.c.spendable_after.label("done_spendable"))
                .select_from(ACCOUNT.outerjoin(CONSUMPTION, and_(CONSUMPTION.c.user_id == ACCOUNT.c.user_id,
                                                                 CONSUMPTION.c.reference == bindparam("reference"))))
                .where(ACCOUNT.c.user_id == bindparam("user_id")))
_UPDATE_LOT = (update(LOT).where(LOT.c.id == bindparam("lot_id"))
               .values(remaining=bindparam("remaining"), held=bindparam("held"), closed=bindparam("closed"),
                       closed_at=bindparam("closed_at")))
_UPDATE_TOTALS = (update(ACCOUNT).where(ACCOUNT.c.user_id == bindparam("account_id"))
                  .values(balance=bindparam("balance"), debt=bindparam("debt")))
_UPDATE_TOTALS_AND_FLAG = (update(ACCOUNT).where(ACCOUNT.c.user_id == bindparam("account_id"))
                           .values(balance=bindparam("balance"), debt=bindparam("debt"),
                                   flagged=bindparam("flagged"), flag_reason=bindparam("flag_reason"),
                                   updated_at=bindparam("updated_at")))
_INSERT_ENTRY = ENTRY.insert()
_INSERT_LOT = LOT.insert()
_INSERT_CONSUMPTION = CONSUMPTION.insert()
_ENTRY_DEFAULTS = {column.name: None for column in ENTRY.columns if column.name != "id"}
# the statements of every ledger write, run lean on SQLite (billing_core/prepared.py)
_P_OPEN_LOTS, _P_SPEND_STATE = Prepared(_OPEN_LOTS), Prepared(_SPEND_STATE)
_P_ACCOUNT_STATE, _P_ACCOUNT_STATE_LOCKED = Prepared(_ACCOUNT_STATE), Prepared(_ACCOUNT_STATE_LOCKED)
_P_UPDATE_LOT, _P_UPDATE_TOTALS, _P_UPDATE_TOTALS_AND_FLAG = map(Prepared, (_UPDATE_LOT, _UPDATE_TOTALS,
                                                                          _UPDATE_TOTALS_AND_FLAG))
_P_INSERT_ENTRY, _P_INSERT_CONSUMPTION = Prepared(_INSERT_ENTRY), Prepared(_INSERT_CONSUMPTION)
_P_INSERT_LOT = Prepared(_INSERT_LOT)


def _lot_from_row(row) -> Lot:
    return Lot(id=row[0], key=row[1], source=row[2], granted=row[3], remaining=row[4], held=row[5],
               expires_at=row[6], subscription_id=row[7], period_end=row[8], payment_id=row[9],
               created_at=row[10], closed=bool(row[11]), frozen=bool(row[12]) if len(row) > 12 else False)


def _spend_order(lot: Lot):
    return (lot.expires_at is None, lot.expires_at or lot.created_at, lot.created_at, lot.key)


def _flag_for(open_disputes: int, balance_now: int) -> tuple[bool, str | None]:
    reasons = []
    if open_disputes > 0:
        reasons.append("open dispute")
    if balance_now < 0:
        reasons.append("negative balance")
    return bool(reasons), ", ".join(reasons) or None


# --- reading ------------------------------------------------------------------------------

def open_lots(session: Session, user_id: str, *, now: datetime | None = None) -> list[Lot]:
    """The lots that count now, soonest expiry first (packs and adjustments last), each marked frozen or not."""
    now = now or utcnow()
    rows = session.connection().execute(_OPEN_LOTS, {"user_id": user_id}).all()
    return sorted((lot for lot in map(_lot_from_row, rows) if not lot.expired(now)), key=_spend_order)


def _debt(session: Session, user_id: str) -> int | None:
    return session.connection().execute(select(ACCOUNT.c.debt).where(ACCOUNT.c.user_id == user_id)).scalar()


def _spendable(lots: list[Lot], debt: int) -> int:
    return max(0, sum(lot.remaining for lot in lots if lot.remaining > 0 and not lot.frozen) + debt)


def balance(session: Session, user_id: str, *, now: datetime | None = None) -> int:
    """Credits held now: the open lots whose expiry time hasn't passed, plus debt (negative)."""
    now = now or utcnow()
    lots_now = (select(func.coalesce(func.sum(LOT.c.remaining), 0))
                .where(LOT.c.user_id == ACCOUNT.c.user_id, OPEN,
                       or_(LOT.c.expires_at.is_(None), LOT.c.expires_at > now))
                .scalar_subquery())
    found = session.connection().execute(select(ACCOUNT.c.debt + lots_now).where(ACCOUNT.c.user_id == user_id)).scalar()
    return int(found or 0)


def spendable_balance(session: Session, user_id: str, *, now: datetime | None = None,
                      flagged: bool | None = None) -> int:
    """What the DevOps Agent may spend now: open lots not frozen, less debt; 0 while the account is flagged."""
    now = now or utcnow()
    row = session.connection().execute(_ACCOUNT_STATE, {"user_id": user_id}).first()
    if row is None:
        return 0
    if flagged is None:
        flagged = bool(row.flagged)
    if flagged:
        return 0
    return _spendable(open_lots(session, user_id, now=now), int(row.debt))


def _breakdown(lots: list[Lot], debt: int) -> list[dict]:
    rows = [{"source": lot.source, "credits": lot.remaining, "granted": lot.granted,
             "expires_at": lot.expires_at.isoformat() if lot.expires_at else None,
             "subscription_id": lot.subscription_id, "frozen": lot.frozen, "lot": lot.key}
            for lot in lots if lot.remaining != 0]
    if debt:
        rows.append({"source": "debt", "credits": debt, "granted": 0, "expires_at": None,
                     "subscription_id": None, "frozen": False, "lot": None})
    return rows


def breakdown(session: Session, user_id: str, *, now: datetime | None = None) -> list[dict]:
    """What the balance is made of: each open lot, soonest expiry first, and any debt."""
    return _breakdown(open_lots(session, user_id, now=now), int(_debt(session, user_id) or 0))


def account_summary(session: Session, user_id: str, *, now: datetime | None = None) -> AccountSummary:
    user_id = check_user_id(user_id)
    now = now or utcnow()
    account = session.get(Account, user_id)
    sub = current_subscription(session, user_id) if account else None
    tier = sub.tier if sub and sub.status in LIVE_STATUSES else "none"
    flagged = bool(account and account.flagged)
    lots_now = open_lots(session, user_id, now=now) if account else []
    debt = int(account.debt or 0) if account else 0
    return AccountSummary(
        user_id=user_id, exists=account is not None,
        balance=sum(lot.remaining for lot in lots_now) + debt if account else 0,
        spendable_balance=0 if flagged or not account else _spendable(lots_now, debt),
        tier=tier, subscription_status=sub.status if sub else None, subscription_id=sub.id if sub else None,
        current_period_end=sub.current_period_end if sub else None,
        cancel_at_period_end=bool(sub and sub.cancel_at_period_end),
        flagged=flagged, flag_reason=account.flag_reason if account else None,
        email=account.email if account else None,
        stripe_customer_id=account.stripe_customer_id if account else None,
        breakdown=_breakdown(lots_now, debt) if account else [],
    )


def history(session: Session, user_id: str, *, limit: int = 50, offset: int = 0) -> list[LedgerEntry]:
    stmt = (select(LedgerEntry).where(LedgerEntry.user_id == user_id)
            .order_by(LedgerEntry.created_at.desc(), LedgerEntry.id.desc()).limit(limit).offset(offset))
    return list(session.exec(stmt).scalars().all())


_CREDITS_PAID_BY = Prepared(select(func.coalesce(func.sum(LOT.c.granted), 0).label("credits"))
                            .where(LOT.c.payment_id == bindparam("payment_id"), LOT.c.user_id == bindparam("user_id")))


def credits_paid_by(session: Session, payment) -> int:
    """What a payment (anything with its `id` and `user_id`) granted, counting lots it claimed after a
    subscription event granted them."""
    if not payment.user_id:
        return 0
    return int(_CREDITS_PAID_BY.first(session.connection(), {"payment_id": payment.id,
                                                             "user_id": payment.user_id}).credits)


# --- writing ------------------------------------------------------------------------------

_ENTRY_WITH_KEY = Prepared(select(ENTRY.c.id).where(ENTRY.c.source_key == bindparam("source_key")))


def _key_exists(session: Session, source_key: str) -> bool:
    return _ENTRY_WITH_KEY.first(session.connection(), {"source_key": source_key}) is not None


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]


_recording_time: ContextVar[datetime | None] = ContextVar("ledger_recording_time", default=None)


@contextmanager
def recorded_at(when: datetime):
    """Entries written inside this block carry `when` as their creation time (demo data and backfills
    of past history); everywhere else an entry records the moment it was written."""
    token = _recording_time.set(when)
    try:
        yield
    finally:
        _recording_time.reset(token)


_INSERT_ENTRY_ONCE = {
    name: Prepared(insert(ENTRY).on_conflict_do_nothing(index_elements=["source_key"]).returning(ENTRY.c.id))
    for name, insert in (("postgresql", pg_insert), ("sqlite", sqlite_insert))}


def _insert_entry_ignoring_duplicate(session: Session, values: dict) -> int | None:
    """Insert an entry unless its source key is already there; the new id, or None for a duplicate."""
    connection = session.connection()
    return _INSERT_ENTRY_ONCE[connection.dialect.name].scalar(connection, values)


class _Book:
    """One account's ledger for one write: its totals and open lots, locked, changed in memory and in the
    tables together. Lots whose expiry time has passed are closed when the book is opened."""

    def __init__(self, session: Session, row, now: datetime, *, new_account: bool = False):
        self.session, self.conn, self.now = session, session.connection(), now
        self.user_id: str = row.user_id
        self.flagged, self.flag_reason = bool(row.flagged), row.flag_reason
        self.open_disputes = int(row.open_disputes or 0)
        self.balance, self.debt = int(row.balance), int(row.debt)
        self._written = (self.balance, self.debt, self.flagged, self.flag_reason)
        self.lots: dict[int, Lot] = {}
        self.lapsed: list[Lot] = []  # lots whose expiry had passed, closed as the book opened
        if not new_account:  # an account created in this transaction has no lots to read
            self._load_open_lots()

    # reading
    def _load_open_lots(self) -> None:
        expired = self.lapsed = []
        for row in _P_OPEN_LOTS.rows(self.conn, {"user_id": self.user_id}):
            lot = _lot_from_row(row)
            self.lots[lot.id] = lot
            if lot.expired(self.now):
                expired.append(lot)
        for lot in expired:  # time passed since the account's last write: the lot stops counting
            lot.closed = True
            self.balance -= lot.remaining
            self.save_lot(lot)
        if expired:
            self.save_totals()

    def open_lots(self, *, spendable_only: bool) -> list[Lot]:
        """Open lots holding credits, in spending order."""
        return sorted((lot for lot in self.lots.values()
                       if not lot.closed and lot.remaining > 0 and not (spendable_only and lot.frozen)),
                      key=_spend_order)

    def spendable(self) -> int:
        return 0 if self.flagged else _spendable([lot for lot in self.lots.values() if not lot.closed], self.debt)

    def payment_lots(self, payment_id: int) -> list[Lot]:
        """The lots a payment paid for (granted with it, or claimed by it later), open or closed."""
        found = []
        for row in self.conn.execute(_LOTS_OF_PAYMENT, {"payment_id": payment_id, "user_id": self.user_id}).all():
            found.append(self.lots.get(row[0]) or _lot_from_row(row))
        return found

    # writing
    def write(self, **values) -> dict:
        entry = {**_ENTRY_DEFAULTS, "user_id": self.user_id, "created_at": _recording_time.get() or utcnow(), **values}
        _P_INSERT_ENTRY.run(self.conn, entry)
        return entry

    def save_lot(self, lot: Lot) -> None:
        if not lot.closed and lot.remaining == 0 and lot.held == 0 and lot.source != "subscription":
            lot.closed = True  # a spent pack or adjustment can never receive credits again
        _P_UPDATE_LOT.run(self.conn, {"lot_id": lot.id, "remaining": lot.remaining, "held": lot.held,
                                        "closed": lot.closed, "closed_at": self.now if lot.closed else None})

    def change_lot(self, lot: Lot, *, credits: int, held: int = 0) -> None:
        """`credits` into (or, negative, out of) an open lot; `held` moves between remaining and held."""
        lot.remaining += credits
        lot.held += held
        self.balance += credits
        self.save_lot(lot)

    def refresh_flag(self) -> None:
        self.flagged, self.flag_reason = _flag_for(self.open_disputes, self.balance)

    def save_totals(self) -> None:
        """Write the account's totals (and flag) when they changed; keep a loaded Account object in step."""
        state = (self.balance, self.debt, self.flagged, self.flag_reason)
        if state == self._written:
            return
        if (self.flagged, self.flag_reason) != self._written[2:]:
            updated_at = utcnow()
            _P_UPDATE_TOTALS_AND_FLAG.run(self.conn, {
                "account_id": self.user_id, "balance": self.balance, "debt": self.debt, "flagged": self.flagged,
                "flag_reason": self.flag_reason, "updated_at": updated_at})
        else:
            updated_at = None
            _P_UPDATE_TOTALS.run(self.conn, {"account_id": self.user_id, "balance": self.balance, "debt": self.debt})
        self._written = state
        loaded = loaded_copy(self.session, Account, self.user_id)
        if loaded is not None:
            for name, value in (("balance", self.balance), ("debt", self.debt), ("flagged", self.flagged),
                                ("flag_reason", self.flag_reason)):
                set_committed_value(loaded, name, value)
            if updated_at is not None:
                set_committed_value(loaded, "updated_at", updated_at)

    def finish(self, *, refresh_flag: bool) -> None:
        if refresh_flag:
            self.refresh_flag()
        self.save_totals()


def _lock_row(session: Session, user_id: str, *, create: bool, reference: str | None = None):
    """The account's row (and, given a reference, the earlier spend with it), locked; created first when
    missing and `create`."""
    user_id = check_user_id(user_id)
    session.flush()  # an Account changed in this session (open_disputes) must be read as changed
    postgresql = session.get_bind().dialect.name == "postgresql"
    if reference is None or postgresql:
        statement, params = (_P_ACCOUNT_STATE_LOCKED if postgresql else _P_ACCOUNT_STATE), {"user_id": user_id}
    else:
        statement, params = _P_SPEND_STATE, {"user_id": user_id, "reference": reference}
    conn = session.connection()
    row = statement.first(conn, params)
    if row is None and create:
        created = utcnow()
        _insert_ignore(session, {"user_id": user_id, "email": None, "flagged": False, "open_disputes": 0,
                                 "created_at": created, "updated_at": created})
        row = statement.first(conn, params)
    if row is not None and reference is not None and postgresql:  # read after the lock: a fresh snapshot
        done = conn.execute(_DONE_SPEND, {"user_id": user_id, "reference": reference}).first()
        row = SimpleNamespace(**row._mapping, done_credits=done[0] if done else None,
                              done_balance=done[1] if done else None, done_spendable=done[2] if done else None)
    return row


def _open_book(session: Session, user_id: str, *, now: datetime | None) -> _Book:
    """Lock the account (creating it when missing) and open its book."""
    return _Book(session, _lock_row(session, user_id, create=True), now or utcnow())


def refresh_flag(session: Session, account: Account, *, now: datetime | None = None) -> None:
    """Flag an account while a dispute is open or its balance is negative."""
    flagged, reason = _flag_for(account.open_disputes, balance(session, account.user_id, now=now))
    if (account.flagged, account.flag_reason) != (flagged, reason):
        account.flagged, account.flag_reason, account.updated_at = flagged, reason, utcnow()
        session.add(account)
        session.flush()


def _grant(book: _Book, *, credits: int, kind: str, source_key: str, lot_source: str,
           expires_at: datetime | None = None, **extra) -> LedgerEntry | None:
    """Open a lot: its grant entry (once per source key), the lot row, and settle any earlier debt from it."""
    granted = _grant_values(book, credits=credits, kind=kind, source_key=source_key, lot_source=lot_source,
                            expires_at=expires_at, **extra)
    return None if granted is None else LedgerEntry(id=granted[0], **granted[1])


def _grant_values(book: _Book, *, credits: int, kind: str, source_key: str, lot_source: str,
                  expires_at: datetime | None = None, **extra) -> tuple[int, dict] | None:
    """_grant's work: (the entry's id, its values), or None when nothing was granted. Building the ORM object
    costs more than the statements; the webhook's pack path doesn't need it."""
    if credits <= 0:
        return None
    values = {**_ENTRY_DEFAULTS, "user_id": book.user_id, "credits": credits, "kind": kind, "source_key": source_key,
              "lot_key": source_key, "lot_source": lot_source, "expires_at": expires_at,
              "created_at": _recording_time.get() or utcnow(), **extra}
    entry_id = _insert_entry_ignoring_duplicate(book.session, values)
    if entry_id is None:
        return None
    settled = min(-book.debt, credits) if book.debt < 0 else 0
    lot = Lot(id=0, key=source_key, source=lot_source, granted=credits, remaining=credits - settled, held=0,
              expires_at=expires_at, subscription_id=extra.get("subscription_id"),
              period_end=extra.get("period_end"), payment_id=extra.get("payment_id"),
              created_at=values["created_at"], closed=False)
    lot.closed = lot.expired(book.now) or (lot.remaining == 0 and lot_source != "subscription")
    lot.id = _P_INSERT_LOT.insert(book.conn, {
        "lot_key": lot.key, "user_id": book.user_id, "source": lot.source, "granted": lot.granted,
        "remaining": lot.remaining, "held": 0, "expires_at": lot.expires_at, "subscription_id": lot.subscription_id,
        "period_end": lot.period_end, "payment_id": lot.payment_id, "allowance_from": extra.get("allowance_from"),
        "allowance_to": extra.get("allowance_to"), "closed": lot.closed,
        "closed_at": book.now if lot.closed else None, "created_at": lot.created_at})
    book.lots[lot.id] = lot
    if settled:  # the new lot pays off earlier debt, so the debt can't resurface when the lot expires
        book.write(credits=-settled, kind="debt_settlement", source_key=f"{source_key}:settles-debt", lot_key=source_key)
        book.write(credits=settled, kind="debt_settlement", source_key=f"{source_key}:debt-settled", lot_key=None)
        book.debt += settled
    book.balance += settled + (0 if lot.closed else lot.remaining)
    book.finish(refresh_flag=True)
    return entry_id, values


def _draw(book: _Book, *, credits: int, kind: str, key_prefix: str, lots: list[Lot], allow_debt: bool,
          **extra) -> list[dict]:
    """Take `credits` from the lots in the given order; what they can't cover becomes debt."""
    written, left = [], credits
    for number, lot in enumerate(lots):
        if left <= 0:
            break
        take = min(lot.remaining, left)
        written.append(book.write(credits=-take, kind=kind, source_key=f"{key_prefix}:{number}", lot_key=lot.key,
                                  **extra))
        book.change_lot(lot, credits=-take)
        left -= take
    if left > 0:
        if not allow_debt:
            raise InsufficientCredits(f"insufficient credits: {credits} needed, {credits - left} available")
        written.append(book.write(credits=-left, kind=kind, source_key=f"{key_prefix}:debt", lot_key=None, **extra))
        book.debt -= left
        book.balance -= left
    return written


def grant_pack(session: Session, *, user_id: str, credits: int, source_key: str, payment_id: int | None = None,
               now: datetime | None = None) -> LedgerEntry | None:
    """Pack credits never expire. Returns None when this source key was already applied."""
    book = _open_book(session, user_id, now=now)
    entry = _grant(book, credits=credits, kind="pack_grant", source_key=source_key, lot_source="pack",
                   payment_id=payment_id)
    book.save_totals()
    return entry


ACCOUNT_STATE_COLUMNS = _ACCOUNT_STATE.selected_columns  # what a book needs of the account row


def grant_pack_once(session: Session, *, user_id: str, credits: int, source_key: str, payment_id: int | None = None,
                    account_state=None, now: datetime | None = None) -> bool:
    """grant_pack without building the entry object (the webhook's path): True when granted, False when this
    source key was already applied. `account_state`: the account's ACCOUNT_STATE_COLUMNS as the caller's
    statement that locked (or created) the row in this transaction returned them, so they aren't read again;
    with a true `created` among them, the account was created by that statement and has no lots to read."""
    book = _book_for(session, user_id, account_state=account_state, now=now)
    granted = _grant_values(book, credits=credits, kind="pack_grant", source_key=source_key, lot_source="pack",
                            payment_id=payment_id)
    book.save_totals()
    return granted is not None


def grant_subscription_period(session: Session, *, user_id: str, subscription_id: str, period_end: int, tier: str,
                              source_key: str, payment_id: int | None = None, rollover: bool = False,
                              account_state=None, now: datetime | None = None) -> LedgerEntry | None:
    """A paid period's allowance for its tier, once per subscription and period.

    Upgrades are separate lots (`grant_upgrade_topup`), so the base grant and the top-ups add up to the
    highest tier's allowance whichever order the invoice and the subscription events arrive in. With
    `rollover` (SUBSCRIPTION_CREDITS_ROLLOVER), subscription credits never expire. `account_state`: as for
    grant_pack_once.
    """
    granted = grant_subscription_period_values(
        session, user_id=user_id, subscription_id=subscription_id, period_end=period_end, tier=tier,
        source_key=source_key, payment_id=payment_id, rollover=rollover, account_state=account_state, now=now)
    return None if granted is None else LedgerEntry(id=granted[0], **granted[1])


def grant_subscription_period_values(session: Session, *, user_id: str, subscription_id: str, period_end: int,
                                     tier: str, source_key: str, payment_id: int | None = None,
                                     rollover: bool = False, account_state=None,
                                     now: datetime | None = None) -> tuple[int, dict] | None:
    """grant_subscription_period without building the entry object (the webhook's path): (the grant entry's id,
    its values), or None when nothing was granted."""
    book = _book_for(session, user_id, account_state=account_state, now=now)
    return _grant_for_period(book, slice_=(0, allowance(tier)), kind="subscription_grant", source_key=source_key,
                             subscription_id=subscription_id, period_end=period_end, payment_id=payment_id,
                             rollover=rollover, key_checked=False)


def _book_for(session: Session, user_id: str, *, account_state, now: datetime | None) -> _Book:
    """The account's book, from `account_state` (the caller's statement locked or created the row in this
    transaction and returned ACCOUNT_STATE_COLUMNS and `created`) when it is this user's, else locked here."""
    if account_state is not None and account_state.user_id == user_id:
        new_account = bool(getattr(account_state, "created", False))
        return _Book(session, account_state, now or utcnow(), new_account=new_account)
    return _open_book(session, user_id, now=now)


def grant_upgrade_topup(session: Session, *, user_id: str, subscription_id: str, period_end: int, from_tier: str,
                        to_tier: str, source_key: str, payment_id: int | None = None, claims_lot: str | None = None,
                        rollover: bool = False, now: datetime | None = None) -> LedgerEntry | None:
    """An upgrade mid-period: the difference between the new and the old allowance, once per subscription
    and period, whichever event reports it (the subscription event or the proration invoice). Credits
    already granted for the period count, so a second report, or a move back up after a downgrade, adds
    nothing. A paying invoice names the lot a subscription event granted first (`claims_lot`) and claims
    it, so refunding or disputing the upgrade takes those credits back."""
    book = _open_book(session, user_id, now=now)
    if _key_exists(session, source_key):
        book.save_totals()
        return None
    if payment_id is not None and claims_lot:
        _claim_unpaid_lot(book, lot_key=claims_lot, payment_id=payment_id)
    granted = _grant_for_period(book, slice_=(allowance(from_tier), allowance(to_tier)), kind="upgrade_topup",
                                source_key=source_key, subscription_id=subscription_id, period_end=period_end,
                                payment_id=payment_id, rollover=rollover, key_checked=True)
    return None if granted is None else LedgerEntry(id=granted[0], **granted[1])


def _uncovered(slice_: tuple[int, int], covered: list[tuple[int, int]]) -> int:
    """How many credits of [low, high) no earlier slice covers."""
    low, high = slice_
    missing, cursor = 0, low
    for start, end in sorted(covered):
        if end <= cursor or start >= high:
            continue
        if start > cursor:
            missing += min(start, high) - cursor
        cursor = max(cursor, end)
        if cursor >= high:
            break
    return missing + max(0, high - cursor)


# The allowance slices already granted for a subscription's period.
_COVERED = Prepared(select(LOT.c.allowance_from, LOT.c.allowance_to).where(
    LOT.c.subscription_id == bindparam("subscription_id"), LOT.c.period_end == bindparam("period_end"),
    LOT.c.user_id == bindparam("user_id"), LOT.c.source == "subscription", LOT.c.allowance_from.is_not(None)))


def _grant_for_period(book: _Book, *, slice_: tuple[int, int], kind: str, source_key: str, subscription_id: str,
                      period_end: int, payment_id: int | None, rollover: bool,
                      key_checked: bool) -> tuple[int, dict] | None:
    """A subscription lot for the part of the allowance slice that no earlier grant of the period covers,
    expiring with its period; it closes the subscription's earlier periods; once per source key (unless
    `key_checked`, the caller has found it unused). (The grant entry's id, its values), or None when nothing was
    granted."""
    covered = _COVERED.rows(book.conn, {"subscription_id": subscription_id, "period_end": period_end,
                                        "user_id": book.user_id})
    credits = _uncovered(slice_, [(int(a), int(b)) for a, b in covered])
    if credits <= 0:
        book.save_totals()
        return None
    if not rollover:
        earlier = [lot for lot in book.lots.values()
                   if lot.source == "subscription" and lot.subscription_id == subscription_id
                   and lot.period_end is not None and lot.period_end < period_end and not lot.closed]
        # A used source key grants nothing (_grant_values inserts its entry once), so only before closing
        # earlier periods is it worth a read: a grant that changes nothing must not close them.
        if earlier and not key_checked and _key_exists(book.session, source_key):
            book.save_totals()
            return None
        _expire(book, sorted(earlier, key=lambda lot: lot.id), reason="next period's credits granted")
    granted = _grant_values(book, credits=credits, kind=kind, source_key=source_key, lot_source="subscription",
                            expires_at=None if rollover else from_epoch(period_end), subscription_id=subscription_id,
                            period_end=period_end, payment_id=payment_id, allowance_from=slice_[0],
                            allowance_to=slice_[1])
    book.save_totals()
    return granted


def _expire(book: _Book, to_close: list[Lot], *, reason: str) -> int:
    """Close lots at once; a zero-credit marker still closes a lot that is empty right now."""
    total = 0
    for lot in to_close:
        if lot.closed:
            continue
        credits = max(lot.remaining, 0)
        book.write(credits=-credits, kind="expire", source_key=f"expire:{lot.key}", lot_key=lot.key,
                   subscription_id=lot.subscription_id, reason=reason)
        lot.remaining -= credits
        lot.closed = True
        book.balance -= credits + lot.remaining  # the lot stops counting
        book.save_lot(lot)
        total += credits
    return total


_USERS_WITH_LAPSED_LOTS = (select(LOT.c.user_id).where(OPEN, LOT.c.expires_at <= bindparam("now"))
                           .group_by(LOT.c.user_id).order_by(LOT.c.user_id))


def users_with_lapsed_lots(session: Session, *, now: datetime | None = None) -> list[str]:
    """Accounts holding an open lot whose expiry has passed (one range scan of the open lots by expiry)."""
    return list(session.execute(_USERS_WITH_LAPSED_LOTS, {"now": now or utcnow()}).scalars())


def close_lapsed_lots(session: Session, *, user_id: str, now: datetime | None = None) -> tuple[int, int]:
    """Close the account's lots whose expiry has passed, as its next write would; (lots closed, credits lapsed).
    Reads already leave such lots out, so balances don't change: this keeps the open lots (and their index) to
    the lots that still count on accounts nobody writes to."""
    book = _open_book(session, user_id, now=now)
    return len(book.lapsed), sum(lot.remaining for lot in book.lapsed)


def expire_subscription_credits(session: Session, *, user_id: str, subscription_id: str, reason: str,
                                now: datetime | None = None) -> int:
    """Cancellation: the subscription's remaining credits expire at once; packs stay."""
    book = _open_book(session, user_id, now=now)
    to_close = sorted((lot for lot in book.lots.values()
                       if lot.source == "subscription" and lot.subscription_id == subscription_id and not lot.closed),
                      key=lambda lot: lot.id)
    total = _expire(book, to_close, reason=reason)
    book.finish(refresh_flag=True)
    return total


def _claim_unpaid_lot(book: _Book, *, lot_key: str, payment_id: int) -> None:
    """Tie a lot granted without a payment to the invoice that paid for it: a zero-credit entry in the lot,
    written once per lot, and the payment on the lot."""
    row = book.conn.execute(select(LOT.c.id, LOT.c.source, LOT.c.payment_id, LOT.c.subscription_id, LOT.c.period_end)
                            .where(LOT.c.lot_key == lot_key, LOT.c.user_id == book.user_id)).first()
    key = f"paid-by:{lot_key}"
    if row is None or row.payment_id is not None or row.source != "subscription" or _key_exists(book.session, key):
        return
    book.write(credits=0, kind="payment_link", source_key=key, lot_key=lot_key, payment_id=payment_id,
               subscription_id=row.subscription_id, period_end=row.period_end)
    book.conn.execute(update(LOT).where(LOT.c.id == row.id).values(payment_id=payment_id))
    if row.id in book.lots:
        book.lots[row.id].payment_id = payment_id


def _expired_by_marker(book: _Book, lots: list[Lot]) -> int:
    """Credits `expire` entries took from these lots (only closed lots have one)."""
    keys = [f"expire:{lot.key}" for lot in lots if lot.closed]
    if not keys:
        return 0
    return -int(book.conn.execute(select(func.coalesce(func.sum(ENTRY.c.credits), 0))
                                  .where(ENTRY.c.source_key.in_(keys))).scalar_one())


def clawback_for_payment(session: Session, *, payment: Payment, reversed_cents: int,
                         now: datetime | None = None) -> int:
    """Take back a payment's credits in proportion to the amount reversed (refunded or lost in a dispute).

    Idempotent on the cumulative reversed amount: a late event reporting less takes nothing more.
    Credits of the payment that already expired unused are not taken twice.
    """
    if not payment.user_id or payment.amount_cents <= 0:
        return 0
    book = _open_book(session, payment.user_id, now=now)
    payment_lots = book.payment_lots(payment.id)
    granted = sum(lot.granted for lot in payment_lots)
    if granted <= 0:
        return 0
    reversed_cents = max(0, min(reversed_cents, payment.amount_cents))
    target = (granted * reversed_cents * 2 + payment.amount_cents) // (2 * payment.amount_cents)
    # Credits left in closed lots expired unused, and so did credits a dispute held in a lot that closed
    # meanwhile (never released).
    expired_unused = sum(max(lot.remaining, 0) + lot.held for lot in payment_lots if lot.closed)
    expired_unused += _expired_by_marker(book, payment_lots)
    target = min(target, granted - expired_unused)
    already = -int(book.conn.execute(select(func.coalesce(func.sum(ENTRY.c.credits), 0)).where(
        ENTRY.c.payment_id == payment.id, ENTRY.c.kind == "clawback")).scalar_one())
    delta = target - already
    if delta <= 0:
        return 0
    drawable = sorted((lot for lot in payment_lots if lot.remaining > 0 and not lot.closed), key=_spend_order)
    free = sum(lot.remaining for lot in drawable)
    if delta > free:  # a dispute holds the credits being reversed: take them from the hold, not as debt
        _unhold(book, payment_lots=payment_lots, credits=delta - free, key_suffix=f"clawback:{payment.id}:{target}")
        drawable = sorted((lot for lot in payment_lots if lot.remaining > 0 and not lot.closed), key=_spend_order)
    _draw(book, credits=delta, kind="clawback", key_prefix=f"clawback:{payment.id}:{target}", lots=drawable,
          allow_debt=True, payment_id=payment.id,
          reason=f"{reversed_cents} of {payment.amount_cents} {payment.currency} reversed")
    book.finish(refresh_flag=True)
    return delta


# The dispute entries' partial index, not the lots' spends (SQLite's planner needs telling).
_HELD = {name: text(
    "SELECT reference, lot_key, SUM(credits), MAX(payment_id) FROM ledger_entry" + hint
    + f" WHERE {DISPUTE_KINDS_SQL} AND lot_key IN :keys AND user_id = :user_id"
    " GROUP BY reference, lot_key ORDER BY reference, lot_key").bindparams(bindparam("keys", expanding=True))
    for name, hint in (("sqlite", " INDEXED BY ix_ledger_dispute_lot"), ("postgresql", ""))}


def _held(book: _Book, lots: list[Lot]) -> list[tuple[str, Lot, int, int | None]]:
    """(dispute id, lot, credits still held, payment id) for every hold not yet given back in these lots."""
    by_key = {lot.key: lot for lot in lots if lot.held > 0}
    if not by_key:
        return []
    statement = _HELD[book.session.get_bind().dialect.name]
    rows = book.conn.execute(statement, {"keys": sorted(by_key), "user_id": book.user_id}).all()
    return [(dispute_id, by_key[lot_key], -int(net), payment_id)
            for dispute_id, lot_key, net, payment_id in rows if net < 0]


def _unhold(book: _Book, *, payment_lots: list[Lot], credits: int, key_suffix: str) -> None:
    """Give back up to `credits` of what open disputes hold in these lots, so a reversal can take them.

    A refund delivered after a dispute opened on the rest of the payment must end as if it had come first
    (the dispute then held only what the refund left): the clawback takes from the hold, not as debt."""
    for dispute_id, lot, held, payment_id in _held(book, [lot for lot in payment_lots if not lot.closed]):
        if credits <= 0:
            break
        take = min(held, credits)
        book.write(credits=take, kind="dispute_release", lot_key=lot.key,
                   source_key=f"dispute_release:{dispute_id}:{lot.key}:{key_suffix}", payment_id=payment_id,
                   reference=dispute_id, reason="reversed while held: taken from the hold")
        book.change_lot(lot, credits=take, held=-take)
        credits -= take


def hold_for_dispute(session: Session, *, dispute_id: str, payment: Payment, now: datetime | None = None) -> int:
    """Freeze what is left of a disputed payment's credits and flag the account."""
    book = _open_book(session, payment.user_id, now=now)
    held = 0
    for lot in book.payment_lots(payment.id):
        key = f"dispute_hold:{dispute_id}:{lot.key}"
        if lot.remaining > 0 and not lot.closed and not _key_exists(session, key):
            credits = lot.remaining
            book.write(credits=-credits, kind="dispute_hold", source_key=key, lot_key=lot.key, payment_id=payment.id,
                       reference=dispute_id)
            book.change_lot(lot, credits=-credits, held=credits)
            held += credits
    book.save_totals()
    return held


def release_dispute_hold(session: Session, *, dispute_id: str, user_id: str, now: datetime | None = None) -> int:
    """Give back what a dispute held, into lots that are still open."""
    book = _open_book(session, user_id, now=now)
    open_held = [lot for lot in book.lots.values() if not lot.closed]
    released = 0
    for found_dispute, lot, credits, payment_id in _held(book, open_held):  # net of what a reversal already took
        key = f"dispute_release:{dispute_id}:{lot.key}"
        if found_dispute == dispute_id and not _key_exists(session, key):
            book.write(credits=credits, kind="dispute_release", source_key=key, lot_key=lot.key,
                       payment_id=payment_id, reference=dispute_id)
            book.change_lot(lot, credits=credits, held=-credits)
            released += credits
    book.save_totals()
    return released


def _entry_object(values: dict) -> LedgerEntry:
    return LedgerEntry(**{name: value for name, value in values.items() if value is not None})


def adjust(session: Session, *, user_id: str, credits: int, reason: str, operator: str,
           allow_negative: bool = False, source_key: str | None = None, now: datetime | None = None) -> list[LedgerEntry]:
    """A person's correction. Positive adjustments never expire; negative ones draw like a spend and may
    only take the balance below zero when explicitly allowed."""
    credits = check_credits(credits, allow_negative=True)
    if not (isinstance(reason, str) and reason.strip()):
        raise LedgerError("a reason is required for every adjustment")
    reason = check_text(reason, what="the reason", max_length=MAX_REASON_LENGTH, allow_newlines=True)
    if not (isinstance(operator, str) and operator.strip()):
        raise LedgerError("the operator making the adjustment must be named")
    operator = check_text(operator, what="the operator name", max_length=MAX_OPERATOR_LENGTH)
    source_key = source_key or f"adjust:{uuid.uuid4()}"
    book = _open_book(session, user_id, now=now)
    keys = (source_key, f"{source_key}:0", f"{source_key}:debt")
    if book.conn.execute(select(ENTRY.c.id).where(ENTRY.c.source_key.in_(keys)).limit(1)).first() is not None:
        book.save_totals()
        return []
    if credits > 0:
        entry = _grant(book, credits=credits, kind="adjustment", source_key=source_key, lot_source="adjustment",
                       operator=operator, reason=reason)
        book.save_totals()
        return [entry] if entry else []
    if book.balance + credits < 0 and not allow_negative:
        raise WouldGoNegative(f"adjustment of {credits} would take the balance of {book.user_id} "
                              f"from {book.balance} below zero; allow a negative balance explicitly to do this")
    written = _draw(book, credits=-credits, kind="adjustment", key_prefix=source_key,
                    lots=book.open_lots(spendable_only=False), allow_debt=True, operator=operator, reason=reason)
    book.finish(refresh_flag=True)
    return [_entry_object(values) for values in written]


class _ConnectionScope:
    """A Core connection where the ledger takes a Session: no ORM objects to flush or keep in step."""

    identity_map: dict = {}

    def __init__(self, connection):
        self._connection = connection

    def connection(self):
        return self._connection

    def get_bind(self):
        return self._connection.engine

    def flush(self) -> None:
        pass

    def identity_key(self, *args) -> None:
        return None


def consume_on_connection(connection, **kwargs) -> ConsumeResult:
    """consume() inside a Core connection's write transaction (db.write_connection): the same statements,
    without an ORM session's cost."""
    return consume(_ConnectionScope(connection), **kwargs)


def consume(session: Session, *, user_id: str, credits: int, reference: str,
            now: datetime | None = None, token_name: str | None = None) -> ConsumeResult:
    """The DevOps Agent spends credits: atomic, and once per (user, reference)."""
    credits = check_credits(credits, allow_negative=False)
    if not (isinstance(reference, str) and reference.strip()):
        raise LedgerError("a reference is required so a retried spend is not applied twice")
    reference = check_text(reference, what="the reference", max_length=MAX_REFERENCE_LENGTH)
    row = _lock_row(session, user_id, create=False, reference=reference)
    if row is None:
        raise UnknownAccount(f"insufficient credits: {check_user_id(user_id)} has no account (balance 0)")
    if row.done_credits is not None:
        if row.done_credits != credits:
            raise ReferenceConflict(f"reference {reference!r} was already used to spend {row.done_credits} "
                                    f"credits, not {credits}")
        return ConsumeResult(row.user_id, row.done_credits, reference, row.done_balance, row.done_spendable,
                             replayed=True)
    book = _Book(session, row, now or utcnow())
    if book.flagged:
        raise AccountFlagged(f"account {book.user_id} is flagged ({book.flag_reason}); spending is paused")
    available = book.spendable()
    if credits > available:
        raise InsufficientCredits(f"insufficient credits: {credits} requested, {available} spendable")
    _draw(book, credits=credits, kind="spend", key_prefix=f"spend:{_digest(book.user_id, reference)}",
          lots=book.open_lots(spendable_only=True), allow_debt=False, reference=reference)
    book.finish(refresh_flag=True)
    result = ConsumeResult(book.user_id, credits, reference, book.balance, book.spendable())
    _P_INSERT_CONSUMPTION.run(book.conn, {"user_id": book.user_id, "reference": reference, "credits": credits,
                                          "balance_after": result.balance,
                                          "spendable_after": result.spendable_balance, "created_at": book.now,
                                          "token_name": token_name})
    return result


# --- plan changes (billing_core/plan_changes.py decides; these write) ------------------------------

DOWNGRADE_TAKEBACK = "downgrade_takeback"


def _of_period(lot: Lot, subscription_id: str, period_end: int) -> bool:
    return lot.source == "subscription" and lot.subscription_id == subscription_id and lot.period_end == period_end


def period_unspent(session: Session, *, user_id: str, subscription_id: str, period_end: int,
                   now: datetime | None = None) -> int:
    """A subscription period's credits still unspent (in its open lots; frozen ones count, held ones don't)."""
    return sum(lot.remaining for lot in open_lots(session, user_id, now=now)
               if _of_period(lot, subscription_id, period_end) and not lot.closed)


def grant_plan_change_topup(session: Session, *, user_id: str, subscription_id: str, period_end: int, credits: int,
                            source_key: str, payment_id: int | None, expires_at: datetime | None,
                            rollover: bool = False, now: datetime | None = None) -> LedgerEntry | None:
    """An upgrade's top-up for the rest of its period, once per source key, tied to the payment of the invoice
    that carried its proration (so refunding that invoice takes it back). A subscription lot of that period,
    expiring at `expires_at` (never with `rollover`)."""
    book = _open_book(session, user_id, now=now)
    entry = _grant(book, credits=credits, kind="upgrade_topup", source_key=source_key, lot_source="subscription",
                   expires_at=None if rollover else expires_at, subscription_id=subscription_id,
                   period_end=period_end, payment_id=payment_id)
    book.save_totals()
    return entry


def take_back_for_downgrade(session: Session, *, user_id: str, subscription_id: str, period_end: int, credits: int,
                            source_key: str, reason: str, now: datetime | None = None) -> int:
    """Take up to `credits` from the period's unspent subscription credits (never packs or adjustments, never
    into debt); what was taken. Once per source key."""
    book = _open_book(session, user_id, now=now)
    if credits <= 0 or _key_exists(session, f"{source_key}:0"):
        book.save_totals()
        return 0
    period_lots = [lot for lot in book.open_lots(spendable_only=False) if _of_period(lot, subscription_id, period_end)]
    take = min(credits, sum(lot.remaining for lot in period_lots))
    if take > 0:
        _draw(book, credits=take, kind=DOWNGRADE_TAKEBACK, key_prefix=source_key, lots=period_lots, allow_debt=False,
              subscription_id=subscription_id, period_end=period_end, reason=reason)
    book.finish(refresh_flag=True)
    return max(take, 0)
