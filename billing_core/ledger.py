"""The credit ledger: append-only entries grouped in lots.

Every grant opens a lot whose key is the grant's own source key; spends, expiries, clawbacks and
dispute holds are entries drawing on a lot (`lot_key`). A lot is closed when its `expires_at` has
passed or it has an `expire` entry; nothing is ever added to a closed lot, so a closed lot's
remaining credits simply stop counting. Debt (a clawback beyond what a payment's lots still hold)
is an entry with no lot, settled by the next grant.

Every function here runs inside the caller's write transaction and first locks the account
(`lock_account`), so concurrent writers on one account queue up: SQLite by BEGIN IMMEDIATE,
PostgreSQL by SELECT ... FOR UPDATE on the account row.
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

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import aliased
from sqlmodel import Session

from .catalog import allowance
from .db import for_update
from .models import Account, Consumption, LedgerEntry, Payment, Subscription, from_epoch, utcnow
from .settings import get_settings

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


@dataclass(frozen=True)
class Lot:
    key: str
    source: str
    granted: int
    remaining: int
    expires_at: datetime | None
    subscription_id: str | None
    period_end: int | None
    payment_id: int | None
    created_at: datetime
    expired_marks: int

    def closed(self, now: datetime) -> bool:
        return self.expired_marks > 0 or (self.expires_at is not None and self.expires_at <= now)


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


# --- reading ------------------------------------------------------------------------------

# Built once: a fresh aliased() per call makes SQLAlchemy re-adapt every column it touches, which
# cost ~10 ms per lots() call, several times per spend and per webhook event (see docs/BENCHMARKS.md).
_GRANT = aliased(LedgerEntry, name="grant")
_ENTRY = aliased(LedgerEntry, name="entry")


def lots(session: Session, user_id: str) -> list[Lot]:
    grant, entry = _GRANT, _ENTRY
    stmt = (
        select(grant.source_key, grant.lot_source, grant.credits, func.sum(entry.credits), grant.expires_at,
               grant.subscription_id, grant.period_end, grant.payment_id, grant.created_at,
               func.sum(case((entry.kind == "expire", 1), else_=0)))
        .join(entry, and_(entry.user_id == grant.user_id, entry.lot_key == grant.source_key))
        .where(grant.user_id == user_id, grant.lot_source.is_not(None))
        .group_by(grant.id, grant.source_key, grant.lot_source, grant.credits, grant.expires_at,
                  grant.subscription_id, grant.period_end, grant.payment_id, grant.created_at)
    )
    return [Lot(key=r[0], source=r[1], granted=r[2], remaining=int(r[3] or 0), expires_at=r[4],
                subscription_id=r[5], period_end=r[6], payment_id=r[7], created_at=r[8], expired_marks=int(r[9] or 0))
            for r in session.execute(stmt).all()]


def unlotted_total(session: Session, user_id: str) -> int:
    stmt = select(func.coalesce(func.sum(LedgerEntry.credits), 0)).where(
        LedgerEntry.user_id == user_id, LedgerEntry.lot_key.is_(None))
    return int(session.execute(stmt).scalar_one())


def balance(session: Session, user_id: str, *, now: datetime | None = None) -> int:
    """Credits held now: every entry, except those in lots whose expiry time has passed."""
    now = now or utcnow()
    grant = _GRANT
    stmt = (select(func.coalesce(func.sum(LedgerEntry.credits), 0))
            .select_from(LedgerEntry)
            # source keys are unique, so each entry finds its grant through that index; adding user_id here
            # let PostgreSQL without table statistics scan all of the user's entries per entry (quadratic)
            .outerjoin(grant, grant.source_key == LedgerEntry.lot_key)
            .where(LedgerEntry.user_id == user_id,
                   or_(LedgerEntry.lot_key.is_(None), grant.expires_at.is_(None), grant.expires_at > now)))
    return int(session.execute(stmt).scalar_one())


def _frozen_subscriptions(session: Session, user_id: str) -> set[str]:
    stmt = select(Subscription.id).where(Subscription.user_id == user_id, Subscription.status.in_(FROZEN_STATUSES))
    return set(session.execute(stmt).scalars().all())


def _spend_order(lot: Lot):
    return (lot.expires_at is None, lot.expires_at or lot.created_at, lot.created_at, lot.key)


def _open_lots(session: Session, user_id: str, now: datetime, *, spendable_only: bool) -> list[Lot]:
    frozen = _frozen_subscriptions(session, user_id) if spendable_only else set()
    found = [lot for lot in lots(session, user_id)
             if lot.remaining > 0 and not lot.closed(now)
             and not (lot.source == "subscription" and lot.subscription_id in frozen)]
    return sorted(found, key=_spend_order)


def spendable_balance(session: Session, user_id: str, *, now: datetime | None = None,
                      flagged: bool | None = None) -> int:
    now = now or utcnow()
    if flagged is None:
        flagged = bool(session.execute(select(Account.flagged).where(Account.user_id == user_id)).scalar())
    if flagged:
        return 0
    total = sum(lot.remaining for lot in _open_lots(session, user_id, now, spendable_only=True))
    return max(0, total + unlotted_total(session, user_id))


def breakdown(session: Session, user_id: str, *, now: datetime | None = None) -> list[dict]:
    """What the balance is made of: each open lot, soonest expiry first, and any debt."""
    now = now or utcnow()
    frozen = _frozen_subscriptions(session, user_id)
    rows = []
    for lot in sorted((lot for lot in lots(session, user_id) if lot.remaining != 0 and not lot.closed(now)),
                      key=_spend_order):
        rows.append({
            "source": lot.source, "credits": lot.remaining, "granted": lot.granted,
            "expires_at": lot.expires_at.isoformat() if lot.expires_at else None,
            "subscription_id": lot.subscription_id,
            "frozen": lot.source == "subscription" and lot.subscription_id in frozen,
            "lot": lot.key,
        })
    debt = unlotted_total(session, user_id)
    if debt:
        rows.append({"source": "debt", "credits": debt, "granted": 0, "expires_at": None,
                     "subscription_id": None, "frozen": False, "lot": None})
    return rows


def account_summary(session: Session, user_id: str, *, now: datetime | None = None) -> AccountSummary:
    user_id = check_user_id(user_id)
    now = now or utcnow()
    account = session.get(Account, user_id)
    sub = current_subscription(session, user_id) if account else None
    tier = sub.tier if sub and sub.status in LIVE_STATUSES else "none"
    flagged = bool(account and account.flagged)
    return AccountSummary(
        user_id=user_id, exists=account is not None,
        balance=balance(session, user_id, now=now) if account else 0,
        spendable_balance=spendable_balance(session, user_id, now=now, flagged=flagged) if account else 0,
        tier=tier, subscription_status=sub.status if sub else None, subscription_id=sub.id if sub else None,
        current_period_end=sub.current_period_end if sub else None,
        cancel_at_period_end=bool(sub and sub.cancel_at_period_end),
        flagged=flagged, flag_reason=account.flag_reason if account else None,
        email=account.email if account else None,
        stripe_customer_id=account.stripe_customer_id if account else None,
        breakdown=breakdown(session, user_id, now=now) if account else [],
    )


def history(session: Session, user_id: str, *, limit: int = 50, offset: int = 0) -> list[LedgerEntry]:
    stmt = (select(LedgerEntry).where(LedgerEntry.user_id == user_id)
            .order_by(LedgerEntry.created_at.desc(), LedgerEntry.id.desc()).limit(limit).offset(offset))
    return list(session.exec(stmt).scalars().all())


# --- writing ------------------------------------------------------------------------------

def _key_exists(session: Session, source_key: str) -> bool:
    return session.execute(select(LedgerEntry.id).where(LedgerEntry.source_key == source_key)).first() is not None


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


def _write(session: Session, **values) -> LedgerEntry:
    entry = LedgerEntry(created_at=_recording_time.get() or utcnow(), **values)
    session.add(entry)
    session.flush()
    return entry


def refresh_flag(session: Session, account: Account, *, now: datetime | None = None) -> None:
    """Flag an account while a dispute is open or its balance is negative."""
    reasons = []
    if account.open_disputes > 0:
        reasons.append("open dispute")
    if balance(session, account.user_id, now=now) < 0:
        reasons.append("negative balance")
    flagged, reason = bool(reasons), ", ".join(reasons) or None
    if (account.flagged, account.flag_reason) != (flagged, reason):
        account.flagged, account.flag_reason, account.updated_at = flagged, reason, utcnow()
        session.add(account)
        session.flush()


def _grant(session: Session, account: Account, *, credits: int, kind: str, source_key: str, lot_source: str,
           expires_at: datetime | None = None, now: datetime | None = None, **extra) -> LedgerEntry | None:
    if credits <= 0 or _key_exists(session, source_key):
        return None
    entry = _write(session, user_id=account.user_id, credits=credits, kind=kind, source_key=source_key,
                   lot_key=source_key, lot_source=lot_source, expires_at=expires_at, **extra)
    debt = unlotted_total(session, account.user_id)
    if debt < 0:  # the new lot pays off earlier debt, so the debt can't resurface when the lot expires
        settled = min(-debt, credits)
        _write(session, user_id=account.user_id, credits=-settled, kind="debt_settlement",
               source_key=f"{source_key}:settles-debt", lot_key=source_key)
        _write(session, user_id=account.user_id, credits=settled, kind="debt_settlement",
               source_key=f"{source_key}:debt-settled", lot_key=None)
    refresh_flag(session, account, now=now)
    return entry


def _draw(session: Session, account: Account, *, credits: int, kind: str, key_prefix: str, open_lots: list[Lot],
          allow_debt: bool, **extra) -> list[LedgerEntry]:
    """Take `credits` from the lots in the given order; what they can't cover becomes debt."""
    written, left = [], credits
    for number, lot in enumerate(open_lots):
        if left <= 0:
            break
        take = min(lot.remaining, left)
        written.append(_write(session, user_id=account.user_id, credits=-take, kind=kind,
                              source_key=f"{key_prefix}:{number}", lot_key=lot.key, **extra))
        left -= take
    if left > 0:
        if not allow_debt:
            raise InsufficientCredits(f"insufficient credits: {credits} needed, {credits - left} available")
        written.append(_write(session, user_id=account.user_id, credits=-left, kind=kind,
                              source_key=f"{key_prefix}:debt", lot_key=None, **extra))
    return written


