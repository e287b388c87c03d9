"""Mid-period plan changes: each change once, its credits following the money (rules in README "Plan changes").

A change is reported by `customer.subscription.updated` (the price changed, the period did not) and by the
invoice carrying its proration (at once with `always_invoice`, on the next invoice with pending prorations).
Whichever arrives first records a `plan_change` row and fixes its credits (`proration.py`); the other finds
that row again by subscription, period, plans and change time (within MATCH_SECONDS; the closest row not yet
reported by that kind of source), so redeliveries, the invoice's second event type and either order all land
on one row.

- An upgrade's top-up is granted when the invoice carrying its proration is paid (`payment_id` set), once.
- A downgrade's take-back is taken at once, from the period's unspent subscription credits. What it could not
  take (those credits were spent, or not granted yet: the period's base invoice or an upgrade's paid
  proration arriving after the downgrade) is taken from the period's subscription credits that arrive later:
  Stripe has already credited the customer for that time, so those later credits are paid with that money.
  This makes the end result the same in every order of the events. Spent credits are never taken back, and
  pack and adjustment credits are never touched.

Every ledger entry carries a source key `plan-change:<row id>:...`; the handlers call this module inside the
event's write transaction, after locking the account, so concurrent events of one user queue up.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction
from typing import Callable

from sqlalchemy import bindparam, select
from sqlmodel import Session

from . import ledger
from .catalog import CatalogItem, allowance
from .models import PlanChange, from_epoch, utcnow
from .prepared import Prepared
from .proration import (ProrationError, ProrationLine, change_credits, fraction_at, fraction_from_lines,
                        is_proration, line_price_id)

MATCH_SECONDS = 300  # a subscription event's `created` and the proration's date are the same request, seconds apart
UNKNOWN_FRACTION = "unknown"


@dataclass(frozen=True)
class ReportedChange:
    subscription_id: str
    period_end: int
    changed_at: int
    from_tier: str
    to_tier: str
    fraction: Fraction | None  # None: this report can't tell (a later one may)
    period_start: int | None = None

    @property
    def is_upgrade(self) -> bool:
        return allowance(self.to_tier) > allowance(self.from_tier)


def from_subscription_event(*, subscription_id: str, changed_at: int, period_start: int | None, period_end: int,
                            from_tier: str, to_tier: str) -> ReportedChange | None:
    """A price change inside the current period, as `customer.subscription.updated` reports it."""
    if from_tier == to_tier or allowance(from_tier) <= 0 or allowance(to_tier) <= 0:
        return None
    fraction = None
    if period_start and period_start < period_end:
        fraction = fraction_at(changed_at=changed_at, period_start=period_start, period_end=period_end)
    return ReportedChange(subscription_id, period_end, changed_at, from_tier, to_tier, fraction, period_start)


def from_invoice(invoice: dict, *, subscription_id: str, plan_of_line: Callable[[dict], CatalogItem | None],
                 known_period: tuple[int, int] | None) -> list[ReportedChange]:
    """The changes an invoice's proration lines carry: per change (lines sharing a period), the plan credited
    for unused time and the plan charged for the remaining time. `known_period`: the subscription's current
    (start, end) as stored; its start makes the fraction exact for a change in that period."""
    by_change: dict[tuple[int, int], list[tuple[ProrationLine, CatalogItem]]] = {}
    for line, plan in _proration_lines_with_plans(invoice, plan_of_line):
        by_change.setdefault((line.period_start, line.period_end), []).append((line, plan))
    reported = []
    for (changed_at, period_end), group in sorted(by_change.items()):
        credited = [pair for pair in group if pair[0].is_credit]
        charged = [pair for pair in group if not pair[0].is_credit]
        if not credited or not charged:
            continue  # not a change of plan (a quantity change, a lone credit)
        old = min(credited, key=lambda pair: pair[0].amount)[1]
        new = max(charged, key=lambda pair: pair[0].amount)[1]
        if old.key == new.key:
            continue
        start = known_period[0] if known_period and known_period[1] == period_end else None
        try:
            fraction = fraction_from_lines([line for line, _plan in group], period_start=start)
        except ProrationError:
            fraction = None
        if all(line.amount == 0 for line, _plan in charged):  # nothing charged (a trial): nothing to top up
            fraction = Fraction(0)
        reported.append(ReportedChange(subscription_id, period_end, changed_at, old.key, new.key, fraction, start))
    return reported


def _proration_lines_with_plans(invoice: dict, plan_of_line: Callable[[dict], CatalogItem | None]
                                ) -> list[tuple[ProrationLine, CatalogItem]]:
    """Each proration line whose plan is known, with the plan's whole-period amount as its full price."""
    raw = invoice.get("lines", {}).get("data") if isinstance(invoice.get("lines"), dict) else None
    found = []
    for line in raw if isinstance(raw, list) else []:
        if not isinstance(line, dict) or not is_proration(line):
            continue
        plan = plan_of_line(line)
        amount, period = line.get("amount"), line.get("period") or {}
        if plan is None or not isinstance(amount, int) or isinstance(amount, bool):
            continue
        if not isinstance(period.get("start"), int) or not isinstance(period.get("end"), int):
            continue
        quantity = line.get("quantity") if isinstance(line.get("quantity"), int) and line["quantity"] > 0 else 1
        found.append((ProrationLine(line_price_id(line), amount, period["start"], period["end"],
                                    plan.amount_cents * quantity), plan))
    return found


