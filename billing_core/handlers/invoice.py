"""Subscription invoices: a paid one grants its period's allowance once and applies its prorations (plan_changes:
a paid upgrade tops up in proportion to the time left, a downgrade takes back); a failed renewal makes the
subscription past due."""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import BigInteger, bindparam, case, func, literal, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session

from .. import ledger, plan_changes
from ..catalog import CatalogItem, allowance
from ..models import Payment, utcnow
from ..prepared import Prepared, literal_in
from ..settings import Settings
from ..stripe_payloads import (NeedsAttention, as_amount, as_currency, as_int, as_text, id_of, invoice_checkout_item,
                               invoice_lines, invoice_payment_refs, invoice_subscription_id, invoice_user,
                               lenient_id, line_is_proration, line_period_end, line_period_start, line_price,
                               line_price_object, moment_of, required_id)
from .common import (SETTLED_PAYMENT_STATUSES, EventContext, Handled, apply_earlier_reversals, ensure_account,
                     ensure_account_state, forget_loaded, plan_for_price_object, plan_named, resolve_user)
from .subscription import UPGRADABLE_STATUSES, StoredSubscription, save, stored_subscription

REACTIVATED_BY_PAYMENT = ("incomplete", "past_due", "unpaid")
PlanLine = tuple[dict, CatalogItem, int]  # (line, its plan, its period end)


_PAYMENT = Payment.__table__
_PAID_OR_SETTLED = literal_in(_PAYMENT.c.status, ("paid", *SETTLED_PAYMENT_STATUSES))
_SETTLED = literal_in(_PAYMENT.c.status, SETTLED_PAYMENT_STATUSES)
# The invoice's payment, recorded paid with its credits granted, for at least this amount: an event of the
# invoice's second type (invoice.paid after invoice.payment_succeeded) has nothing left to do.
# Its user, as a subquery the event path folds into the one statement that marks the event processed.
PAID_AND_GRANTED_USER = select(_PAYMENT.c.user_id).where(
    _PAYMENT.c.invoice_id == bindparam("invoice_id"), _PAID_OR_SETTLED,
    _PAYMENT.c.credits_granted > 0, _PAYMENT.c.amount_cents >= bindparam("amount_paid")).scalar_subquery()


def paid_and_granted_params(event: dict) -> dict | None:
    """PAID_AND_GRANTED_USER's parameters for an invoice event; None when the invoice has no usable id."""
    invoice = event["data"]["object"]
    invoice_id = lenient_id(invoice)
    return {"invoice_id": invoice_id, "amount_paid": as_int(invoice.get("amount_paid"))} if invoice_id else None


def _plan_lines(invoice: dict, settings: Settings, stored: StoredSubscription | None) -> list[PlanLine]:
    found = []
    for line in invoice_lines(invoice):
        plan = _line_plan(invoice, line, settings, stored)
        period_end = line_period_end(line)
        if plan is not None and period_end:
            found.append((line, plan, period_end))
    return found


def _line_plan(invoice: dict, line: dict, settings: Settings, stored: StoredSubscription | None) -> CatalogItem | None:
    """A line's plan by its configured price; for a price no longer configured (replaced by sync-catalog),
    the stored subscription (`stored`, as this event has it now) that a subscription event recorded with that
    price, then (regular lines only: a proration's old-plan line must not pass for the new plan) the item our
    checkout put in the subscription's metadata."""
    price = line_price_object(line)
    plan = plan_for_price_object(price, settings)
    price_id = id_of(price)
    if plan is not None or not price_id:
        return plan
    if stored is not None and stored.stored and stored.price_id == price_id and plan_named(stored.tier):
        return plan_named(stored.tier)
    if line_is_proration(line):
        return None
    return plan_named(invoice_checkout_item(invoice))


# --- the invoice's payment ----------------------------------------------------------------------
# Recorded by Core statements built once: a new payment by one INSERT (its id returned; it has no credits,
# refunds or disputes yet), one recorded before (a failed attempt, a refund that arrived first) by one
# UPDATE that brings it up to date and returns what the handler needs of it, and locks it on PostgreSQL.