def grant_pack(session: Session, *, user_id: str, credits: int, source_key: str, payment_id: int | None = None,
               now: datetime | None = None) -> LedgerEntry | None:
    """Pack credits never expire. Returns None when this source key was already applied."""
    account = lock_account(session, user_id=user_id)
    return _grant(session, account, credits=credits, kind="pack_grant", source_key=source_key,
                  lot_source="pack", payment_id=payment_id, now=now)


def grant_subscription_period(session: Session, *, user_id: str, subscription_id: str, period_end: int, tier: str,
                              source_key: str, payment_id: int | None = None,
                              now: datetime | None = None) -> LedgerEntry | None:
    """A paid period's allowance for its tier, once per subscription and period.

    Upgrades are separate lots (`grant_upgrade_topup`), so the base grant and the top-ups add up to the
    highest tier's allowance whichever order the invoice and the subscription events arrive in.
    """
    account = lock_account(session, user_id=user_id)
    if _key_exists(session, source_key):
        return None
    return _grant_for_period(session, account, slice_=(0, allowance(tier)), kind="subscription_grant",
                             source_key=source_key, subscription_id=subscription_id, period_end=period_end,
                             payment_id=payment_id, now=now)


def grant_upgrade_topup(session: Session, *, user_id: str, subscription_id: str, period_end: int, from_tier: str,
                        to_tier: str, source_key: str, payment_id: int | None = None, claims_lot: str | None = None,
                        now: datetime | None = None) -> LedgerEntry | None:
    """An upgrade mid-period: the difference between the new and the old allowance, once per subscription
    and period, whichever event reports it (the subscription event or the proration invoice). Credits
    already granted for the period count, so a second report, or a move back up after a downgrade, adds
    nothing. A paying invoice names the lot a subscription event granted first (`claims_lot`) and claims
    it, so refunding or disputing the upgrade takes those credits back."""
    account = lock_account(session, user_id=user_id)
    if _key_exists(session, source_key):
        return None
    if payment_id is not None and claims_lot:
        _claim_unpaid_lot(session, account, lot_key=claims_lot, payment_id=payment_id)
    return _grant_for_period(session, account, slice_=(allowance(from_tier), allowance(to_tier)),
                             kind="upgrade_topup", source_key=source_key, subscription_id=subscription_id,
                             period_end=period_end, payment_id=payment_id, now=now)


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


