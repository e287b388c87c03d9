"""Refunds from the console, with a preview of the credits they take back.

The ledger changes only when Stripe's `charge.refunded` arrives, for refunds made here and in Stripe's
Dashboard alike. So:

* `preview_refund` builds the `charge.refunded` event Stripe will send for the payment's charge (the
  charge object with its new cumulative `amount_refunded`, its refunds list not expanded) and runs it
  through the webhook's own handler in a transaction that is rolled back (billing_core.previews);
* `create_refund` checks the amount, asks Stripe to refund (reason `requested_by_customer`, the operator
  and their reason in metadata, an idempotency key derived from the payment, the charge's cumulative
  refund and the operator's request) and records a `refund_request`, shown as pending until the
  payment's `amount_refunded` reaches it.

A payment is named by any Stripe id the Payments page shows for it: cs_..., in_..., pi_... or ch_....
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from . import db, handlers, ledger
from .handlers import EventContext
from .models import Account, Payment, RefundRequest, utcnow
from .operators import Identity, PermissionDenied
from .previews import AccountChange, Preview, diff_in_session, rolled_back
from .settings import Settings

STRIPE_REASON = "requested_by_customer"
PAYMENT_PREFIXES = {"cs_": Payment.checkout_session_id, "in_": Payment.invoice_id,
                    "pi_": Payment.payment_intent_id, "ch_": Payment.charge_id}
REFUNDABLE_STATUSES = ("paid", "partially_refunded")
DISPUTED = "disputed"
MAX_REASON_LENGTH = 500  # Stripe's limit for a metadata value


class RefundRefused(ValueError):
    """A refund that can't be made; the message is one line naming why."""


@dataclass
class RefundOutcome:
    payment: str
    payment_id: int
    user_id: str | None
    amount: int
    currency: str
    refunded_before: int
    refunded_after: int
    preview: Preview
    refund: str | None = None  # Stripe's refund id; None for a dry run
    operator: str | None = None
    reason: str | None = None
    made_earlier: bool = False  # this request's refund existed already; nothing new was refunded

    @property
    def account(self):
        found = [a for a in self.preview.accounts if a.user_id == self.user_id]
        return found[0] if found else None

    @property
    def credits_taken_back(self) -> int:
        return self.account.credits_taken_back if self.account else 0

    def as_dict(self) -> dict:
        account = self.account
        return {"payment": self.payment, "payment_id": self.payment_id, "user_id": self.user_id,
                "amount": self.amount, "currency": self.currency, "refunded_before": self.refunded_before,
                "refunded_after": self.refunded_after, "credits_taken_back": self.credits_taken_back,
                "balance_before": account.balance_before if account else 0,
                "balance_after": account.balance_after if account else 0,
                "flagged_after": account.flagged_after if account else False,
                "dry_run": self.refund is None, "refund": self.refund,
                "status": "pending" if self.refund else "preview", "operator": self.operator,
                "reason": self.reason, "made_earlier": self.made_earlier}


# --- who may refund ----------------------------------------------------------------------------

def may_refund(identity: Identity, settings: Settings) -> bool:
    return identity.is_admin or (identity.role == "support" and settings.support_can_refund)


def check_refund_allowed(identity: Identity, settings: Settings) -> None:
    if not may_refund(identity, settings):
        raise PermissionDenied("only an admin may refund (support operators may when SUPPORT_CAN_REFUND=true)")


# --- finding the payment and what is left -------------------------------------------------------

def find_payment(session: Session, payment_ref: str, *, aliases: dict | None = None) -> Payment:
    """The payment a Stripe id names. `aliases` ({"pi_...": ..., "in_...": ...}, from `stripe_aliases`) are
    other ids of the same payment, for a charge or PaymentIntent the ledger hasn't linked yet."""
    ref = payment_ref.strip() if isinstance(payment_ref, str) else ""
    column = _column_for(ref)
    if column is None:
        raise RefundRefused(f"unknown payment {_shown(ref) or '(empty)'}: name it by its Checkout Session "
                            "(cs_...), invoice (in_...), PaymentIntent (pi_...) or charge (ch_...)")
    for ident in [ref, *(aliases or {}).values()]:
        if ident and _column_for(ident) is not None:
            payment = session.execute(select(Payment).where(_column_for(ident) == ident)
                                      .order_by(Payment.id)).scalars().first()
            if payment is not None:
                return payment
    raise RefundRefused(f"unknown payment {ref}: no recorded payment has this id")


