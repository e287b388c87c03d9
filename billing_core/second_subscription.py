"""One plan per user: a second live subscription (two plan links both paid, or one made in Stripe's Dashboard)
is found here, and an admin can cancel it and refund its latest payment.

The webhook handlers grant nothing for a second subscription and keep its events as needs-attention with
a reason naming both subscriptions. This module asks Stripe (not the database) which of the user's
subscriptions are live, because the second one's events were not applied: the candidates are the
subscriptions we stored for the user and those named by the user's needs-attention events.

Cancelling and refunding is idempotent: the cancellation is skipped when Stripe already shows the
subscription canceled by this action (its `cancellation_details.comment`), and the refund carries an
idempotency key derived from the subscription id, so a second click or a retry after a failure finishes
the job without refunding twice.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import stripe
from sqlalchemy import and_, bindparam, or_, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from . import db, ledger
from .models import StripeEvent, Subscription
from .prepared import Prepared, literal_in
from .settings import Settings
from .stripe_client import make_stripe_client, stripe_errors

LIVE_STATUSES = ("active", "trialing", "past_due", "unpaid", "incomplete")
COMMENT_PREFIX = "second live subscription of"
WATCHED_TYPES = ("customer.subscription.created", "customer.subscription.updated", "invoice.paid",
                 "invoice.payment_succeeded")


class SecondSubscriptionError(ValueError):
    """Nothing to cancel, or not allowed; the message says why."""


@dataclass(frozen=True)
class LiveSubscription:
    id: str
    created: int
    status: str
    customer: str | None
    latest_invoice: str | None


@dataclass(frozen=True)
class CancelResult:
    subscription_id: str
    kept_subscription_id: str | None
    canceled_now: bool  # False when an earlier click already canceled it
    refund_id: str | None
    refunded_cents: int
    currency: str | None
    note: str

    def message(self) -> str:
        canceled = "canceled" if self.canceled_now else "was already canceled"
        kept = f"; {self.kept_subscription_id} is kept" if self.kept_subscription_id else ""
        return f"{self.subscription_id} {canceled}{kept}; {self.note}"


def _subscription_of(payload: dict) -> tuple[str | None, str | None]:
    """(subscription id, metadata user id) named by a subscription or invoice event's object."""
    obj = (payload.get("data") or {}).get("object") or {}
    if obj.get("object") == "subscription":
        return obj.get("id"), (obj.get("metadata") or {}).get("user_id")
    details = (obj.get("parent") or {}).get("subscription_details") or {}
    subscription = details.get("subscription") or obj.get("subscription")
    user_id = (details.get("metadata") or {}).get("user_id") or (obj.get("metadata") or {}).get("user_id")
    return (subscription if isinstance(subscription, str) else None), user_id


def candidate_subscription_ids(session: Session, *, user_id: str) -> list[str]:
    """The user's stored subscriptions, then those named by needs-attention events for the user."""
    found = list(session.execute(select(Subscription.id).where(Subscription.user_id == user_id)
                                 .order_by(Subscription.created_at)).scalars())
    events = session.execute(select(StripeEvent.payload, StripeEvent.user_id).where(
        StripeEvent.status == "needs_attention", StripeEvent.type.in_(WATCHED_TYPES))
        .order_by(StripeEvent.created)).all()
    for payload, event_user in events:
        try:
            subscription_id, named_user = _subscription_of(json.loads(payload))
        except (ValueError, AttributeError):
            continue
        if subscription_id and user_id in (event_user, named_user) and subscription_id not in found:
            found.append(subscription_id)
    return found


def _live(subscription) -> LiveSubscription:
    fields = subscription.to_dict() if hasattr(subscription, "to_dict") else dict(subscription)
    invoice = fields.get("latest_invoice")
    return LiveSubscription(id=fields["id"], created=int(fields.get("created") or 0), status=fields.get("status"),
                            customer=fields.get("customer"),
                            latest_invoice=invoice.get("id") if isinstance(invoice, dict) else invoice)


def _retrieve_all(client, ids: list[str]) -> list:
    found = []
    for subscription_id in ids:
        try:
            found.append(client.v1.subscriptions.retrieve(subscription_id))
        except stripe.InvalidRequestError as exc:
            if exc.code != "resource_missing":
                raise
    return found


def live_subscriptions(*, user_id: str, settings: Settings, engine: Engine, client=None) -> list[LiveSubscription]:
    """The user's subscriptions that Stripe shows live, oldest first."""
    user_id = ledger.check_user_id(user_id)
    with db.read_session(engine) as session:
        ids = candidate_subscription_ids(session, user_id=user_id)
    if len(ids) < 2:
        return []  # one subscription or none: nothing to ask Stripe
    client = client or make_stripe_client(settings)
    with stripe_errors(f"looking up {user_id}'s subscriptions", settings=settings):
        found = [_live(s) for s in _retrieve_all(client, ids)]
    return sorted((s for s in found if s.status in LIVE_STATUSES), key=lambda s: (s.created, s.id))


def has_second_candidate(session: Session, *, user_id: str) -> bool:
    """Whether the Customers page should offer the action (no Stripe call)."""
    return len(candidate_subscription_ids(session, user_id=user_id)) >= 2


def _comment(user_id: str, kept: str | None, operator: str) -> str:
    return f"{COMMENT_PREFIX} {user_id}; {kept or 'the older one'} is kept; canceled by {operator}"[:500]