def _grant_for_period(session: Session, account: Account, *, slice_: tuple[int, int], kind: str, source_key: str,
                      subscription_id: str, period_end: int, payment_id: int | None,
                      now: datetime | None) -> LedgerEntry | None:
    """A subscription lot for the part of the allowance slice that no earlier grant of the period covers,
    expiring with its period; it closes the subscription's earlier periods."""
    covered = session.execute(select(LedgerEntry.allowance_from, LedgerEntry.allowance_to).where(
        LedgerEntry.user_id == account.user_id, LedgerEntry.subscription_id == subscription_id,
        LedgerEntry.period_end == period_end, LedgerEntry.kind.in_(SUBSCRIPTION_GRANT_KINDS),
        LedgerEntry.allowance_from.is_not(None))).all()
    credits = _uncovered(slice_, [(int(a), int(b)) for a, b in covered])
    if credits <= 0:
        return None
    now = now or utcnow()
    user_id = account.user_id
    rollover = get_settings().subscription_credits_rollover
    if not rollover:
        earlier = [lot for lot in lots(session, user_id)
                   if lot.source == "subscription" and lot.subscription_id == subscription_id
                   and lot.period_end is not None and lot.period_end < period_end and not lot.closed(now)]
        _expire(session, account, earlier, reason="next period's credits granted")
    return _grant(session, account, credits=credits, kind=kind, source_key=source_key, lot_source="subscription",
                  expires_at=None if rollover else from_epoch(period_end), subscription_id=subscription_id,
                  period_end=period_end, payment_id=payment_id, now=now,
                  allowance_from=slice_[0], allowance_to=slice_[1])