@dataclass
class InvoicePayment:
    id: int
    user_id: str | None
    credits_granted: int
    recorded_now: bool  # inserted by this event: no earlier refund or dispute can apply to it


def _insert_payment_statement(dialect: str):
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    return insert(_PAYMENT).on_conflict_do_nothing(index_elements=["invoice_id"]).returning(_PAYMENT.c.id)


def _kept_or(column, name: str):
    """The column's value unless it is empty, else the parameter (Python's `column or new`)."""
    return func.coalesce(func.nullif(column, ""), bindparam(name))


_AMOUNT_PAID = bindparam("amount_paid", type_=BigInteger)
_INSERT_PAYMENT = {name: Prepared(_insert_payment_statement(name)) for name in ("sqlite", "postgresql")}
_UPDATE_PAID_PAYMENT = Prepared(
    update(_PAYMENT).where(_PAYMENT.c.invoice_id == bindparam("paid_invoice_id"))
    .values(amount_cents=case((_PAYMENT.c.amount_cents < _AMOUNT_PAID, _AMOUNT_PAID), else_=_PAYMENT.c.amount_cents),
            status=case((_SETTLED, _PAYMENT.c.status), else_=literal("paid")),
            item=_kept_or(_PAYMENT.c.item, "new_item"),
            payment_intent_id=_kept_or(_PAYMENT.c.payment_intent_id, "new_payment_intent_id"),
            charge_id=_kept_or(_PAYMENT.c.charge_id, "new_charge_id"), updated_at=bindparam("now"))
    .returning(_PAYMENT.c.id, _PAYMENT.c.user_id, _PAYMENT.c.credits_granted))
_PAYMENT_OF_INVOICE = Prepared(select(_PAYMENT.c.id).where(_PAYMENT.c.invoice_id == bindparam("invoice_id")))
_SET_CREDITS_GRANTED = Prepared(update(_PAYMENT).where(_PAYMENT.c.id == bindparam("payment_id"))
                                .values(credits_granted=bindparam("credits_granted")))


def _record_paid_payment(session: Session, invoice: dict, *, user_id: str, subscription_id: str, item: str | None,
                         credits_expected: int) -> InvoicePayment:
    """The paid invoice's payment: recorded paid (with `credits_expected` granted, which the caller corrects
    when the grant differs), or (recorded before) brought up to date: its amount at least the amount paid, paid
    unless refunded or disputed, its missing item and payment references filled in."""
    connection = session.connection()
    invoice_id = invoice["id"]
    payment_intent_id, charge_id = invoice_payment_refs(invoice)  # older versions name them on the invoice
    try:  # what only a new payment stores; one recorded before is kept as it is
        currency = as_currency(invoice.get("currency"), default="usd")
        created_at = moment_of(invoice.get("created"), what="invoice created")
    except NeedsAttention:
        if _PAYMENT_OF_INVOICE.first(connection, {"invoice_id": invoice_id}) is None:
            raise
        currency = created_at = None
    amount = as_amount(invoice.get("amount_paid"), what="amount_paid")
    now = utcnow()
    if created_at is not None:
        payment_id = _INSERT_PAYMENT[connection.dialect.name].scalar(connection, {
            "user_id": user_id, "source": "invoice", "checkout_session_id": None, "invoice_id": invoice_id,
            "payment_intent_id": payment_intent_id, "charge_id": charge_id, "subscription_id": subscription_id,
            "item": item, "kind": "plan", "status": "paid", "amount_cents": amount, "currency": currency,
            "amount_refunded": 0, "amount_disputed_lost": 0, "credits_granted": credits_expected,
            "created_at": created_at, "updated_at": now})
        if payment_id is not None:
            return InvoicePayment(payment_id, user_id, credits_expected, recorded_now=True)
    row = _UPDATE_PAID_PAYMENT.first(connection, {
        "paid_invoice_id": invoice_id, "amount_paid": amount, "new_item": item,
        "new_payment_intent_id": payment_intent_id, "new_charge_id": charge_id, "now": now})
    forget_loaded(session, Payment, row.id)
    return InvoicePayment(row.id, row.user_id, row.credits_granted, recorded_now=False)