def _column_for(ref: str):
    return next((c for prefix, c in PAYMENT_PREFIXES.items() if ref.startswith(prefix)), None)


def _shown(value: str) -> str:
    return handlers.printable(value, 40) + ("..." if len(value) > 40 else "")


def _stripe_id(value) -> str | None:
    """An id string, or an expanded object's id; None for anything else."""
    value = value.get("id") if isinstance(value, dict) else value
    return value if isinstance(value, str) and value.isascii() and value.isprintable() and "_" in value else None


def _invoice_paid_by(intent: str, *, client, settings: Settings) -> str | None:
    from .stripe_client import stripe_errors

    with stripe_errors(f"looking up the invoice paid by {intent}", settings=settings):
        found = client.v1.invoice_payments.list(
            params={"payment": {"type": "payment_intent", "payment_intent": intent}, "limit": 10})
    invoices = [_stripe_id((r.to_dict() if hasattr(r, "to_dict") else r).get("invoice")) for r in found.data]
    return next((i for i in invoices if i), None)


def stripe_aliases(payment_ref: str, *, settings: Settings) -> dict:
    """For a ch_ or pi_ id: the PaymentIntent and invoice Stripe links it to (the ledger learns a charge id
    only from a charge event, and an invoice's PaymentIntent only from the invoice payments list).
    Empty when Stripe isn't configured or knows nothing more."""
    from .stripe_client import StripeNotConfigured, StripeProblem, make_stripe_client, stripe_errors

    ref = payment_ref.strip()
    if not ref.startswith(("ch_", "pi_")):
        return {}
    try:
        client = make_stripe_client(settings)
        intent = ref
        if ref.startswith("ch_"):
            with stripe_errors(f"looking up charge {ref}", settings=settings):
                intent = _stripe_id(client.v1.charges.retrieve(ref).to_dict().get("payment_intent"))
        invoice = _invoice_paid_by(intent, client=client, settings=settings) if intent else None
    except (StripeNotConfigured, StripeProblem):
        return {}
    return {"payment_intent": intent, "invoice": invoice}


def pending_refunded_after(session: Session, payment: Payment) -> int:
    """The charge's cumulative refund once every refund made here has arrived (0 when none is pending)."""
    latest = session.execute(select(func.max(RefundRequest.refunded_after))
                             .where(RefundRequest.payment_id == payment.id)).scalar()
    return int(latest or 0)


def refunded_so_far(session: Session, payment: Payment) -> int:
    return max(payment.amount_refunded or 0, pending_refunded_after(session, payment))


def refundable_cents(session: Session, payment: Payment) -> int:
    if payment.status not in REFUNDABLE_STATUSES:
        return 0
    return max(0, payment.amount_cents - refunded_so_far(session, payment))


def _checked_amount(session: Session, payment: Payment, payment_ref: str, amount) -> int:
    if payment.status in ("unpaid", "failed"):
        raise RefundRefused(f"payment {payment_ref} was never paid ({payment.status}): nothing to refund")
    if payment.status == DISPUTED:
        raise RefundRefused(f"payment {payment_ref} is disputed: Stripe doesn't refund a disputed charge")
    left = refundable_cents(session, payment)
    if left <= 0:
        raise RefundRefused(f"payment {payment_ref} is already fully refunded")
    if amount is None:
        return left
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise RefundRefused(f"the amount must be a positive whole number of cents, not {amount!r}")
    if amount > left:
        raise RefundRefused(f"the amount {amount} is over what is left to refund on payment {payment_ref}: "
                            f"{left} {payment.currency.upper()} cents")
    return amount


def parse_amount(text) -> int | None:
    """--amount as typed: whole cents, e.g. 1500; empty means what is left."""
    if text is None or str(text).strip() == "":
        return None
    raw = str(text).strip().replace("_", "")
    if not raw.isdigit():
        raise RefundRefused(f"the amount must be a positive whole number of cents, not {text!r}")
    return int(raw)