def _expire(session: Session, account: Account, to_close: list[Lot], *, reason: str) -> int:
    """Close lots at once; a zero-credit marker still closes a lot that is empty right now."""
    total = 0
    for lot in to_close:
        key = f"expire:{lot.key}"
        if lot.expired_marks or _key_exists(session, key):
            continue
        _write(session, user_id=account.user_id, credits=-max(lot.remaining, 0), kind="expire", source_key=key,
               lot_key=lot.key, subscription_id=lot.subscription_id, reason=reason)
        total += max(lot.remaining, 0)
    return total


def expire_subscription_credits(session: Session, *, user_id: str, subscription_id: str, reason: str,
                                now: datetime | None = None) -> int:
    """Cancellation: the subscription's remaining credits expire at once; packs stay."""
    account = lock_account(session, user_id=user_id)
    now = now or utcnow()
    to_close = [lot for lot in lots(session, user_id)
                if lot.source == "subscription" and lot.subscription_id == subscription_id and not lot.closed(now)]
    total = _expire(session, account, to_close, reason=reason)
    refresh_flag(session, account, now=now)
    return total


def _claim_unpaid_lot(session: Session, account: Account, *, lot_key: str, payment_id: int) -> None:
    """Tie a lot granted without a payment to the invoice that paid for it: a zero-credit entry in the lot,
    written once per lot."""
    key = f"paid-by:{lot_key}"
    grant = session.execute(select(LedgerEntry).where(LedgerEntry.source_key == lot_key,
                                                      LedgerEntry.user_id == account.user_id)).scalars().first()
    if grant is None or grant.payment_id is not None or grant.lot_source != "subscription" or _key_exists(session, key):
        return
    _write(session, user_id=account.user_id, credits=0, kind="payment_link", source_key=key, lot_key=lot_key,
           payment_id=payment_id, subscription_id=grant.subscription_id, period_end=grant.period_end)


def _payment_lots(session: Session, payment: Payment) -> list[Lot]:
    """The lots a payment paid for: granted with it, or claimed by it later (`payment_link`)."""
    claimed = set(session.execute(select(LedgerEntry.lot_key).where(
        LedgerEntry.user_id == payment.user_id, LedgerEntry.kind == "payment_link",
        LedgerEntry.payment_id == payment.id)).scalars())
    return [lot for lot in lots(session, payment.user_id) if lot.payment_id == payment.id or lot.key in claimed]