def _record_failed_payment(session: Session, invoice: dict, *, user_id: str, subscription_id: str,
                           item: str | None) -> None:
    """The failed invoice's payment: recorded failed, or (recorded before, unpaid or failed) marked failed."""
    invoice_id = invoice["id"]
    payment = session.execute(select(Payment).where(Payment.invoice_id == invoice_id)).scalars().first()
    if payment is None:
        payment = Payment(user_id=user_id, source="invoice", invoice_id=invoice_id, subscription_id=subscription_id,
                          item=item, kind="plan", currency=as_currency(invoice.get("currency"), default="usd"),
                          status="failed", created_at=moment_of(invoice.get("created"), what="invoice created"))
    if payment.status in ("unpaid", "failed"):
        payment.status = "failed"
        payment.amount_cents = payment.amount_cents or as_amount(invoice.get("amount_due"), what="amount_due")
    payment.item = payment.item or item
    payment_intent_id, charge_id = invoice_payment_refs(invoice)
    payment.payment_intent_id = payment.payment_intent_id or payment_intent_id
    payment.charge_id = payment.charge_id or charge_id
    payment.updated_at = utcnow()
    session.add(payment)
    session.flush()


def _invoice_user(session: Session, ctx: EventContext, invoice: dict, subscription_id: str) -> str:
    return resolve_user(session, ctx, explicit=invoice_user(invoice), subscription_id=subscription_id,
                        customer_id=id_of(invoice.get("customer")), what=f"invoice {invoice.get('id')}")


def _base_line(invoice: dict, invoice_id: str, plan_lines: list[PlanLine]) -> PlanLine | None:
    """The line whose period a create or cycle invoice pays for (its latest regular plan line); None for other
    invoices (prorations)."""
    if invoice.get("billing_reason") not in ("subscription_create", "subscription_cycle"):
        return None
    regular = [found for found in plan_lines if not line_is_proration(found[0]) and as_int(found[0].get("amount")) >= 0]
    base = max(regular or plan_lines, key=lambda found: found[2], default=None)
    if base is None:
        prices = [line_price(line) for line in invoice_lines(invoice)]
        raise NeedsAttention(f"invoice {invoice_id} has no line with a configured plan price (prices: {prices})")
    return base


def on_invoice_paid(session: Session, ctx: EventContext) -> Handled:
    invoice = ctx.obj
    invoice_id = required_id(invoice, "in_", "invoice")
    subscription_id = invoice_subscription_id(invoice)
    if not subscription_id:
        return Handled(ignored=True, note="invoice is not for a subscription")
    user_id = _invoice_user(session, ctx, invoice, subscription_id)
    account = ensure_account_state(session, user_id=user_id, stripe_customer_id=id_of(invoice.get("customer")),
                                   email=as_text(invoice.get("customer_email"), what="customer email", max_len=320))
    row = stored_subscription(session, subscription_id=subscription_id, user_id=user_id, refuse_second=True)
    plan_lines = _plan_lines(invoice, ctx.settings, row)
    base = _base_line(invoice, invoice_id, plan_lines)
    upgrades = [found for found in plan_lines if line_is_proration(found[0]) and as_int(found[0].get("amount")) > 0]
    item = base[1].key if base else (upgrades[0][1].key if upgrades else None)
    canceled = row is not None and row.status == "canceled"  # a paid invoice never reactivates a canceled one
    payment = _record_paid_payment(session, invoice, user_id=user_id, subscription_id=subscription_id, item=item,
                                   credits_expected=allowance(base[1].key) if base and not canceled else 0)
    row = _subscription_after_payment(session, ctx, row, subscription_id=subscription_id, user_id=user_id, base=base)
    if canceled:
        return Handled(user_id=user_id, note="subscription already canceled: nothing granted")
    rollover = ctx.settings.subscription_credits_rollover
    granted = None
    if base is not None:
        granted = ledger.grant_subscription_period_values(
            session, user_id=user_id, subscription_id=subscription_id, period_end=base[2], tier=base[1].key,
            payment_id=payment.id, source_key=f"invoice:{invoice_id}:period:{base[2]}", rollover=rollover,
            account_state=account)
        if granted is not None:  # downgrades reported before these credits arrived take what they could not
            plan_changes.settle_takebacks(session, user_id=user_id, subscription_id=subscription_id,
                                          period_end=base[2])
    changes = plan_changes.note_invoice(  # prorations: paid upgrades top up, downgrades take back
        session, user_id=user_id, subscription_id=subscription_id, invoice=invoice, payment_id=payment.id,
        plan_of_line=lambda line: _line_plan(invoice, line, ctx.settings, row),
        known_period=((row.current_period_start, row.current_period_end)
                      if row is not None and row.current_period_start and row.current_period_end else None),
        paid_through=max((end for _line, _plan, end in plan_lines), default=None), rollover=rollover)
    if payment.recorded_now or granted is not None or changes or not payment.credits_granted:
        _note_credits_granted(session, payment, granted=granted, changes=changes)  # not again for its second type
    return Handled(user_id=user_id)


