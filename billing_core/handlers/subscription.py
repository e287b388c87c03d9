"""Subscription events: tier, status, period; newer snapshots only. A price change inside the period is a plan
change (plan_changes: a downgrade takes back at once, an upgrade waits for its paid proration); a second live
subscription for a user grants nothing and waits for a person."""
from __future__ import annotations

from sqlmodel import Session

from .. import ledger, plan_changes
from ..catalog import CatalogItem
from ..models import Subscription, utcnow
from ..second_subscription import second_subscription_reason
from ..settings import Settings
from ..stripe_payloads import (NeedsAttention, as_text, id_of, metadata_user, previous_period_end,
                               previous_subscription_price, required_id, subscription_period_end,
                               subscription_period_start, subscription_price)
from .common import (EventContext, Handled, ensure_account, plan_for_price_object, reread_after_lock,
                     resolve_user)

# On equal snapshot times, the status that is further along wins (a cancellation beats everything).
STATUS_RANK = {"incomplete": 0, "incomplete_expired": 1, "trialing": 2, "active": 3, "paused": 4,
               "past_due": 4, "unpaid": 5, "canceled": 9}
UPGRADABLE_STATUSES = ("active", "trialing")


def refuse_second_subscription(session: Session, *, user_id: str, subscription_id: str) -> None:
    """One plan per user: a second live subscription's events wait for a person, naming both subscriptions."""
    reason = second_subscription_reason(session, user_id=user_id, subscription_id=subscription_id)
    if reason:
        raise NeedsAttention(reason, user_id=user_id)


def _newer(row: Subscription, *, created: int, status: str) -> bool:
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
    if not deleted:
        refuse_second_subscription(session, user_id=user_id, subscription_id=subscription_id)
    price_id, plan, period_end = _subscription_facts(sub, ctx.settings)
    if plan is None and not deleted:
        raise NeedsAttention(f"subscription {subscription_id} has price {price_id!r}, which is not a configured "
                             "plan price")
    status = "canceled" if deleted else (as_text(sub.get("status"), what="subscription status", max_len=40)
                                         or "incomplete")
    row = session.get(Subscription, subscription_id)
    if row is not None:
        reread_after_lock(session, row)
    previous_end = row.current_period_end if row is not None else None
    applied = row is None or deleted or _newer(row, created=ctx.created, status=status)
    if row is None:
        row = Subscription(id=subscription_id, user_id=user_id, state_at=0)
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
        row.updated_at = utcnow()
        session.add(row)
        session.flush()
    if deleted:
        ledger.expire_subscription_credits(session, user_id=row.user_id, subscription_id=subscription_id,
                                           reason="subscription canceled")
    elif ctx.type == "customer.subscription.updated" and row.status not in ("canceled", "incomplete_expired"):
        _note_plan_change(session, ctx, row=row, plan=plan, period_end=period_end, previous_end=previous_end)
    return Handled(user_id=row.user_id)


def _note_plan_change(session: Session, ctx: EventContext, *, row: Subscription, plan: CatalogItem,
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