def credits_paid_by(session: Session, payment: Payment) -> int:
    """What a payment granted, counting lots it claimed after a subscription event granted them."""
    if not payment.user_id:
        return 0
    return sum(lot.granted for lot in _payment_lots(session, payment))


def clawback_for_payment(session: Session, *, payment: Payment, reversed_cents: int,
                         now: datetime | None = None) -> int:
    """Take back a payment's credits in proportion to the amount reversed (refunded or lost in a dispute).

    Idempotent on the cumulative reversed amount: a late event reporting less takes nothing more.
    Credits of the payment that already expired unused are not taken twice.
    """
    if not payment.user_id or payment.amount_cents <= 0:
        return 0
    account = lock_account(session, user_id=payment.user_id)
    now = now or utcnow()
    payment_lots = _payment_lots(session, payment)
    granted = sum(lot.granted for lot in payment_lots)
    if granted <= 0:
        return 0
    reversed_cents = max(0, min(reversed_cents, payment.amount_cents))
    target = (granted * reversed_cents * 2 + payment.amount_cents) // (2 * payment.amount_cents)
    expired_unused = sum(max(lot.remaining, 0) for lot in payment_lots if lot.closed(now))
    expired_unused += -int(session.execute(select(func.coalesce(func.sum(LedgerEntry.credits), 0)).where(
        LedgerEntry.user_id == payment.user_id, LedgerEntry.kind == "expire",
        LedgerEntry.lot_key.in_([lot.key for lot in payment_lots]))).scalar_one())
    # Credits a dispute held in a lot that closed meanwhile expired unused too (never released).
    expired_unused += -int(session.execute(select(func.coalesce(func.sum(LedgerEntry.credits), 0)).where(
        LedgerEntry.user_id == payment.user_id, LedgerEntry.kind.in_(("dispute_hold", "dispute_release")),
        LedgerEntry.lot_key.in_([lot.key for lot in payment_lots if lot.closed(now)]))).scalar_one())
    target = min(target, granted - expired_unused)
    already = -int(session.execute(select(func.coalesce(func.sum(LedgerEntry.credits), 0)).where(
        LedgerEntry.payment_id == payment.id, LedgerEntry.kind == "clawback")).scalar_one())
    delta = target - already
    if delta <= 0:
        return 0
    open_lots = sorted((lot for lot in payment_lots if lot.remaining > 0 and not lot.closed(now)), key=_spend_order)
    free = sum(lot.remaining for lot in open_lots)
    if delta > free:  # a dispute holds the credits being reversed: take them from the hold, not as debt
        _unhold(session, account, payment_lots=payment_lots, credits=delta - free, now=now,
                key_suffix=f"clawback:{payment.id}:{target}")
        open_lots = sorted((lot for lot in _payment_lots(session, payment) if lot.remaining > 0 and not lot.closed(now)),
                           key=_spend_order)
    _draw(session, account, credits=delta, kind="clawback", key_prefix=f"clawback:{payment.id}:{target}",
          open_lots=open_lots, allow_debt=True, payment_id=payment.id,
          reason=f"{reversed_cents} of {payment.amount_cents} {payment.currency} reversed")
    refresh_flag(session, account, now=now)
    return delta


def _held(session: Session, *, user_id: str, lot_keys: list[str]) -> list[tuple[str, str, int, int | None]]:
    """(dispute id, lot key, credits still held, payment id) for every hold not yet given back."""
    if not lot_keys:
        return []
    rows = session.execute(
        select(LedgerEntry.reference, LedgerEntry.lot_key, func.sum(LedgerEntry.credits), func.max(LedgerEntry.payment_id))
        .where(LedgerEntry.user_id == user_id, LedgerEntry.kind.in_(("dispute_hold", "dispute_release")),
               LedgerEntry.lot_key.in_(lot_keys))
        .group_by(LedgerEntry.reference, LedgerEntry.lot_key)
        .order_by(LedgerEntry.reference, LedgerEntry.lot_key)).all()
    return [(dispute_id, lot_key, -int(net), payment_id) for dispute_id, lot_key, net, payment_id in rows if net < 0]