# --- the preview ----------------------------------------------------------------------------------

def charge_refunded_event(payment: Payment, *, refunded_after: int, settings: Settings,
                          customer: str | None) -> tuple[dict, dict]:
    """(event, prefetch facts) shaped like the `charge.refunded` Stripe sends for this payment's charge."""
    intent = payment.payment_intent_id
    facts: dict = {}
    if not intent and not payment.charge_id:  # an invoice payment not yet linked to its charge: as prefetch does
        intent = f"pi_preview_{payment.id}"
        facts = {"invoices": {intent: payment.invoice_id}}
    created = int(utcnow().timestamp())
    charge = {"id": payment.charge_id or f"ch_preview_{payment.id}", "object": "charge",
              "amount": payment.amount_cents, "amount_captured": payment.amount_cents,
              "amount_refunded": refunded_after, "captured": True, "created": created,
              "currency": payment.currency, "customer": customer, "disputed": False,
              "livemode": settings.livemode, "metadata": {}, "paid": True, "payment_intent": intent,
              "refunded": refunded_after >= payment.amount_cents, "status": "succeeded"}
    event = {"id": f"evt_preview_refund_{payment.id}", "object": "event", "type": "charge.refunded",
             "api_version": None, "created": created, "livemode": settings.livemode, "data": {"object": charge}}
    return event, facts


def _preview_in_session(session: Session, payment_id: int, *, refunded_after: int, settings: Settings) -> Preview:
    payment = session.get(Payment, payment_id)
    customer = session.execute(select(Account.stripe_customer_id)
                               .where(Account.user_id == payment.user_id)).scalar() if payment.user_id else None
    pending = pending_refunded_after(session, payment)
    if pending > (payment.amount_refunded or 0):  # refunds made here that Stripe hasn't reported yet apply first
        event, facts = charge_refunded_event(payment, refunded_after=pending, settings=settings, customer=customer)
        try:
            with session.begin_nested():
                handlers.handle(session, EventContext(event=event, settings=settings, facts=facts, source="preview"))
        except handlers.NeedsAttention:
            pass  # the new refund's run below meets the same problem and reports it
        session.expire_all()
        payment = session.get(Payment, payment_id)
    event, facts = charge_refunded_event(payment, refunded_after=refunded_after, settings=settings, customer=customer)
    return diff_in_session(session, EventContext(event=event, settings=settings, facts=facts, source="preview"))


def _plan(payment_ref: str, amount, engine: Engine, settings: Settings) -> tuple[int, int, int, int, str, str | None]:
    """(payment id, amount, refunded before, refunded after, currency, user id), or RefundRefused."""
    with db.read_session(engine) as session:
        try:
            payment = find_payment(session, payment_ref)
        except RefundRefused:
            payment = None
    aliases = stripe_aliases(payment_ref, settings=settings) if payment is None else {}
    with db.read_session(engine) as session:
        payment = find_payment(session, payment_ref, aliases=aliases)
        amount = _checked_amount(session, payment, payment_ref.strip(), amount)
        before = refunded_so_far(session, payment)
        return payment.id, amount, before, before + amount, payment.currency, payment.user_id


def preview_refund(*, payment_ref: str, engine: Engine, settings: Settings,
                   amount: int | None = None) -> RefundOutcome:
    """What refunding `amount` cents (default: what is left) would take back, changing nothing."""
    payment_id, amount, before, after, currency, user_id = _plan(payment_ref, amount, engine, settings)
    preview = rolled_back(engine, lambda session: _preview_in_session(session, payment_id, refunded_after=after,
                                                                      settings=settings))
    return RefundOutcome(payment=payment_ref.strip(), payment_id=payment_id, user_id=user_id, amount=amount,
                         currency=currency, refunded_before=before, refunded_after=after, preview=preview)


# --- the refund -----------------------------------------------------------------------------------

def request_digest(*, operator: str, reason: str, request: str, amount: int | None) -> str:
    """Who asked, why, for how much, and the page's per-form token: one operator request."""
    parts = (operator, reason, request, "rest" if amount is None else str(amount))
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24]


