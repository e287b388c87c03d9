"""Subscription invoices: a paid one grants its period's allowance once and applies its prorations (plan_changes:
a paid upgrade tops up in proportion to the time left, a downgrade takes back); a failed renewal makes the
subscription past due."""
from __future__ import annotations

from sqlalchemy import bindparam, select
from sqlmodel import Session

from .. import ledger, plan_changes
from ..catalog import CatalogItem
from ..models import Payment, Subscription, utcnow
from ..settings import Settings
from ..stripe_payloads import (NeedsAttention, as_amount, as_currency, as_int, as_text, id_of, invoice_checkout_item,
                               invoice_lines, invoice_payment_refs, invoice_subscription_id, invoice_user,
                               lenient_id, line_is_proration, line_period_end, line_period_start, line_price,
                               line_price_object, moment_of, required_id)
from .common import (SETTLED_PAYMENT_STATUSES, EventContext, Handled, apply_earlier_reversals, ensure_account,
                     plan_for_price_object, plan_named, reread_after_lock, resolve_user)
from .subscription import UPGRADABLE_STATUSES, refuse_second_subscription

REACTIVATED_BY_PAYMENT = ("incomplete", "past_due", "unpaid")
PlanLine = tuple[dict, CatalogItem, int]  # (line, its plan, its period end)


_PAYMENT = Payment.__table__
# The invoice's payment, recorded paid with its credits granted, for at least this amount: an event of the
# invoice's second type (invoice.paid after invoice.payment_succeeded) has nothing left to do.
# Its user, as a subquery the event path folds into the one statement that marks the event processed.
PAID_AND_GRANTED_USER = select(_PAYMENT.c.user_id).where(
    _PAYMENT.c.invoice_id == bindparam("invoice_id"), _PAYMENT.c.status.in_(("paid", *SETTLED_PAYMENT_STATUSES)),
    _PAYMENT.c.credits_granted > 0, _PAYMENT.c.amount_cents >= bindparam("amount_paid")).scalar_subquery()


def paid_and_granted_params(event: dict) -> dict | None:
    """PAID_AND_GRANTED_USER's parameters for an invoice event; None when the invoice has no usable id."""
    invoice = event["data"]["object"]
    invoice_id = lenient_id(invoice)
    return {"invoice_id": invoice_id, "amount_paid": as_int(invoice.get("amount_paid"))} if invoice_id else None


def _plan_lines(session: Session, invoice: dict, settings: Settings, subscription_id: str | None) -> list[PlanLine]:
    found = []
    for line in invoice_lines(invoice):
        plan = _line_plan(session, invoice, line, settings, subscription_id)
        period_end = line_period_end(line)
        if plan is not None and period_end:
            found.append((line, plan, period_end))
    return found


def _line_plan(session: Session, invoice: dict, line: dict, settings: Settings,
               subscription_id: str | None) -> CatalogItem | None:
    """A line's plan by its configured price; for a price no longer configured (replaced by sync-catalog),
    the stored subscription that a subscription event recorded with that price, then (regular lines
    only: a proration's old-plan line must not pass for the new plan) the item our checkout put in the
    subscription's metadata."""
    price = line_price_object(line)
    plan = plan_for_price_object(price, settings)
    price_id = id_of(price)
    if plan is not None or not price_id:
        return plan
    row = session.get(Subscription, subscription_id) if subscription_id else None
    if row is not None and row.price_id == price_id and plan_named(row.tier):
        return plan_named(row.tier)
    if line_is_proration(line):
        return None
    return plan_named(invoice_checkout_item(invoice))


def _invoice_payment(session: Session, invoice: dict, *, user_id: str, subscription_id: str, item: str | None,
                     status: str) -> tuple[Payment, bool]:
    """The invoice's payment, recorded or brought up to date; True when this call recorded it."""
    invoice_id = invoice["id"]
    payment = session.execute(select(Payment).where(Payment.invoice_id == invoice_id)).scalars().first()
    recorded_now = payment is None
    if payment is None:
        payment = Payment(user_id=user_id, source="invoice", invoice_id=invoice_id, subscription_id=subscription_id,
                          item=item, kind="plan", currency=as_currency(invoice.get("currency"), default="usd"),
                          status=status, created_at=moment_of(invoice.get("created"), what="invoice created"))
    if status == "paid":
        payment.amount_cents = max(payment.amount_cents or 0, as_amount(invoice.get("amount_paid"), what="amount_paid"))
        if payment.status not in SETTLED_PAYMENT_STATUSES:
            payment.status = "paid"
    elif payment.status in ("unpaid", "failed"):
        payment.status = status
        payment.amount_cents = payment.amount_cents or as_amount(invoice.get("amount_due"), what="amount_due")
    payment.item = payment.item or item
    payment_intent_id, charge_id = invoice_payment_refs(invoice)  # older versions name them on the invoice
    payment.payment_intent_id = payment.payment_intent_id or payment_intent_id
    payment.charge_id = payment.charge_id or charge_id
    payment.updated_at = utcnow()
    session.add(payment)
    session.flush()
    return payment, recorded_now


def _invoice_user(session: Session, ctx: EventContext, invoice: dict, subscription_id: str) -> str:
    return resolve_user(session, ctx, explicit=invoice_user(invoice), subscription_id=subscription_id,
                        customer_id=id_of(invoice.get("customer")), what=f"invoice {invoice.get('id')}")


