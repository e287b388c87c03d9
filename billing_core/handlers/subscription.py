"""Subscription events: tier, status, period end; newer snapshots only. An upgrade mid-period tops up."""
from __future__ import annotations

from sqlmodel import Session

from .. import ledger
from ..catalog import CatalogItem, allowance
from ..models import Subscription, utcnow
from ..settings import Settings
from ..stripe_payloads import (NeedsAttention, as_text, id_of, metadata_user, previous_period_end,
                               previous_subscription_price, required_id, subscription_period_end, subscription_price)
from .common import (EventContext, Handled, ensure_account, plan_for_price_object, reread_after_lock,
                     resolve_user)

# On equal snapshot times, the status that is further along wins (a cancellation beats everything).
STATUS_RANK = {"incomplete": 0, "incomplete_expired": 1, "trialing": 2, "active": 3, "paused": 4,
               "past_due": 4, "unpaid": 5, "canceled": 9}
UPGRADABLE_STATUSES = ("active", "trialing")


def upgrade_key(subscription_id: str, period_end: int, tier: str) -> str:
    """The source key of an upgrade reported by a subscription event; its proration invoice claims that lot."""
    return f"upgrade:{subscription_id}:{period_end}:{tier}"


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
    price_id, plan, period_end = _subscription_facts(sub, ctx.settings)
    if plan is None and not deleted:
        raise NeedsAttention(f"subscription {subscription_id} has price {price_id!r}, which is not a configured "
                             "plan price")
    status = "canceled" if deleted else (as_text(sub.get("status"), what="subscription status", max_len=40)
                                         or "incomplete")
    row = session.get(Subscription, subscription_id)
    if row is not None:
        reread_after_lock(session, row)
    previous_tier = row.tier if row is not None else None
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
        row.current_period_end = max(row.current_period_end or 0, period_end or 0) or None
        row.cancel_at_period_end = bool(sub.get("cancel_at_period_end"))
        row.state_at = max(row.state_at or 0, ctx.created)
        row.updated_at = utcnow()
        session.add(row)
        session.flush()
    if deleted:
        ledger.expire_subscription_credits(session, user_id=row.user_id, subscription_id=subscription_id,
                                           reason="subscription canceled")
    elif ctx.type == "customer.subscription.updated":
        _upgrade_topup(session, ctx, row=row, plan=plan, status=status, period_end=period_end,
                       previous_tier=previous_tier if applied else None, previous_end=previous_end)
    return Handled(user_id=row.user_id)


def _upgrade_topup(session: Session, ctx: EventContext, *, row: Subscription, plan: CatalogItem, status: str,
                   period_end: int | None, previous_tier: str | None, previous_end: int | None) -> None:
    """A move to a higher tier mid-period tops the period up by the difference (once per period)."""
    old_plan = plan_for_price_object(previous_subscription_price(ctx.previous_attributes), ctx.settings)
    old_tier = old_plan.key if old_plan else previous_tier
    old_period_end = previous_period_end(ctx.previous_attributes) or previous_end
    if old_period_end and period_end and old_period_end < period_end:
        return  # a plan change taking effect at renewal: the renewal invoice grants the new allowance
    if (not period_end or not old_tier or allowance(old_tier) <= 0 or allowance(plan.key) <= allowance(old_tier)
            or status not in UPGRADABLE_STATUSES or row.status in ("canceled", "incomplete_expired")):
        return
    ledger.grant_upgrade_topup(session, user_id=row.user_id, subscription_id=row.id, period_end=period_end,
                               from_tier=old_tier, to_tier=plan.key,
                               source_key=upgrade_key(row.id, period_end, plan.key),
                               rollover=ctx.settings.subscription_credits_rollover)