def idempotency_key(*, target: str, refunded_after: int, digest: str) -> str:
    """The same operator request for the same cumulative amount of the same charge: one refund, however
    often it is sent (a network retry, a repeat after a crash between Stripe's answer and our insert)."""
    return f"refund:{target}:{refunded_after}:{digest}"


def _stripe_target(payment: Payment, client) -> dict:
    """What to name in refunds.create: the PaymentIntent, else the charge, else (an invoice payment whose
    event named neither) the PaymentIntent or charge Stripe's invoice payments list gives."""
    from .stripe_client import stripe_errors

    if payment.payment_intent_id:
        return {"payment_intent": payment.payment_intent_id}
    if payment.charge_id:
        return {"charge": payment.charge_id}
    if payment.invoice_id:
        with stripe_errors(f"looking up the payment of invoice {payment.invoice_id}"):
            found = client.v1.invoice_payments.list(params={"invoice": payment.invoice_id, "limit": 10})
        for record in found.data:
            paid = (record.to_dict() if hasattr(record, "to_dict") else record).get("payment") or {}
            for name in ("payment_intent", "charge"):
                ident = _stripe_id(paid.get(name))
                if ident:
                    return {name: ident}
    raise RefundRefused(f"Stripe names no charge for payment {payment.id}: refund it in Stripe's Dashboard")


def create_refund(*, payment_ref: str, reason: str | None, operator: str, engine: Engine, settings: Settings,
                  amount: int | None = None, request: str = "", client=None) -> RefundOutcome:
    """Refund in Stripe and record the request; the credits are taken back when charge.refunded arrives.
    `request` tells apart two deliberate refunds of the same amount by the same operator (the page passes
    one token per filled-in form)."""
    from .stripe_client import StripeProblem, make_stripe_client, stripe_errors

    operator = ledger.check_text(operator, what="the operator name", max_length=ledger.MAX_OPERATOR_LENGTH)
    reason = (ledger.check_text(reason, what="the reason", max_length=MAX_REASON_LENGTH, allow_newlines=True)
              if reason and reason.strip() else "")
    digest = request_digest(operator=operator, reason=reason, request=request, amount=amount)
    if request:  # the page's form submitted again after its refund was made (a rerun cut off, a double click)
        earlier = _made_earlier(engine, payment_ref=payment_ref, digest=digest)
        if earlier is not None:
            return earlier
    outcome = preview_refund(payment_ref=payment_ref, amount=amount, engine=engine, settings=settings)
    client = client or make_stripe_client(settings)
    with db.read_session(engine) as session:
        payment = session.get(Payment, outcome.payment_id)
    target = _stripe_target(payment, client)
    key = idempotency_key(target=next(iter(target.values())), refunded_after=outcome.refunded_after, digest=digest)
    metadata = {"operator": operator, "payment": outcome.payment} | ({"reason": reason} if reason else {})
    params = {**target, "amount": outcome.amount, "reason": STRIPE_REASON, "metadata": metadata}
    try:
        with stripe_errors(f"refunding {outcome.amount} {outcome.currency.upper()} cents of {outcome.payment}",
                           settings=settings):
            refund = client.v1.refunds.create(params=params, options={"idempotency_key": key})
    except StripeProblem as exc:
        raise RefundRefused(f"Stripe refused the refund: {exc}") from None
    _record(engine, payment=payment, outcome=outcome, refund_id=refund.id, key=key, operator=operator, reason=reason)
    outcome.refund, outcome.operator, outcome.reason = refund.id, operator, reason or None
    return outcome