def _candidates(session: Session, change: ReportedChange) -> list[PlanChange]:
    stmt = (select(PlanChange).where(PlanChange.subscription_id == change.subscription_id,
                                     PlanChange.period_end == change.period_end,
                                     PlanChange.from_tier == change.from_tier, PlanChange.to_tier == change.to_tier,
                                     PlanChange.changed_at >= change.changed_at - MATCH_SECONDS,
                                     PlanChange.changed_at <= change.changed_at + MATCH_SECONDS))
    return list(session.execute(stmt).scalars())


def _closest(rows: list[PlanChange], changed_at: int) -> PlanChange | None:
    return min(rows, key=lambda row: (abs(row.changed_at - changed_at), row.id), default=None)


def _find(session: Session, change: ReportedChange, *, event_id: str | None, invoice_id: str | None
          ) -> PlanChange | None:
    rows = _candidates(session, change)
    if event_id:
        done = [row for row in rows if row.event_id == event_id]
        return done[0] if done else _closest([row for row in rows if row.event_id is None], change.changed_at)
    done = [row for row in rows if row.invoice_id == invoice_id]
    return _closest(done, change.changed_at) or _closest([row for row in rows if row.invoice_id is None],
                                                         change.changed_at)


def _credits(change: ReportedChange) -> int:
    if change.fraction is None:
        return 0
    return change_credits(old_allowance=allowance(change.from_tier), new_allowance=allowance(change.to_tier),
                          fraction=change.fraction, unspent=ledger.MAX_CREDITS)


def record(session: Session, change: ReportedChange, *, user_id: str, event_id: str | None = None,
           invoice_id: str | None = None, payment_id: int | None = None, expires_at: datetime | None = None,
           rollover: bool = False) -> PlanChange:
    """Record one report of a change (a subscription event's `event_id`, or an invoice's `invoice_id` and,
    once paid, `payment_id`) and apply what is due. `expires_at`: when a top-up paid by this invoice ends
    (the later of its period's end and the end of the period the paying invoice opens); `rollover`
    (SUBSCRIPTION_CREDITS_ROLLOVER): top-ups never expire."""
    row = _find(session, change, event_id=event_id, invoice_id=invoice_id)
    if row is None:
        row = PlanChange(user_id=user_id, subscription_id=change.subscription_id, period_end=change.period_end,
                         period_start=change.period_start, changed_at=change.changed_at, from_tier=change.from_tier,
                         to_tier=change.to_tier, credits=_credits(change), applied=0,
                         fraction=_fraction_text(change.fraction))
    elif row.fraction == UNKNOWN_FRACTION and change.fraction is not None:
        row.fraction, row.credits = _fraction_text(change.fraction), _credits(change)
    row.event_id = row.event_id or event_id
    row.invoice_id = row.invoice_id or invoice_id
    row.payment_id = row.payment_id or payment_id
    row.period_start = row.period_start or change.period_start
    row.updated_at = utcnow()
    session.add(row)
    session.flush()
    apply(session, row, expires_at=expires_at, rollover=rollover)
    return row


def _fraction_text(fraction: Fraction | None) -> str:
    return UNKNOWN_FRACTION if fraction is None else f"{fraction.numerator}/{fraction.denominator}"