def on_invoice_paid(session: Session, ctx: EventContext) -> Handled:
    invoice = ctx.obj
    invoice_id = required_id(invoice, "in_", "invoice")
    subscription_id = invoice_subscription_id(invoice)
    if not subscription_id:
        return Handled(ignored=True, note="invoice is not for a subscription")
    user_id = _invoice_user(session, ctx, invoice, subscription_id)
    ensure_account(session, user_id=user_id, stripe_customer_id=id_of(invoice.get("customer")),
                        email=as_text(invoice.get("customer_email"), what="customer email", max_len=320))
    refuse_second_subscription(session, user_id=user_id, subscription_id=subscription_id)
    plan_lines = _plan_lines(session, invoice, ctx.settings, subscription_id)
    reason = invoice.get("billing_reason")
    base = None
    if reason in ("subscription_create", "subscription_cycle"):
        regular = [found for found in plan_lines if not line_is_proration(found[0]) and as_int(found[0].get("amount")) >= 0]
        base = max(regular or plan_lines, key=lambda found: found[2], default=None)
        if base is None:
            prices = [line_price(line) for line in invoice_lines(invoice)]
            raise NeedsAttention(f"invoice {invoice_id} has no line with a configured plan price (prices: {prices})")
    upgrades = [found for found in plan_lines if line_is_proration(found[0]) and as_int(found[0].get("amount")) > 0]
    item = base[1].key if base else (upgrades[0][1].key if upgrades else None)
    payment, recorded_now = _invoice_payment(session, invoice, user_id=user_id, subscription_id=subscription_id,
                                             item=item, status="paid")
    row = _subscription_after_payment(session, ctx, subscription_id=subscription_id, user_id=user_id, base=base)
    if row is not None and row.status == "canceled":
        return Handled(user_id=user_id, note="subscription already canceled: nothing granted")
    written: list = []
    rollover = ctx.settings.subscription_credits_rollover
    if base is not None:
        written.append(ledger.grant_subscription_period(
            session, user_id=user_id, subscription_id=subscription_id, period_end=base[2], tier=base[1].key,
            payment_id=payment.id, source_key=f"invoice:{invoice_id}:period:{base[2]}", rollover=rollover))
        if written[-1] is not None:  # downgrades reported before these credits arrived take what they could not
            plan_changes.settle_takebacks(session, user_id=user_id, subscription_id=subscription_id,
                                          period_end=base[2])
    written += plan_changes.note_invoice(  # prorations: paid upgrades top up, downgrades take back
        session, user_id=user_id, subscription_id=subscription_id, invoice=invoice, payment_id=payment.id,
        plan_of_line=lambda line: _line_plan(session, invoice, line, ctx.settings, subscription_id),
        known_period=((row.current_period_start, row.current_period_end)
                      if row is not None and row.current_period_start and row.current_period_end else None),
        paid_through=max((end for _line, _plan, end in plan_lines), default=None), rollover=rollover)
    if any(written) or not payment.credits_granted:  # not again for the invoice's second event type
        payment.credits_granted = ledger.credits_paid_by(session, payment)
        session.add(payment)
        session.flush()
        if not recorded_now:  # a payment first recorded by this event has no earlier refund or dispute
            apply_earlier_reversals(session, payment)
    return Handled(user_id=user_id)


def _subscription_after_payment(session: Session, ctx: EventContext, *, subscription_id: str, user_id: str,
                                base: PlanLine | None) -> Subscription | None:
    """A paid invoice for a period means an active subscription with that period's plan, unless newer state
    says otherwise. Other invoices (prorations) leave the state to the subscription events."""
    row = session.get(Subscription, subscription_id)
    if row is not None:
        reread_after_lock(session, row)
    elif base is None:
        return None
    else:
        row = Subscription(id=subscription_id, user_id=user_id, status="incomplete", state_at=0)
    if ctx.created < row.state_at or base is None:
        return row
    line, plan, period_end = base
    row.tier, row.price_id = plan.key, line_price(line)
    if period_end >= (row.current_period_end or 0):
        row.current_period_start = line_period_start(line)
    row.current_period_end = max(row.current_period_end or 0, period_end)
    if row.status in REACTIVATED_BY_PAYMENT:
        row.status = "active"
        row.state_at = ctx.created
    row.updated_at = utcnow()
    session.add(row)
    session.flush()
    return row


def on_invoice_payment_failed(session: Session, ctx: EventContext) -> Handled:
    invoice = ctx.obj
    required_id(invoice, "in_", "invoice")
    subscription_id = invoice_subscription_id(invoice)
    if not subscription_id:
        return Handled(ignored=True, note="invoice is not for a subscription")
    user_id = _invoice_user(session, ctx, invoice, subscription_id)
    ensure_account(session, user_id=user_id, stripe_customer_id=id_of(invoice.get("customer")))
    plan_lines = _plan_lines(session, invoice, ctx.settings, subscription_id)
    _invoice_payment(session, invoice, user_id=user_id, subscription_id=subscription_id,
                     item=plan_lines[0][1].key if plan_lines else None, status="failed")
    row = session.get(Subscription, subscription_id)
    if row is not None:
        reread_after_lock(session, row)
    if (row is not None and invoice.get("billing_reason") != "subscription_create"
            and row.status in UPGRADABLE_STATUSES and ctx.created >= row.state_at):
        row.status, row.state_at, row.updated_at = "past_due", ctx.created, utcnow()
        session.add(row)
        session.flush()
    return Handled(user_id=user_id)
