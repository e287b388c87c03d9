"""Money going back: refunds take back a payment's credits in proportion; disputes hold them, and a lost
one takes them back.

A charge or dispute of an invoice payment names only its PaymentIntent, and today's invoice no longer
names its PaymentIntent, so Stripe's invoice payments list is the only link between the two. `prefetch`
asks it (`invoice_for_payment_intent`) before the write transaction opens, so no database lock is held
during the HTTP call, and hands the answer to the handler in `EventContext.facts`.
"""
from __future__ import annotations

from typing import Callable

from sqlalchemy import select
from sqlmodel import Session

from .. import ledger
from ..models import Dispute, Payment, utcnow
from ..settings import Settings
from ..stripe_payloads import NeedsAttention, as_amount, charge_refs, dig, id_of, lenient_id, moment_of
from .common import EventContext, Handled, reread_after_lock

LOST_DISPUTE = "lost"
DISPUTED = "disputed"  # a payment's status from its dispute's opening; stays after a lost one


def invoice_for_payment_intent(payment_intent_id: str, *, settings: Settings, client=None) -> str | None:
    """The invoice a PaymentIntent paid, from Stripe's invoice payments list (the event doesn't say).
    None when Stripe knows none or isn't configured."""
    from ..stripe_client import StripeNotConfigured, make_stripe_client, stripe_errors

    try:
        client = client or make_stripe_client(settings)
    except StripeNotConfigured:
        return None
    with stripe_errors(f"looking up the invoice paid by {payment_intent_id}", settings=settings):
        found = client.v1.invoice_payments.list(
            params={"payment": {"type": "payment_intent", "payment_intent": payment_intent_id}, "limit": 10})
    for record in found.data:
        fields = record.to_dict() if hasattr(record, "to_dict") else record
        invoice_id = lenient_id(fields.get("invoice"))
        if invoice_id:
            return invoice_id
    return None


def recorded_payment_for_charge(session: Session, *, charge_id: str | None,
                                payment_intent_id: str | None) -> Payment | None:
    """The Payment behind a charge as far as the database knows: by PaymentIntent, then charge id."""
    conditions = []
    if payment_intent_id:
        conditions.append(Payment.payment_intent_id == payment_intent_id)
    if charge_id:
        conditions.append(Payment.charge_id == charge_id)
    for condition in conditions:
        payment = session.execute(select(Payment).where(condition).order_by(Payment.id)).scalars().first()
        if payment is not None:
            return payment
    return None


def needs_prefetch(event: dict) -> bool:
    """Only a charge or dispute naming a PaymentIntent may need Stripe's invoice payments list."""
    return str(event.get("type", "")).startswith("charge.") and charge_refs(dig(event, "data", "object") or {})[1] is not None


def prefetch(event: dict, *, settings: Settings, read_session: Callable) -> dict:
    """Facts a handler needs that the event doesn't carry, asked of Stripe BEFORE the write transaction,
    so no database lock is held during an HTTP call: for a charge or dispute whose payment we haven't
    recorded by PaymentIntent or charge, the invoice that its PaymentIntent paid."""
    if not str(event.get("type", "")).startswith("charge."):
        return {}
    charge_id, payment_intent_id = charge_refs(dig(event, "data", "object") or {})
    if not payment_intent_id:
        return {}
    with read_session() as session:
        if recorded_payment_for_charge(session, charge_id=charge_id, payment_intent_id=payment_intent_id):
            return {}
    return {"invoices": {payment_intent_id: invoice_for_payment_intent(payment_intent_id, settings=settings)}}


def _locked_payment(session: Session, *, charge_id: str | None, payment_intent_id: str | None, facts: dict,
                    what: str) -> Payment:
    payment = recorded_payment_for_charge(session, charge_id=charge_id, payment_intent_id=payment_intent_id)
    invoice_id = (facts.get("invoices") or {}).get(payment_intent_id) if payment_intent_id else None
    if payment is None and invoice_id:
        payment = session.execute(select(Payment).where(Payment.invoice_id == invoice_id)).scalars().first()
    if payment is None or not payment.user_id:
        invoice = f", invoice {invoice_id}" if invoice_id else ""
        raise NeedsAttention(f"no recorded payment matches {what} (charge {charge_id}, payment intent "
                             f"{payment_intent_id}{invoice}); it is retried when that payment is recorded")
    ledger.lock_account(session, user_id=payment.user_id)
    reread_after_lock(session, payment)
    changed = False
    if charge_id and not payment.charge_id:
        payment.charge_id, changed = charge_id, True
    if payment_intent_id and not payment.payment_intent_id:
        payment.payment_intent_id, changed = payment_intent_id, True
    if changed:
        session.add(payment)
        session.flush()
    return payment


def _undisputed_status(payment: Payment) -> str:
    if payment.amount_refunded <= 0:
        return "paid"
    return "refunded" if payment.amount_refunded >= payment.amount_cents else "partially_refunded"


