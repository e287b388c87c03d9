"""What each Stripe event means for the ledger: one function per event type, in one table (HANDLERS).

Every handler runs inside the write transaction that also stores its event and marks it processed, so an
event's effects and its status commit together or not at all. Every effect has a deterministic source key
(`checkout:{session}`, `invoice:{invoice}:...`, `plan-change:{id}:...`), so redelivery,
the same payment arriving as two event types, and the checkout success page all apply it once.

Handlers read what the event says (through `stripe_payloads`, which knows both payload layouts) and never
ask Stripe for it, except `refunds.prefetch` before the transaction opens. A handler raises NeedsAttention
when the event's user or price can't be determined, or the event is a user's second live subscription's (one
plan per user): the event is kept with the reason (its effects rolled back) and an operator can assign the user
and reprocess it, or cancel and refund the second subscription (Customers page).

The families: `checkout` (Checkout Sessions), `subscription`, `invoice`, `refunds` (refunds and disputes).
"""
from __future__ import annotations

from typing import Callable

from sqlmodel import Session

from ..stripe_payloads import MAX_EPOCH, NeedsAttention, dig, printable, related_ids
from . import checkout, invoice, refunds, subscription
from .checkout import fulfil_checkout_session
from .common import EventContext, Handled
from .refunds import invoice_for_payment_intent, needs_prefetch, prefetch

Handler = Callable[[Session, EventContext], Handled]

HANDLERS: dict[str, Handler] = {
    # A customer finished Checkout: link them to their Stripe customer, grant a paid pack once.
    "checkout.session.completed": checkout.on_checkout_completed,
    # A delayed payment method (bank debit) cleared after Checkout: now the pack is paid, grant it.
    "checkout.session.async_payment_succeeded": checkout.on_checkout_completed,
    # A delayed payment failed after Checkout: the pack stays ungranted, the payment is recorded failed.
    "checkout.session.async_payment_failed": checkout.on_checkout_async_failed,
    # An issued link ran out unused: operators see it as expired.
    "checkout.session.expired": checkout.on_checkout_expired,
    # A subscription invoice was paid: the period's allowance once; its prorations top up (paid upgrades) or take back.
    "invoice.paid": invoice.on_invoice_paid,
    # The same payment, reported under a second type; the shared source keys make it a no-op.
    "invoice.payment_succeeded": invoice.on_invoice_paid,
    # A renewal payment failed: the subscription is past due and its credits freeze.
    "invoice.payment_failed": invoice.on_invoice_payment_failed,
    # Subscription state: tier, status, period end, cancel_at_period_end; newer snapshots only.
    "customer.subscription.created": subscription.on_subscription_changed,
    # Plan changes (tier at once; a mid-period downgrade takes back), renewals, past due, cancel at period end.
    "customer.subscription.updated": subscription.on_subscription_changed,
    # The subscription ended: tier none, its remaining credits expire, packs stay.
    "customer.subscription.deleted": subscription.on_subscription_changed,
    # Money went back: take back the payment's credits in proportion, idempotent on the cumulative amount.
    "charge.refunded": refunds.on_charge_refunded,
    # A chargeback opened: hold the payment's remaining credits and flag the account.
    "charge.dispute.created": refunds.on_dispute_created,
    # The chargeback ended: won releases the hold, lost takes the credits back.
    "charge.dispute.closed": refunds.on_dispute_closed,
}

EVENT_TYPES = tuple(HANDLERS)

# Event types that may report work another event type already did: (a scalar subquery giving the user when
# all of it is done, a function giving its parameters from the event). The event path folds the subquery
# into the statement that marks the event processed, so such an event costs one statement after its insert.
ALREADY_DONE: dict[str, tuple] = {
    "invoice.paid": (invoice.PAID_AND_GRANTED_USER, invoice.paid_and_granted_params),
    "invoice.payment_succeeded": (invoice.PAID_AND_GRANTED_USER, invoice.paid_and_granted_params),
}

__all__ = ["EVENT_TYPES", "HANDLERS", "MAX_EPOCH", "EventContext", "Handled", "NeedsAttention", "dig",
           "ALREADY_DONE", "fulfil_checkout_session", "handle", "invoice_for_payment_intent",
           "needs_prefetch", "prefetch", "printable", "related_ids"]


def handle(session: Session, ctx: EventContext) -> Handled:
    handler = HANDLERS.get(ctx.type)
    if handler is None:
        return Handled(ignored=True, note="event type not handled")
    return handler(session, ctx)