def _made_earlier(engine: Engine, *, payment_ref: str, digest: str) -> RefundOutcome | None:
    """The refund this very request already made, with the account as it is now; None when there is none."""
    with db.read_session(engine) as session:
        try:
            payment = find_payment(session, payment_ref)
        except RefundRefused:
            return None
        row = session.execute(select(RefundRequest).where(RefundRequest.payment_id == payment.id,
                                                          RefundRequest.idempotency_key.endswith(f":{digest}"))
                              ).scalars().first()
        if row is None:
            return None
        now = ledger.account_summary(session, payment.user_id) if payment.user_id else None
    account = [AccountChange(user_id=now.user_id, balance_before=now.balance, balance_after=now.balance,
                             spendable_before=now.spendable_balance, spendable_after=now.spendable_balance,
                             tier_before=now.tier, tier_after=now.tier, flagged_before=now.flagged,
                             flagged_after=now.flagged, flag_reason_after=now.flag_reason)] if now else []
    preview = Preview(event_id="", event_type="charge.refunded", status_before=None, status_after="processed",
                      reason_after=None, accounts=account, changes=[])
    return RefundOutcome(payment=payment_ref.strip(), payment_id=payment.id, user_id=payment.user_id,
                         amount=row.amount_cents, currency=row.currency,
                         refunded_before=row.refunded_after - row.amount_cents,
                         refunded_after=row.refunded_after, preview=preview, refund=row.stripe_refund_id,
                         operator=row.operator, reason=row.reason or None, made_earlier=True)


def _record(engine: Engine, *, payment: Payment, outcome: RefundOutcome, refund_id: str, key: str, operator: str,
            reason: str) -> None:
    with db.write_session(engine) as session:
        if session.execute(select(RefundRequest.id).where(RefundRequest.stripe_refund_id == refund_id)).first():
            return  # Stripe replayed the refund for a retried request: recorded already
        session.add(RefundRequest(payment_id=payment.id, user_id=payment.user_id, amount_cents=outcome.amount,
                                  currency=outcome.currency, refunded_after=outcome.refunded_after,
                                  stripe_refund_id=refund_id, idempotency_key=key, operator=operator, reason=reason))


# --- reading --------------------------------------------------------------------------------------

def refund_requests(session: Session, *, payment_ids: list[int] | None = None, user_id: str | None = None,
                    limit: int = 50) -> list[dict]:
    """Refunds made here, newest first, each `pending` until Stripe's charge.refunded reached it."""
    stmt = (select(RefundRequest, Payment.amount_refunded)
            .join(Payment, Payment.id == RefundRequest.payment_id)
            .order_by(RefundRequest.created_at.desc(), RefundRequest.id.desc()).limit(limit))
    if payment_ids is not None:
        stmt = stmt.where(RefundRequest.payment_id.in_(payment_ids))
    if user_id is not None:
        stmt = stmt.where(RefundRequest.user_id == user_id)
    return [{"refund": r.stripe_refund_id, "payment_id": r.payment_id, "user_id": r.user_id,
             "amount_cents": r.amount_cents, "currency": r.currency, "operator": r.operator, "reason": r.reason,
             "created_at": r.created_at, "status": "applied" if refunded >= r.refunded_after else "pending"}
            for r, refunded in session.execute(stmt).all()]


def payment_ref(payment: Payment) -> str | None:
    """The id the Payments page shows for a payment (and `refund` accepts)."""
    return payment.checkout_session_id or payment.invoice_id or payment.payment_intent_id or payment.charge_id


def refundable_payments(session: Session, *, user_id: str | None = None, payment_ids: list[int] | None = None,
                        limit: int = 50) -> list[dict]:
    """Payments with something left to refund, newest first, with what is left (pending refunds counted)."""
    stmt = (select(Payment).where(Payment.status.in_(REFUNDABLE_STATUSES), Payment.amount_cents > 0)
            .order_by(Payment.created_at.desc(), Payment.id.desc()).limit(limit))
    if user_id is not None:
        stmt = stmt.where(Payment.user_id == user_id)
    if payment_ids is not None:
        stmt = stmt.where(Payment.id.in_(payment_ids))
    found = []
    for payment in session.execute(stmt).scalars():
        left = refundable_cents(session, payment)
        if left > 0 and payment_ref(payment):
            found.append({"payment_id": payment.id, "ref": payment_ref(payment), "user_id": payment.user_id,
                          "amount_cents": payment.amount_cents, "currency": payment.currency,
                          "refunded_cents": payment.amount_refunded, "left_cents": left, "item": payment.item,
                          "created_at": payment.created_at})
    return found