def _reverse(session: Session, payment: Payment) -> None:
    """Take back the payment's credits in proportion to everything reversed so far (refunds + lost disputes)."""
    if payment.amount_refunded > 0 and payment.status not in ("failed", DISPUTED):
        payment.status = _undisputed_status(payment)
    payment.updated_at = utcnow()
    session.add(payment)
    session.flush()
    ledger.clawback_for_payment(session, payment=payment,
                                reversed_cents=payment.amount_refunded + payment.amount_disputed_lost)


def on_charge_refunded(session: Session, ctx: EventContext) -> Handled:
    charge = ctx.obj
    charge_id = id_of(charge)
    if not charge_id:
        raise NeedsAttention("refunded charge has no id")
    payment = _locked_payment(session, charge_id=charge_id, payment_intent_id=id_of(charge.get("payment_intent")),
                              facts=ctx.facts, what=f"refunded charge {charge_id}")
    refunded = as_amount(charge.get("amount_refunded"), what="amount_refunded")
    payment.amount_refunded = max(payment.amount_refunded or 0, refunded)
    _reverse(session, payment)
    return Handled(user_id=payment.user_id)


def _dispute_payment(session: Session, ctx: EventContext) -> Payment:
    dispute = ctx.obj
    return _locked_payment(session, charge_id=id_of(dispute.get("charge")), facts=ctx.facts,
                           payment_intent_id=id_of(dispute.get("payment_intent")), what=f"dispute {dispute['id']}")


def dispute_amount(dispute: dict) -> int:
    return as_amount(dispute.get("amount"), what="dispute amount")


def on_dispute_created(session: Session, ctx: EventContext) -> Handled:
    dispute = ctx.obj
    dispute_id = id_of(dispute)
    if not dispute_id:
        raise NeedsAttention("dispute has no id")
    payment = _dispute_payment(session, ctx)
    if session.get(Dispute, dispute_id) is not None:
        return Handled(user_id=payment.user_id, note="dispute already recorded")
    account = ledger.lock_account(session, user_id=payment.user_id)
    session.add(Dispute(id=dispute_id, user_id=payment.user_id, payment_id=payment.id,
                        charge_id=id_of(dispute.get("charge")), amount_cents=dispute_amount(dispute),
                        status="open", created_at=moment_of(dispute.get("created"), what="dispute created")))
    account.open_disputes += 1
    account.updated_at = utcnow()
    session.add(account)
    session.flush()
    ledger.hold_for_dispute(session, dispute_id=dispute_id, payment=payment)
    payment.status, payment.updated_at = DISPUTED, utcnow()
    session.add(payment)
    session.flush()
    ledger.refresh_flag(session, account)
    return Handled(user_id=payment.user_id)


def _other_open_dispute(session: Session, payment: Payment, dispute_id: str) -> bool:
    return session.execute(select(Dispute.id).where(Dispute.payment_id == payment.id, Dispute.status == "open",
                                                    Dispute.id != dispute_id).limit(1)).first() is not None


def on_dispute_closed(session: Session, ctx: EventContext) -> Handled:
    dispute = ctx.obj
    dispute_id = id_of(dispute)
    if not dispute_id:
        raise NeedsAttention("dispute has no id")
    payment = _dispute_payment(session, ctx)
    account = ledger.lock_account(session, user_id=payment.user_id)
    row = session.get(Dispute, dispute_id)
    if row is not None:
        reread_after_lock(session, row)
        if row.status != "open":
            return Handled(user_id=payment.user_id, note=f"dispute already closed ({row.status})")
    lost = dispute.get("status") == LOST_DISPUTE
    if row is None:  # the closing event came first: nothing was held or counted as open
        row = Dispute(id=dispute_id, user_id=payment.user_id, payment_id=payment.id,
                      charge_id=id_of(dispute.get("charge")), amount_cents=dispute_amount(dispute),
                      created_at=moment_of(dispute.get("created"), what="dispute created"))
    else:
        ledger.release_dispute_hold(session, dispute_id=dispute_id, user_id=payment.user_id)
        account.open_disputes = max(0, account.open_disputes - 1)
        account.updated_at = utcnow()
        session.add(account)
    row.status = "lost" if lost else "won"
    row.closed_at = utcnow()
    session.add(row)
    session.flush()
    if lost:  # the payment stays "disputed": the money went back to the customer's bank
        payment.status = DISPUTED
        payment.amount_disputed_lost += dispute_amount(dispute) or row.amount_cents
        _reverse(session, payment)
    elif payment.status == DISPUTED and not _other_open_dispute(session, payment, dispute_id):
        payment.status, payment.updated_at = _undisputed_status(payment), utcnow()
        session.add(payment)
        session.flush()
    ledger.refresh_flag(session, account)
    return Handled(user_id=payment.user_id)
