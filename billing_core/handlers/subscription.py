"""Subscription events: tier, status, period; newer snapshots only. A price change inside the period is a plan
change (plan_changes: a downgrade takes back at once, an upgrade waits for its paid proration); a second live
subscription for a user grants nothing and waits for a person.

The subscription row is read once per event, after the account row is locked (so on PostgreSQL it is read as
another sidecar left it), together with the user's other live subscriptions (second_subscription), and written
back by one statement built at import."""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import bindparam, update
from sqlmodel import Session

from .. import ledger, plan_changes
from ..catalog import CatalogItem
from ..models import Subscription, utcnow
from ..prepared import Prepared
from ..second_subscription import second_subscription_reason, this_and_oldest_other_live
from ..settings import Settings
from ..stripe_payloads import (NeedsAttention, as_text, id_of, metadata_user, previous_period_end,
                               previous_subscription_price, required_id, subscription_period_end,
                               subscription_period_start, subscription_price)
from .common import EventContext, Handled, ensure_account, forget_loaded, plan_for_price_object, resolve_user

# On equal snapshot times, the status that is further along wins (a cancellation beats everything).
STATUS_RANK = {"incomplete": 0, "incomplete_expired": 1, "trialing": 2, "active": 3, "paused": 4,
               "past_due": 4, "unpaid": 5, "canceled": 9}
UPGRADABLE_STATUSES = ("active", "trialing")


@dataclass
class StoredSubscription:
    """A subscription row as this event read it and, once `save`d, as it left it."""
    id: str
    user_id: str
    tier: str = "none"
    price_id: str | None = None
    status: str = "incomplete"
    current_period_start: int | None = None
    current_period_end: int | None = None
    cancel_at_period_end: bool = False
    state_at: int = 0
    stored: bool = False  # False: not in the table yet (save inserts it)


_SUBSCRIPTION = Subscription.__table__
_INSERT = Prepared(_SUBSCRIPTION.insert())
_SNAPSHOT_COLUMNS = ("tier", "price_id", "status", "current_period_start", "current_period_end", "state_at")
_UPDATE_SNAPSHOT = Prepared(update(_SUBSCRIPTION).where(_SUBSCRIPTION.c.id == bindparam("subscription_id")).values(
    **{name: bindparam(name) for name in (*_SNAPSHOT_COLUMNS, "cancel_at_period_end", "updated_at")}))
# A paid invoice moves the period and status; cancel_at_period_end is the subscription events' alone.
_UPDATE_AFTER_PAYMENT = Prepared(update(_SUBSCRIPTION).where(_SUBSCRIPTION.c.id == bindparam("subscription_id"))
                                 .values(**{name: bindparam(name) for name in (*_SNAPSHOT_COLUMNS, "updated_at")}))


def stored_subscription(session: Session, *, subscription_id: str, user_id: str,
                        refuse_second: bool) -> StoredSubscription | None:
    """The subscription's stored row (None when there is none); with `refuse_second`, first the one-plan-per-user
    rule: a second live subscription's events wait for a person, naming both subscriptions."""
    this, other = this_and_oldest_other_live(session, subscription_id=subscription_id, user_id=user_id)
    if refuse_second:
        reason = second_subscription_reason(user_id=user_id, subscription_id=subscription_id,
                                            status=this.status if this is not None else None, other=other)
        if reason:
            raise NeedsAttention(reason, user_id=user_id)
    if this is None:
        return None
    return StoredSubscription(id=this.id, user_id=this.user_id, tier=this.tier, price_id=this.price_id,
                              status=this.status, current_period_start=this.current_period_start,
                              current_period_end=this.current_period_end,
                              cancel_at_period_end=bool(this.cancel_at_period_end), state_at=this.state_at or 0,
                              stored=True)