def apply(session: Session, row: PlanChange, *, expires_at: datetime | None = None, rollover: bool = False) -> None:
    """Grant a paid upgrade's top-up, or take a downgrade's take-back (as far as unspent credits allow)."""
    if row.credits > 0 and row.payment_id is not None and row.applied == 0:
        entry = ledger.grant_plan_change_topup(
            session, user_id=row.user_id, subscription_id=row.subscription_id, period_end=row.period_end,
            credits=row.credits, source_key=f"plan-change:{row.id}:topup", payment_id=row.payment_id,
            expires_at=max(from_epoch(row.period_end), expires_at) if expires_at else from_epoch(row.period_end),
            rollover=rollover)
        if entry is not None:
            _set_applied(session, row, row.credits)
            settle_takebacks(session, user_id=row.user_id, subscription_id=row.subscription_id,
                             period_end=row.period_end)
    elif row.credits < 0 and row.applied > row.credits:
        taken = ledger.take_back_for_downgrade(
            session, user_id=row.user_id, subscription_id=row.subscription_id, period_end=row.period_end,
            credits=row.applied - row.credits, source_key=f"plan-change:{row.id}:takeback:{-row.applied}",
            reason=f"downgrade {row.from_tier} -> {row.to_tier} with {row.fraction} of the period left")
        if taken:
            _set_applied(session, row, row.applied - taken)


def _set_applied(session: Session, row: PlanChange, applied: int) -> None:
    row.applied, row.updated_at = applied, utcnow()
    session.add(row)
    session.flush()


_PLAN_CHANGE = PlanChange.__table__
_PENDING_TAKEBACK = (_PLAN_CHANGE.c.user_id == bindparam("user_id"),
                     _PLAN_CHANGE.c.subscription_id == bindparam("subscription_id"),
                     _PLAN_CHANGE.c.period_end == bindparam("period_end"), _PLAN_CHANGE.c.credits < 0,
                     _PLAN_CHANGE.c.applied > _PLAN_CHANGE.c.credits)
# Most periods have no downgrade still owed something: one short indexed read says so.
_ANY_PENDING_TAKEBACK = Prepared(select(_PLAN_CHANGE.c.id).where(*_PENDING_TAKEBACK).limit(1))
_PENDING_TAKEBACKS = (select(PlanChange).where(*_PENDING_TAKEBACK)
                      .order_by(PlanChange.changed_at, PlanChange.id))


def settle_takebacks(session: Session, *, user_id: str, subscription_id: str, period_end: int) -> None:
    """Subscription credits arrived for a period (its base grant, or an upgrade's top-up): its downgrades take
    what they could not take before, earliest first."""
    params = {"user_id": user_id, "subscription_id": subscription_id, "period_end": period_end}
    session.flush()  # the read below is not the ORM's, which would flush first
    if _ANY_PENDING_TAKEBACK.first(session.connection(), params) is None:
        return
    for row in session.execute(_PENDING_TAKEBACKS, params).scalars().all():
        apply(session, row)


def period_changes(session: Session, *, subscription_id: str, period_end: int) -> list[PlanChange]:
    stmt = (select(PlanChange).where(PlanChange.subscription_id == subscription_id,
                                     PlanChange.period_end == period_end)
            .order_by(PlanChange.changed_at, PlanChange.id))
    return list(session.execute(stmt).scalars())


# --- what the webhook handlers call ---------------------------------------------------------------

def note_subscription_update(session: Session, *, user_id: str, subscription_id: str, event_id: str, changed_at: int,
                             old_tier: str | None, new_tier: str, period_start: int | None, period_end: int | None,
                             old_period_end: int | None) -> PlanChange | None:
    """`customer.subscription.updated` with a price change: a change inside the period is recorded (a
    downgrade takes back at once); one taking effect at renewal (the period moved) changes nothing now."""
    if not old_tier or not period_end or (old_period_end and old_period_end < period_end):
        return None
    change = from_subscription_event(subscription_id=subscription_id, changed_at=changed_at,
                                     period_start=period_start, period_end=period_end, from_tier=old_tier,
                                     to_tier=new_tier)
    return record(session, change, user_id=user_id, event_id=event_id) if change else None


def note_invoice(session: Session, *, user_id: str, subscription_id: str, invoice: dict, payment_id: int | None,
                 plan_of_line: Callable[[dict], CatalogItem | None], known_period: tuple[int, int] | None,
                 paid_through: int | None, rollover: bool = False) -> list[PlanChange]:
    """A paid invoice's proration lines: each change on it recorded; upgrades granted (paid), downgrades taken
    back. `paid_through`: the latest period end on the invoice (a top-up paid on a later invoice lasts that long)."""
    found = from_invoice(invoice, subscription_id=subscription_id, plan_of_line=plan_of_line,
                         known_period=known_period)
    expires_at = from_epoch(paid_through) if paid_through else None
    return [record(session, change, user_id=user_id, invoice_id=invoice["id"], payment_id=payment_id,
                   expires_at=expires_at, rollover=rollover) for change in found]