def _unhold(session: Session, account: Account, *, payment_lots: list[Lot], credits: int, now: datetime,
            key_suffix: str) -> None:
    """Give back up to `credits` of what open disputes hold in these lots, so a reversal can take them.

    A refund delivered after a dispute opened on the rest of the payment must end as if it had come first
    (the dispute then held only what the refund left): the clawback takes from the hold, not as debt."""
    open_keys = [lot.key for lot in payment_lots if not lot.closed(now)]
    for dispute_id, lot_key, held, payment_id in _held(session, user_id=account.user_id, lot_keys=open_keys):
        if credits <= 0:
            break
        take = min(held, credits)
        _write(session, user_id=account.user_id, credits=take, kind="dispute_release", lot_key=lot_key,
               source_key=f"dispute_release:{dispute_id}:{lot_key}:{key_suffix}", payment_id=payment_id,
               reference=dispute_id, reason="reversed while held: taken from the hold")
        credits -= take


def hold_for_dispute(session: Session, *, dispute_id: str, payment: Payment, now: datetime | None = None) -> int:
    """Freeze what is left of a disputed payment's credits and flag the account."""
    account = lock_account(session, user_id=payment.user_id)
    now = now or utcnow()
    held = 0
    for lot in _payment_lots(session, payment):
        key = f"dispute_hold:{dispute_id}:{lot.key}"
        if lot.remaining > 0 and not lot.closed(now) and not _key_exists(session, key):
            _write(session, user_id=account.user_id, credits=-lot.remaining, kind="dispute_hold", source_key=key,
                   lot_key=lot.key, payment_id=payment.id, reference=dispute_id)
            held += lot.remaining
    return held


def release_dispute_hold(session: Session, *, dispute_id: str, user_id: str, now: datetime | None = None) -> int:
    """Give back what a dispute held, into lots that are still open."""
    lock_account(session, user_id=user_id)
    now = now or utcnow()
    open_keys = {lot.key for lot in lots(session, user_id) if not lot.closed(now)}
    held = [row for row in _held(session, user_id=user_id, lot_keys=sorted(open_keys)) if row[0] == dispute_id]
    released = 0
    for _dispute_id, lot_key, credits, payment_id in held:  # net of what a reversal already took from the hold
        key = f"dispute_release:{dispute_id}:{lot_key}"
        if not _key_exists(session, key):
            _write(session, user_id=user_id, credits=credits, kind="dispute_release", source_key=key,
                   lot_key=lot_key, payment_id=payment_id, reference=dispute_id)
            released += credits
    return released


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
    now = now or utcnow()
    source_key = source_key or f"adjust:{uuid.uuid4()}"
    account = lock_account(session, user_id=user_id)
    if any(_key_exists(session, key) for key in (source_key, f"{source_key}:0", f"{source_key}:debt")):
        return []
    if credits > 0:
        entry = _grant(session, account, credits=credits, kind="adjustment", source_key=source_key,
                       lot_source="adjustment", operator=operator, reason=reason, now=now)
        return [entry] if entry else []
    current = balance(session, account.user_id, now=now)
    if current + credits < 0 and not allow_negative:
        raise WouldGoNegative(f"adjustment of {credits} would take the balance of {account.user_id} "
                              f"from {current} below zero; allow a negative balance explicitly to do this")
    written = _draw(session, account, credits=-credits, kind="adjustment", key_prefix=source_key,
                    open_lots=_open_lots(session, account.user_id, now, spendable_only=False),
                    allow_debt=True, operator=operator, reason=reason)
    refresh_flag(session, account, now=now)
    return written