def save(session: Session, row: StoredSubscription, *, snapshot: bool) -> None:
    """Write the row: insert it when new, else update the columns an event of its kind sets (`snapshot`: a
    subscription event's, cancel_at_period_end included; otherwise a paid invoice's)."""
    connection = session.connection()
    now = utcnow()
    values = {name: getattr(row, name) for name in _SNAPSHOT_COLUMNS}
    if not row.stored:
        _INSERT.run(connection, {**values, "id": row.id, "user_id": row.user_id,
                                 "cancel_at_period_end": row.cancel_at_period_end, "created_at": now,
                                 "updated_at": now})
        row.stored = True
    elif snapshot:
        _UPDATE_SNAPSHOT.run(connection, {**values, "subscription_id": row.id,
                                          "cancel_at_period_end": row.cancel_at_period_end, "updated_at": now})
    else:
        _UPDATE_AFTER_PAYMENT.run(connection, {**values, "subscription_id": row.id, "updated_at": now})
    forget_loaded(session, Subscription, row.id)


def _newer(row: StoredSubscription, *, created: int, status: str) -> bool:
    if created != row.state_at:
        return created > row.state_at
    return STATUS_RANK.get(status, 3) >= STATUS_RANK.get(row.status, 3)


def _subscription_facts(sub: dict, settings: Settings) -> tuple[str | None, CatalogItem | None, int | None]:
    price = subscription_price(sub)
    return id_of(price), plan_for_price_object(price, settings), subscription_period_end(sub)


def on_subscription_changed(session: Session, ctx: EventContext) -> Handled:
    sub = ctx.obj
    subscription_id = required_id(sub, "sub_", "subscription")
    deleted = ctx.type == "customer.subscription.deleted"
    customer_id = id_of(sub.get("customer"))
    user_id = resolve_user(session, ctx, explicit=metadata_user(sub), subscription_id=subscription_id,
                           customer_id=customer_id, what=f"subscription {subscription_id}")
    ensure_account(session, user_id=user_id, stripe_customer_id=customer_id)
    row = stored_subscription(session, subscription_id=subscription_id, user_id=user_id, refuse_second=not deleted)
    price_id, plan, period_end = _subscription_facts(sub, ctx.settings)
    if plan is None and not deleted:
        raise NeedsAttention(f"subscription {subscription_id} has price {price_id!r}, which is not a configured "
                             "plan price")
    status = "canceled" if deleted else (as_text(sub.get("status"), what="subscription status", max_len=40)
                                         or "incomplete")
    previous_end = row.current_period_end if row is not None else None
    applied = row is None or deleted or _newer(row, created=ctx.created, status=status)
    if row is None:
        row = StoredSubscription(id=subscription_id, user_id=user_id)
    if applied:
        row.tier = "none" if deleted else plan.key
        row.price_id = price_id
        row.status = status
        # Periods only move forward. A paid renewal invoice advances the period without advancing state_at
        # (its other fields are not a snapshot), so an older snapshot applied after it must not move it back.
        if period_end and period_end >= (row.current_period_end or 0):
            row.current_period_start = subscription_period_start(sub) or row.current_period_start
        row.current_period_end = max(row.current_period_end or 0, period_end or 0) or None
        row.cancel_at_period_end = bool(sub.get("cancel_at_period_end"))
        row.state_at = max(row.state_at or 0, ctx.created)
        save(session, row, snapshot=True)
    if deleted:
        ledger.expire_subscription_credits(session, user_id=row.user_id, subscription_id=subscription_id,
                                           reason="subscription canceled")
    elif ctx.type == "customer.subscription.updated" and row.status not in ("canceled", "incomplete_expired"):
        _note_plan_change(session, ctx, row=row, plan=plan, period_end=period_end, previous_end=previous_end)
    return Handled(user_id=row.user_id)


def _note_plan_change(session: Session, ctx: EventContext, *, row: StoredSubscription, plan: CatalogItem,
                      period_end: int | None, previous_end: int | None) -> None:
    """A price change reported by previous_attributes: inside the period it is a plan change (credits follow
    the money, see plan_changes); with the period moved it took effect at renewal (the renewal invoice
    grants the new allowance)."""
    old_plan = plan_for_price_object(previous_subscription_price(ctx.previous_attributes), ctx.settings)
    if old_plan is None:
        return
    plan_changes.note_subscription_update(
        session, user_id=row.user_id, subscription_id=row.id, event_id=ctx.id, changed_at=ctx.created,
        old_tier=old_plan.key, new_tier=plan.key, period_start=subscription_period_start(ctx.obj),
        period_end=period_end, old_period_end=previous_period_end(ctx.previous_attributes) or previous_end)