def _note_credits_granted(session: Session, payment: InvoicePayment, *, granted, changes: list) -> None:
    """Store what the payment granted, where it differs from what the payment row says. A payment recorded by
    this event paid for nothing but what this event granted: with no plan change on the invoice, that is its
    period's grant; otherwise the lots say."""
    if payment.recorded_now and not changes and (granted is None or granted[1]["user_id"] == payment.user_id):
        credits = granted[1]["credits"] if granted is not None else 0
    else:
        credits = ledger.credits_paid_by(session, payment)
    if credits != payment.credits_granted:
        _SET_CREDITS_GRANTED.run(session.connection(), {"payment_id": payment.id, "credits_granted": credits})
        payment.credits_granted = credits
        forget_loaded(session, Payment, payment.id)
    if not payment.recorded_now:  # a payment first recorded by this event has no earlier refund or dispute
        apply_earlier_reversals(session, session.get(Payment, payment.id))


def _subscription_after_payment(session: Session, ctx: EventContext, row: StoredSubscription | None, *,
                                subscription_id: str, user_id: str,
                                base: PlanLine | None) -> StoredSubscription | None:
    """A paid invoice for a period means an active subscription with that period's plan, unless newer state
    says otherwise. Other invoices (prorations) leave the state to the subscription events."""
    if row is None:
        if base is None:
            return None
        row = StoredSubscription(id=subscription_id, user_id=user_id)
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
    save(session, row, snapshot=False)
    return row


def on_invoice_payment_failed(session: Session, ctx: EventContext) -> Handled:
    invoice = ctx.obj
    required_id(invoice, "in_", "invoice")
    subscription_id = invoice_subscription_id(invoice)
    if not subscription_id:
        return Handled(ignored=True, note="invoice is not for a subscription")
    user_id = _invoice_user(session, ctx, invoice, subscription_id)
    ensure_account(session, user_id=user_id, stripe_customer_id=id_of(invoice.get("customer")))
    row = stored_subscription(session, subscription_id=subscription_id, user_id=user_id, refuse_second=False)
    plan_lines = _plan_lines(invoice, ctx.settings, row)
    _record_failed_payment(session, invoice, user_id=user_id, subscription_id=subscription_id,
                           item=plan_lines[0][1].key if plan_lines else None)
    if (row is not None and invoice.get("billing_reason") != "subscription_create"
            and row.status in UPGRADABLE_STATUSES and ctx.created >= row.state_at):
        row.status, row.state_at = "past_due", ctx.created
        save(session, row, snapshot=False)
    return Handled(user_id=user_id)