def consume(session: Session, *, user_id: str, credits: int, reference: str,
            now: datetime | None = None) -> ConsumeResult:
    """The DevOps Agent spends credits: atomic, and once per (user, reference)."""
    credits = check_credits(credits, allow_negative=False)
    if not (isinstance(reference, str) and reference.strip()):
        raise LedgerError("a reference is required so a retried spend is not applied twice")
    reference = check_text(reference, what="the reference", max_length=MAX_REFERENCE_LENGTH)
    now = now or utcnow()
    account = lock_account(session, user_id=user_id, create=False)
    if account is None:
        raise UnknownAccount(f"insufficient credits: {check_user_id(user_id)} has no account (balance 0)")
    done = session.exec(select(Consumption).where(Consumption.user_id == account.user_id,
                                                  Consumption.reference == reference)).scalars().first()
    if done is not None:
        if done.credits != credits:
            raise ReferenceConflict(f"reference {reference!r} was already used to spend {done.credits} credits, "
                                    f"not {credits}")
        return ConsumeResult(account.user_id, done.credits, reference, done.balance_after, done.spendable_after,
                             replayed=True)
    if account.flagged:
        raise AccountFlagged(f"account {account.user_id} is flagged ({account.flag_reason}); spending is paused")
    available = spendable_balance(session, account.user_id, now=now, flagged=False)
    if credits > available:
        raise InsufficientCredits(f"insufficient credits: {credits} requested, {available} spendable")
    _draw(session, account, credits=credits, kind="spend", key_prefix=f"spend:{_digest(account.user_id, reference)}",
          open_lots=_open_lots(session, account.user_id, now, spendable_only=True), allow_debt=False,
          reference=reference)
    refresh_flag(session, account, now=now)
    result = ConsumeResult(account.user_id, credits, reference, balance(session, account.user_id, now=now),
                           spendable_balance(session, account.user_id, now=now))
    session.add(Consumption(user_id=account.user_id, reference=reference, credits=credits,
                            balance_after=result.balance, spendable_after=result.spendable_balance,
                            created_at=now))
    session.flush()
    return result


# --- plan changes (billing_core/plan_changes.py decides; these write) ------------------------------

DOWNGRADE_TAKEBACK = "downgrade_takeback"


def _period_lots(session: Session, *, user_id: str, subscription_id: str, period_end: int, now: datetime) -> list[Lot]:
    return sorted((lot for lot in lots(session, user_id)
                   if lot.source == "subscription" and lot.subscription_id == subscription_id
                   and lot.period_end == period_end and lot.remaining > 0 and not lot.closed(now)), key=_spend_order)


def period_unspent(session: Session, *, user_id: str, subscription_id: str, period_end: int,
                   now: datetime | None = None) -> int:
    """A subscription period's credits still unspent (in its open lots; frozen ones count, held ones don't)."""
    now = now or utcnow()
    return sum(lot.remaining for lot in _period_lots(session, user_id=user_id, subscription_id=subscription_id,
                                                     period_end=period_end, now=now))


def grant_plan_change_topup(session: Session, *, user_id: str, subscription_id: str, period_end: int, credits: int,
                            source_key: str, payment_id: int | None, expires_at: datetime | None,
                            now: datetime | None = None) -> LedgerEntry | None:
    """An upgrade's top-up for the rest of its period, once per source key, tied to the payment of the invoice
    that carried its proration (so refunding that invoice takes it back). A subscription lot of that period,
    expiring at `expires_at` (never with SUBSCRIPTION_CREDITS_ROLLOVER)."""
    account = lock_account(session, user_id=user_id)
    if get_settings().subscription_credits_rollover:
        expires_at = None
    return _grant(session, account, credits=credits, kind="upgrade_topup", source_key=source_key,
                  lot_source="subscription", expires_at=expires_at, subscription_id=subscription_id,
                  period_end=period_end, payment_id=payment_id, now=now)


def take_back_for_downgrade(session: Session, *, user_id: str, subscription_id: str, period_end: int, credits: int,
                            source_key: str, reason: str, now: datetime | None = None) -> int:
    """Take up to `credits` from the period's unspent subscription credits (never packs or adjustments, never
    into debt); what was taken. Once per source key."""
    account = lock_account(session, user_id=user_id)
    now = now or utcnow()
    if credits <= 0 or _key_exists(session, f"{source_key}:0"):
        return 0
    period_lots = _period_lots(session, user_id=user_id, subscription_id=subscription_id, period_end=period_end,
                               now=now)
    take = min(credits, sum(lot.remaining for lot in period_lots))
    if take <= 0:
        return 0
    _draw(session, account, credits=take, kind=DOWNGRADE_TAKEBACK, key_prefix=source_key, open_lots=period_lots,
          allow_debt=False, subscription_id=subscription_id, period_end=period_end, reason=reason)
    refresh_flag(session, account, now=now)
    return take