def _canceled_by_us(client, ids: list[str], user_id: str) -> LiveSubscription | None:
    """A subscription an earlier run of this action canceled (its refund may still be missing)."""
    for subscription in _retrieve_all(client, ids):
        fields = subscription.to_dict() if hasattr(subscription, "to_dict") else dict(subscription)
        comment = (fields.get("cancellation_details") or {}).get("comment") or ""
        if fields.get("status") == "canceled" and comment.startswith(f"{COMMENT_PREFIX} {user_id};"):
            return _live(fields)
    return None


def cancel_and_refund_newer(*, user_id: str, operator: str, settings: Settings, engine: Engine,
                            client=None) -> CancelResult:
    """Cancel the user's newer live subscription at once and refund its latest invoice payment in full."""
    user_id = ledger.check_user_id(user_id)
    operator = ledger.check_text(operator, what="the operator name", max_length=ledger.MAX_OPERATOR_LENGTH)
    client = client or make_stripe_client(settings)
    live = live_subscriptions(user_id=user_id, settings=settings, engine=engine, client=client)
    with stripe_errors(f"canceling {user_id}'s second subscription", settings=settings):
        if len(live) >= 2:
            newer, kept = live[-1], live[-2].id
            client.v1.subscriptions.cancel(
                newer.id, params={"cancellation_details": {"comment": _comment(user_id, kept, operator)}},
                options={"idempotency_key": f"cancel-second-{newer.id}"})
            canceled_now = True
        else:
            with db.read_session(engine) as session:
                ids = candidate_subscription_ids(session, user_id=user_id)
            newer = _canceled_by_us(client, ids, user_id)
            if newer is None:
                raise SecondSubscriptionError(f"{user_id} has {len(live) or 'no'} live subscription"
                                              f"{'' if len(live) == 1 else 's'} in Stripe: nothing to cancel")
            kept, canceled_now = (live[0].id if live else None), False
    with stripe_errors(f"refunding {newer.id}'s latest payment", settings=settings):
        refund_id, cents, currency, note = _refund_latest_payment(client, newer, user_id=user_id)
    return CancelResult(newer.id, kept, canceled_now, refund_id, cents, currency, note)


def _refund_latest_payment(client, subscription: LiveSubscription, *,
                           user_id: str) -> tuple[str | None, int, str | None, str]:
    """Its latest invoice's paid payment, refunded in full; the parameters depend on the subscription only,
    so a retry with the same idempotency key is answered with the same refund."""
    if not subscription.latest_invoice:
        return None, 0, None, "it has no invoice: nothing to refund"
    payments = client.v1.invoice_payments.list(params={"invoice": subscription.latest_invoice, "status": "paid",
                                                       "limit": 10})
    paid = [p.to_dict() if hasattr(p, "to_dict") else dict(p) for p in payments.data]
    intents = [(p.get("payment") or {}).get("payment_intent") for p in paid]
    intents = [pi.get("id") if isinstance(pi, dict) else pi for pi in intents if pi]
    if not intents:
        return None, 0, None, f"its latest invoice {subscription.latest_invoice} has no paid payment: nothing to refund"
    try:
        refund = client.v1.refunds.create(
            params={"payment_intent": intents[0], "reason": "duplicate",
                    "metadata": {"user_id": user_id, "subscription": subscription.id}},
            options={"idempotency_key": f"refund-second-{subscription.id}"})
    except stripe.InvalidRequestError as exc:
        if exc.code != "charge_already_refunded":
            raise
        return None, 0, None, f"its latest payment {intents[0]} was already refunded"
    return (refund.id, int(refund.amount), refund.currency,
            f"refunded {refund.amount} {str(refund.currency).upper()} (minor units) of {intents[0]} as {refund.id}")


# The subscription an event names and the user's other live subscriptions, oldest first, in one indexed read
# (the primary key or the user's index); the handlers apply the event with the row it returns.
_SUBSCRIPTION = Subscription.__table__
_LIVE = literal_in(_SUBSCRIPTION.c.status, ledger.LIVE_STATUSES)
_THIS_AND_LIVE_OTHERS = Prepared(
    select(_SUBSCRIPTION.c.id, _SUBSCRIPTION.c.user_id, _SUBSCRIPTION.c.tier, _SUBSCRIPTION.c.price_id,
           _SUBSCRIPTION.c.status, _SUBSCRIPTION.c.current_period_start, _SUBSCRIPTION.c.current_period_end,
           _SUBSCRIPTION.c.cancel_at_period_end, _SUBSCRIPTION.c.state_at)
    .where(or_(_SUBSCRIPTION.c.id == bindparam("subscription_id"),
               and_(_SUBSCRIPTION.c.user_id == bindparam("user_id"), _LIVE)))
    .order_by(_SUBSCRIPTION.c.created_at))


def this_and_oldest_other_live(session: Session, *, subscription_id: str, user_id: str) -> tuple:
    """(the stored row of `subscription_id` or None, the user's oldest other live subscription or None)."""
    rows = _THIS_AND_LIVE_OTHERS.rows(session.connection(), {"subscription_id": subscription_id, "user_id": user_id})
    this = next((row for row in rows if row.id == subscription_id), None)
    other = next((row for row in rows if row.id != subscription_id), None)
    return this, other


def second_subscription_reason(*, user_id: str, subscription_id: str, status: str | None, other) -> str | None:
    """Why an event of `subscription_id` (stored with `status`, None when not stored) grants nothing: the user
    already has `other`, a live subscription (None when this is the user's only one, or it is the live one, or
    it is already canceled)."""
    if status in (*ledger.LIVE_STATUSES, "canceled", "incomplete_expired") or other is None:
        return None
    return (f"second live subscription {subscription_id} for {user_id}, who already has {other.id} "
            f"({other.tier}, {other.status}): nothing granted (one plan per user); an admin can cancel and refund "
            "the newer subscription on the Customers page")
