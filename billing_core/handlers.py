"""What each Stripe event means for the ledger: one function per event type, in one table (HANDLERS).

Every handler runs inside the write transaction that also marks its event processed, so an event's
effects and its status commit together or not at all. Every effect has a deterministic source key
(`checkout:{session}`, `invoice:{invoice}:...`, `upgrade:{sub}:{period_end}:{tier}`), so redelivery,
the same payment arriving as two event types, and the checkout success page all apply it once.

Handlers read what the event says and never ask Stripe for it. The one thing an event can't say:
a charge or dispute of an invoice payment names only its PaymentIntent, and the current API's invoice
no longer names its PaymentIntent, so Stripe's invoice payments list is the only link between the two.
`prefetch` asks it (`invoice_for_payment_intent`) before the write transaction opens, so no database
lock is held during the HTTP call, and hands the answer to the handler in `EventContext.facts`.

A handler raises NeedsAttention when the event's user or price can't be determined: the event is
kept with the reason (its effects rolled back) and an operator can assign the user and reprocess it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from sqlalchemy import select
from sqlmodel import Session

from . import ledger
from .checkout import mark_link_status
from .catalog import CATALOG, CatalogItem, allowance, find_item_for_price, get_item, UnknownItem
from .models import Account, CheckoutLink, Dispute, Payment, Subscription, from_epoch, utcnow
from .settings import Settings, get_settings

log = logging.getLogger("billing_core.handlers")

PAID_CHECKOUT = ("paid", "no_payment_required")
# Payment statuses that a later "paid" must not overwrite.
SETTLED_PAYMENT_STATUSES = ("refunded", "partially_refunded", "disputed")
# On equal snapshot times, the status that is further along wins (a cancellation beats everything).
STATUS_RANK = {"incomplete": 0, "incomplete_expired": 1, "trialing": 2, "active": 3, "paused": 4,
               "past_due": 4, "unpaid": 5, "canceled": 9}
REACTIVATED_BY_PAYMENT = ("incomplete", "past_due", "unpaid")
UPGRADABLE_STATUSES = ("active", "trialing")
LOST_DISPUTE = "lost"
DISPUTED = "disputed"  # a payment's status from its dispute's opening; stays after a lost one


class NeedsAttention(Exception):
    """The event can't be applied without a person (unknown user, unknown price, unknown payment)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class EventContext:
    event: dict
    settings: Settings
    assigned_user_id: str | None = None
    source: str = "webhook"
    # What `prefetch` learned from Stripe before the write transaction: {"invoices": {payment_intent: invoice}}
    facts: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.event["id"]

    @property
    def type(self) -> str:
        return self.event["type"]

    @property
    def created(self) -> int:
        return int(self.event.get("created") or 0)

    @property
    def obj(self) -> dict:
        return self.event["data"]["object"]

    @property
    def previous_attributes(self) -> dict:
        return dig(self.event, "data", "previous_attributes") or {}


@dataclass
class Handled:
    user_id: str | None = None
    ignored: bool = False
    note: str | None = None


# --- reading Stripe objects defensively ------------------------------------------------------

def dig(obj: Any, *path: str | int) -> Any:
    """obj[a][b][c], or None when any step is missing or of the wrong kind."""
    for step in path:
        if isinstance(step, int):
            if not isinstance(obj, list) or not -len(obj) <= step < len(obj):
                return None
        elif not isinstance(obj, dict):
            return None
        obj = obj[step] if isinstance(step, int) else obj.get(step)
    return obj


# Bounds that every stored value fits on SQLite and PostgreSQL alike (varchar lengths, BIGINT, datetime).
MAX_ID_CHARS = 100
MAX_AMOUNT = 10**12  # minor units: far above any real payment, far below BIGINT
MAX_EPOCH = 253402300799  # 9999-12-31T23:59:59Z, the last second a datetime holds


def printable(value: Any, limit: int = 1000) -> str:
    """Text safe for an error column or a log line: non-printable characters (NUL, lone surrogates,
    escapes) replaced, so a customer-controlled value can't break the database or forge log lines."""
    text = value if isinstance(value, str) else repr(value)
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def shown(value: Any) -> str:
    """A short, safe rendering of a value for a needs-attention reason."""
    text = printable(value, 40)
    return text + "..." if len(value if isinstance(value, str) else repr(value)) > 40 else text


def id_of(value: Any) -> str | None:
    """A Stripe reference: either an id string or an expanded object carrying `id`. None when absent;
    NeedsAttention when it is a string that can't be a Stripe id (too long, not printable ASCII)."""
    if isinstance(value, dict):
        value = value.get("id")
    if not isinstance(value, str) or not value:
        return None
    if len(value) > MAX_ID_CHARS or not (value.isascii() and value.isprintable()) or " " in value:
        raise NeedsAttention(f"malformed Stripe id {shown(value)}: an id is at most {MAX_ID_CHARS} printable "
                             "ASCII characters")
    return value


def lenient_id(value: Any) -> str | None:
    """id_of for code outside a handler (prefetch, related ids): a malformed id is simply no id."""
    try:
        return id_of(value)
    except NeedsAttention:
        return None


def as_int(value: Any, default: int = 0) -> int:
    """A number only compared, never stored (a line's amount); anything else is `default`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        return default
    return int(value)


def as_amount(value: Any, *, what: str) -> int:
    """An amount in minor units that will be stored: 0 when absent, NeedsAttention when not 0..MAX_AMOUNT."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_AMOUNT:
        raise NeedsAttention(f"{what} {shown(value)} is not an amount in minor units (0 to {MAX_AMOUNT})")
    return value


def as_epoch(value: Any, *, what: str) -> int | None:
    """A Unix time that will be stored or turned into a datetime: None when absent or 0."""
    if value is None or (value == 0 and not isinstance(value, bool)):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_EPOCH:
        raise NeedsAttention(f"{what} {shown(value)} is not a Unix time")
    return value


def moment_of(value: Any, *, what: str):
    """A Stripe `created` as a datetime (now when absent)."""
    return from_epoch(as_epoch(value, what=what)) or utcnow()


def as_text(value: Any, *, what: str, max_len: int) -> str | None:
    """A string that will be stored: None when absent or empty, NeedsAttention when not printable text
    of at most `max_len` characters (the column's length on PostgreSQL)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > max_len or not value.isprintable():
        raise NeedsAttention(f"{what} {shown(value)} is not text of at most {max_len} printable characters")
    return value


def as_currency(value: Any, *, default: str) -> str:
    if value is None or value == "":
        return default
    if not isinstance(value, str) or len(value) != 3 or not value.isascii() or not value.isalpha():
        raise NeedsAttention(f"currency {shown(value)} is not a three-letter currency code")
    return value.lower()


def dicts(value: Any) -> list[dict]:
    """The objects of a list field (lines, line items); anything else in it, or a non-list, is skipped."""
    return [found for found in value if isinstance(found, dict)] if isinstance(value, list) else []


def required_id(obj: dict, prefix: str, what: str) -> str:
    value = id_of(obj)
    if not value or not value.startswith(prefix):
        raise NeedsAttention(f"{what} has no valid id (expected {prefix}...)")
    return value


def metadata_user(obj: Any) -> str | None:
    value = dig(obj, "metadata", "user_id")
    if not isinstance(value, str) or not value.strip():
        return None
    return as_text(value.strip(), what="metadata.user_id", max_len=200)


def plan_for_price(price_id: str | None, settings: Settings) -> CatalogItem | None:
    item = find_item_for_price(price_id, settings)
    return item if item and item.kind == "plan" else None


PLANS_BY_LOOKUP_KEY = {item.lookup_key: item for item in CATALOG.values() if item.kind == "plan"}


def plan_for_price_object(price: Any, settings: Settings) -> CatalogItem | None:
    """The plan a price stands for: its configured id, else (a price replaced by sync-catalog, still on
    existing subscriptions) the catalog lookup key it carries, else its `metadata.item`."""
    plan = plan_for_price(id_of(price), settings)
    if plan is not None or not isinstance(price, dict):
        return plan
    lookup_key = price.get("lookup_key")
    if isinstance(lookup_key, str) and lookup_key in PLANS_BY_LOOKUP_KEY:
        return PLANS_BY_LOOKUP_KEY[lookup_key]
    return plan_named(dig(price, "metadata", "item"))


def plan_named(key: Any) -> CatalogItem | None:
    item = CATALOG.get(key) if isinstance(key, str) else None
    return item if item is not None and item.kind == "plan" else None


def related_ids(obj: dict) -> set[str]:
    """The Stripe ids an event's object records or links (itself, its customer, subscription, invoice,
    payment intent, charge): a waiting event mentioning one of them may be resolvable now."""
    found = {lenient_id(obj.get(name)) for name in ("id", "customer", "subscription", "payment_intent", "invoice",
                                                    "charge")}
    if obj.get("object") == "invoice":
        try:
            found.add(invoice_subscription_id(obj))
        except NeedsAttention:
            pass
    return {ident for ident in found if ident and "_" in ident.strip("_")}


# --- finding the user ------------------------------------------------------------------------

def user_for_customer(session: Session, customer_id: str | None) -> str | None:
    if not customer_id:
        return None
    return session.execute(select(Account.user_id).where(Account.stripe_customer_id == customer_id)).scalar()


def resolve_user(session: Session, ctx: EventContext, *, explicit: str | None, subscription_id: str | None = None,
                 customer_id: str | None = None, what: str) -> str:
    """The event's own user id first, then the operator's assignment, then what we stored earlier."""
    if explicit:
        return explicit
    if ctx.assigned_user_id:
        return ctx.assigned_user_id
    if subscription_id:
        row = session.get(Subscription, subscription_id)
        if row is not None:
            return row.user_id
    user_id = user_for_customer(session, customer_id)
    if user_id:
        return user_id
    raise NeedsAttention(f"can't tell which user {what} belongs to: no metadata.user_id"
                         + (f", and customer {customer_id} is not linked to an account" if customer_id else "")
                         + "; assign the user and reprocess")


# --- checkout --------------------------------------------------------------------------------

def _checkout_item(session: Session, checkout_session: dict, settings: Settings) -> CatalogItem | None:
    key = dig(checkout_session, "metadata", "item")
    if isinstance(key, str) and key:
        try:
            return get_item(key)
        except UnknownItem:
            raise NeedsAttention(f"checkout session names unknown item {key!r}") from None
    for line in dicts(dig(checkout_session, "line_items", "data")):
        item = find_item_for_price(id_of(dig(line, "price")), settings)
        if item:
            return item
    link = session.execute(select(CheckoutLink).where(CheckoutLink.session_id == checkout_session["id"])).scalars().first()
    return get_item(link.item) if link else None


def _checkout_user(session: Session, checkout_session: dict, assigned_user_id: str | None) -> str:
    explicit = metadata_user(checkout_session) or as_text(checkout_session.get("client_reference_id"),
                                                          what="client_reference_id", max_len=200)
    if explicit or assigned_user_id:
        return explicit or assigned_user_id
    link = session.execute(select(CheckoutLink).where(CheckoutLink.session_id == checkout_session["id"])).scalars().first()
    if link:
        return link.user_id
    user_id = user_for_customer(session, id_of(checkout_session.get("customer")))
    if user_id:
        return user_id
    raise NeedsAttention(f"can't tell which user checkout session {checkout_session['id']} belongs to "
                         "(no metadata.user_id or client_reference_id); assign the user and reprocess")


def mark_link(session: Session, session_id: str, status: str) -> None:
    mark_link_status(session, session_id=session_id, status=status)


def _checkout_payment(session: Session, checkout_session: dict, *, user_id: str, item: CatalogItem) -> Payment:
    session_id = checkout_session["id"]
    payment = session.execute(select(Payment).where(Payment.checkout_session_id == session_id)).scalars().first()
    if payment is None:
        payment = Payment(user_id=user_id, source="checkout", checkout_session_id=session_id, item=item.key,
                          kind=item.kind, status="unpaid",
                          amount_cents=as_amount(checkout_session.get("amount_total"), what="amount_total"),
                          currency=as_currency(checkout_session.get("currency"), default=item.currency),
                          created_at=moment_of(checkout_session.get("created"), what="checkout session created"))
    payment.payment_intent_id = payment.payment_intent_id or id_of(checkout_session.get("payment_intent"))
    payment.updated_at = utcnow()
    session.add(payment)
    session.flush()
    return payment


def fulfil_checkout_session(session: Session, checkout_session: dict, *, settings: Settings | None = None,
                            assigned_user_id: str | None = None) -> Handled:
    """Apply a Checkout Session: link the customer, record the payment, grant a paid pack once.

    The webhook and the success page both call this; the grant's source key `checkout:{session id}`
    makes the second caller a no-op.
    """
    settings = settings or get_settings()
    session_id = required_id(checkout_session, "cs_", "checkout session")
    user_id = _checkout_user(session, checkout_session, assigned_user_id)
    customer_id = id_of(checkout_session.get("customer"))
    email = as_text(dig(checkout_session, "customer_details", "email") or checkout_session.get("customer_email"),
                    what="customer email", max_len=320)
    ledger.lock_account(session, user_id=user_id, email=email, stripe_customer_id=customer_id)
    mode = checkout_session.get("mode")
    if mode == "payment":
        _fulfil_payment(session, checkout_session, user_id=user_id, settings=settings)
    elif mode == "subscription":
        _link_subscription(session, checkout_session, user_id=user_id, settings=settings)
    else:
        return Handled(user_id=user_id, ignored=True, note=f"checkout mode {mode!r} grants nothing")
    if checkout_session.get("status") == "complete":
        mark_link(session, session_id, "complete")
    return Handled(user_id=user_id)


def _fulfil_payment(session: Session, checkout_session: dict, *, user_id: str, settings: Settings) -> None:
    item = _checkout_item(session, checkout_session, settings)
    if item is None or item.kind != "pack":
        what = "no item" if item is None else f"plan {item.key} in payment mode"
        raise NeedsAttention(f"checkout session {checkout_session['id']} names {what}; can't tell which pack "
                             "was bought")
    payment = _checkout_payment(session, checkout_session, user_id=user_id, item=item)
    if checkout_session.get("payment_status") not in PAID_CHECKOUT:
        return  # unpaid (delayed payment method): the async_payment_succeeded event grants
    if payment.status not in SETTLED_PAYMENT_STATUSES:
        payment.status = "paid"
    entry = ledger.grant_pack(session, user_id=user_id, credits=item.credits,
                              source_key=f"checkout:{checkout_session['id']}", payment_id=payment.id)
    if entry is not None:
        payment.credits_granted += entry.credits
    session.add(payment)
    session.flush()
    apply_earlier_reversals(session, payment)


def apply_earlier_reversals(session: Session, payment: Payment) -> None:
    """A refund or dispute recorded before the payment's credits were granted (e.g. against the failed first
    attempt of a renewal that was paid on retry) applies to them now; both are idempotent."""
    reversed_cents = (payment.amount_refunded or 0) + (payment.amount_disputed_lost or 0)
    if reversed_cents:
        ledger.clawback_for_payment(session, payment=payment, reversed_cents=reversed_cents)
    open_disputes = session.execute(select(Dispute.id).where(Dispute.payment_id == payment.id,
                                                            Dispute.status == "open")).scalars().all()
    for dispute_id in open_disputes:
        ledger.hold_for_dispute(session, dispute_id=dispute_id, payment=payment)


def _link_subscription(session: Session, checkout_session: dict, *, user_id: str, settings: Settings) -> None:
    """A subscription checkout grants nothing itself (its first invoice does); it maps the subscription
    to the user without touching state that a subscription event already brought."""
    subscription_id = id_of(checkout_session.get("subscription"))
    if not subscription_id or session.get(Subscription, subscription_id) is not None:
        return
    key = dig(checkout_session, "metadata", "item")
    tier = key if isinstance(key, str) and allowance(key) > 0 else "none"
    session.add(Subscription(id=subscription_id, user_id=user_id, tier=tier, status="incomplete", state_at=0,
                             price_id=settings.price_id(tier) or None))
    session.flush()


def on_checkout_completed(session: Session, ctx: EventContext) -> Handled:
    return fulfil_checkout_session(session, ctx.obj, settings=ctx.settings, assigned_user_id=ctx.assigned_user_id)


def on_checkout_async_failed(session: Session, ctx: EventContext) -> Handled:
    checkout_session = ctx.obj
    required_id(checkout_session, "cs_", "checkout session")
    user_id = _checkout_user(session, checkout_session, ctx.assigned_user_id)
    ledger.lock_account(session, user_id=user_id, stripe_customer_id=id_of(checkout_session.get("customer")))
    item = _checkout_item(session, checkout_session, ctx.settings)
    if item is None:
        raise NeedsAttention(f"checkout session {checkout_session['id']} names no item")
    payment = _checkout_payment(session, checkout_session, user_id=user_id, item=item)
    if payment.status == "unpaid":
        payment.status = "failed"
        session.add(payment)
        session.flush()
    return Handled(user_id=user_id)


def on_checkout_expired(session: Session, ctx: EventContext) -> Handled:
    session_id = required_id(ctx.obj, "cs_", "checkout session")
    mark_link(session, session_id, "expired")
    link = session.execute(select(CheckoutLink.user_id).where(CheckoutLink.session_id == session_id)).scalar()
    return Handled(user_id=link or metadata_user(ctx.obj))


# --- subscriptions ---------------------------------------------------------------------------

def _newer(row: Subscription, *, created: int, status: str) -> bool:
    if created != row.state_at:
        return created > row.state_at
    return STATUS_RANK.get(status, 3) >= STATUS_RANK.get(row.status, 3)


def _subscription_facts(sub: dict, settings: Settings) -> tuple[str | None, CatalogItem | None, int | None]:
    first_item = dig(sub, "items", "data", 0)
    price = dig(first_item, "price") or dig(sub, "plan")  # older APIs: top-level plan
    period_end = dig(first_item, "current_period_end") or sub.get("current_period_end")  # older APIs: top level
    return id_of(price), plan_for_price_object(price, settings), as_epoch(period_end, what="current_period_end")


def on_subscription_changed(session: Session, ctx: EventContext) -> Handled:
    sub = ctx.obj
    subscription_id = required_id(sub, "sub_", "subscription")
    deleted = ctx.type == "customer.subscription.deleted"
    customer_id = id_of(sub.get("customer"))
    user_id = resolve_user(session, ctx, explicit=metadata_user(sub), subscription_id=subscription_id,
                           customer_id=customer_id, what=f"subscription {subscription_id}")
    ledger.lock_account(session, user_id=user_id, stripe_customer_id=customer_id)
    price_id, plan, period_end = _subscription_facts(sub, ctx.settings)
    if plan is None and not deleted:
        raise NeedsAttention(f"subscription {subscription_id} has price {price_id!r}, which is not a configured "
                             "plan price")
    status = "canceled" if deleted else (as_text(sub.get("status"), what="subscription status", max_len=40)
                                         or "incomplete")
    row = session.get(Subscription, subscription_id)
    if row is not None:
        session.refresh(row)
    previous_tier = row.tier if row is not None else None
    previous_period_end = row.current_period_end if row is not None else None
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
                       previous_tier=previous_tier if applied else None, previous_period_end=previous_period_end)
    return Handled(user_id=row.user_id)


def _upgrade_topup(session: Session, ctx: EventContext, *, row: Subscription, plan: CatalogItem, status: str,
                   period_end: int | None, previous_tier: str | None, previous_period_end: int | None) -> None:
    """A move to a higher tier mid-period tops the period up by the difference (once per period)."""
    old_plan = plan_for_price_object(dig(ctx.previous_attributes, "items", "data", 0, "price"), ctx.settings)
    old_tier = old_plan.key if old_plan else previous_tier
    old_period_end = (as_int(dig(ctx.previous_attributes, "items", "data", 0, "current_period_end"))
                      or previous_period_end)
    if old_period_end and period_end and old_period_end < period_end:
        return  # a plan change taking effect at renewal: the renewal invoice grants the new allowance
    if (not period_end or not old_tier or allowance(old_tier) <= 0 or allowance(plan.key) <= allowance(old_tier)
            or status not in UPGRADABLE_STATUSES or row.status in ("canceled", "incomplete_expired")):
        return
    ledger.grant_upgrade_topup(session, user_id=row.user_id, subscription_id=row.id, period_end=period_end,
                               from_tier=old_tier, to_tier=plan.key, source_key=upgrade_key(row.id, period_end, plan.key),
                               rollover=ctx.settings.subscription_credits_rollover)


# --- invoices --------------------------------------------------------------------------------

def invoice_subscription_id(invoice: dict) -> str | None:
    found = (id_of(dig(invoice, "parent", "subscription_details", "subscription"))
             or id_of(invoice.get("subscription")))  # older APIs
    if found:
        return found
    for line in dicts(dig(invoice, "lines", "data")):
        found = id_of(dig(line, "parent", "subscription_item_details", "subscription")) or id_of(line.get("subscription"))
        if found:
            return found
    return None


def line_price(line: dict) -> str | None:
    return (id_of(dig(line, "pricing", "price_details", "price"))
            or id_of(line.get("price")) or id_of(dig(line, "plan")))  # older APIs


def line_is_proration(line: dict) -> bool:
    return bool(dig(line, "parent", "subscription_item_details", "proration") or line.get("proration")
                or dig(line, "parent", "invoice_item_details", "proration"))


def _replaced_tier(plan_lines: list[tuple[dict, CatalogItem, int]], period_end: int) -> str:
    """The plan a proration invoice credits back (its negative line for the same period), or 'none'."""
    credited = [plan for line, plan, end in plan_lines
                if end == period_end and line_is_proration(line) and as_int(line.get("amount")) < 0]
    return max(credited, key=lambda plan: plan.credits).key if credited else "none"


def upgrade_key(subscription_id: str, period_end: int, tier: str) -> str:
    """The source key of an upgrade reported by a subscription event; its proration invoice claims that lot."""
    return f"upgrade:{subscription_id}:{period_end}:{tier}"


def _plan_lines(session: Session, invoice: dict, settings: Settings,
                subscription_id: str | None) -> list[tuple[dict, CatalogItem, int]]:
    found = []
    for line in dicts(dig(invoice, "lines", "data")):
        plan = _line_plan(session, invoice, line, settings, subscription_id)
        period_end = as_epoch(dig(line, "period", "end"), what="invoice line period end")
        if plan is not None and period_end:
            found.append((line, plan, period_end))
    return found


def _line_plan(session: Session, invoice: dict, line: dict, settings: Settings,
               subscription_id: str | None) -> CatalogItem | None:
    """A line's plan by its configured price; for a price no longer configured (replaced by sync-catalog),
    the stored subscription that a subscription event recorded with that price, then (regular lines
    only: a proration's old-plan line must not pass for the new plan) the item our checkout put in the
    subscription's metadata."""
    price = dig(line, "pricing", "price_details", "price") or line.get("price") or dig(line, "plan")
    plan = plan_for_price_object(price, settings)
    price_id = id_of(price)
    if plan is not None or not price_id:
        return plan
    row = session.get(Subscription, subscription_id) if subscription_id else None
    if row is not None and row.price_id == price_id and plan_named(row.tier):
        return plan_named(row.tier)
    if line_is_proration(line):
        return None
    return plan_named(dig(invoice, "parent", "subscription_details", "metadata", "item"))


def _invoice_payment(session: Session, invoice: dict, *, user_id: str, subscription_id: str, item: str | None,
                     status: str) -> Payment:
    invoice_id = invoice["id"]
    payment = session.execute(select(Payment).where(Payment.invoice_id == invoice_id)).scalars().first()
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
    payment.updated_at = utcnow()
    session.add(payment)
    session.flush()
    return payment


def _invoice_user(session: Session, ctx: EventContext, invoice: dict, subscription_id: str) -> str:
    explicit = metadata_user(dig(invoice, "parent", "subscription_details")) or metadata_user(invoice)
    return resolve_user(session, ctx, explicit=explicit, subscription_id=subscription_id,
                        customer_id=id_of(invoice.get("customer")), what=f"invoice {invoice.get('id')}")


def on_invoice_paid(session: Session, ctx: EventContext) -> Handled:
    invoice = ctx.obj
    invoice_id = required_id(invoice, "in_", "invoice")
    subscription_id = invoice_subscription_id(invoice)
    if not subscription_id:
        return Handled(ignored=True, note="invoice is not for a subscription")
    user_id = _invoice_user(session, ctx, invoice, subscription_id)
    ledger.lock_account(session, user_id=user_id, stripe_customer_id=id_of(invoice.get("customer")),
                        email=as_text(invoice.get("customer_email"), what="customer email", max_len=320))
    plan_lines = _plan_lines(session, invoice, ctx.settings, subscription_id)
    reason = invoice.get("billing_reason")
    base = None
    if reason in ("subscription_create", "subscription_cycle"):
        regular = [found for found in plan_lines if not line_is_proration(found[0]) and as_int(found[0].get("amount")) >= 0]
        base = max(regular or plan_lines, key=lambda found: found[2], default=None)
        if base is None:
            prices = [line_price(line) for line in dicts(dig(invoice, "lines", "data"))]
            raise NeedsAttention(f"invoice {invoice_id} has no line with a configured plan price (prices: {prices})")
    upgrades = [found for found in plan_lines if line_is_proration(found[0]) and as_int(found[0].get("amount")) > 0]
    item = base[1].key if base else (upgrades[0][1].key if upgrades else None)
    payment = _invoice_payment(session, invoice, user_id=user_id, subscription_id=subscription_id, item=item,
                               status="paid")
    row = _subscription_after_payment(session, ctx, subscription_id=subscription_id, user_id=user_id, base=base)
    if row is not None and row.status == "canceled":
        return Handled(user_id=user_id, note="subscription already canceled: nothing granted")
    written = []
    for line, plan, period_end in upgrades:  # proration for a move to a higher tier mid-period
        written.append(ledger.grant_upgrade_topup(
            session, user_id=user_id, subscription_id=subscription_id, period_end=period_end,
            from_tier=_replaced_tier(plan_lines, period_end), to_tier=plan.key, payment_id=payment.id,
            source_key=f"invoice:{invoice_id}:upgrade:{period_end}",
            claims_lot=upgrade_key(subscription_id, period_end, plan.key),
            rollover=ctx.settings.subscription_credits_rollover))
    if base is not None:
        written.append(ledger.grant_subscription_period(
            session, user_id=user_id, subscription_id=subscription_id, period_end=base[2], tier=base[1].key,
            payment_id=payment.id, source_key=f"invoice:{invoice_id}:period:{base[2]}",
            rollover=ctx.settings.subscription_credits_rollover))
    if any(written) or not payment.credits_granted:  # not again for the invoice's second event type
        payment.credits_granted = ledger.credits_paid_by(session, payment)
        session.add(payment)
        session.flush()
        apply_earlier_reversals(session, payment)
    return Handled(user_id=user_id)


def _subscription_after_payment(session: Session, ctx: EventContext, *, subscription_id: str, user_id: str,
                                base: tuple[dict, CatalogItem, int] | None) -> Subscription | None:
    """A paid invoice for a period means an active subscription with that period's plan, unless newer state
    says otherwise. Other invoices (prorations) leave the state to the subscription events."""
    row = session.get(Subscription, subscription_id)
    if row is not None:
        session.refresh(row)
    elif base is None:
        return None
    else:
        row = Subscription(id=subscription_id, user_id=user_id, status="incomplete", state_at=0)
    if ctx.created < row.state_at or base is None:
        return row
    if base is not None:
        line, plan, period_end = base
        row.tier, row.price_id = plan.key, line_price(line)
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
    ledger.lock_account(session, user_id=user_id, stripe_customer_id=id_of(invoice.get("customer")))
    plan_lines = _plan_lines(session, invoice, ctx.settings, subscription_id)
    _invoice_payment(session, invoice, user_id=user_id, subscription_id=subscription_id,
                     item=plan_lines[0][1].key if plan_lines else None, status="failed")
    row = session.get(Subscription, subscription_id)
    if row is not None:
        session.refresh(row)
    if (row is not None and invoice.get("billing_reason") != "subscription_create"
            and row.status in UPGRADABLE_STATUSES and ctx.created >= row.state_at):
        row.status, row.state_at, row.updated_at = "past_due", ctx.created, utcnow()
        session.add(row)
        session.flush()
    return Handled(user_id=user_id)


# --- charges: refunds and disputes -----------------------------------------------------------

def invoice_for_payment_intent(payment_intent_id: str, *, client=None) -> str | None:
    """The invoice a PaymentIntent paid, from Stripe's invoice payments list (the event doesn't say).
    None when Stripe knows none or isn't configured."""
    from .stripe_client import StripeNotConfigured, get_stripe_client, stripe_errors

    try:
        client = client or get_stripe_client()
    except StripeNotConfigured:
        return None
    with stripe_errors(f"looking up the invoice paid by {payment_intent_id}"):
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


def charge_refs(event: dict) -> tuple[str | None, str | None]:
    """(charge id, payment intent id) of a charge.* event's object (a charge or a dispute)."""
    obj = dig(event, "data", "object") or {}
    charge_id = lenient_id(obj) if obj.get("object") == "charge" else lenient_id(obj.get("charge"))
    return charge_id, lenient_id(obj.get("payment_intent"))


def prefetch(event: dict, *, read_session) -> dict:
    """Facts a handler needs that the event doesn't carry, asked of Stripe BEFORE the write transaction,
    so no database lock is held during an HTTP call: for a charge or dispute whose payment we haven't
    recorded by PaymentIntent or charge, the invoice that its PaymentIntent paid."""
    if not str(event.get("type", "")).startswith("charge."):
        return {}
    charge_id, payment_intent_id = charge_refs(event)
    if not payment_intent_id:
        return {}
    with read_session() as session:
        if recorded_payment_for_charge(session, charge_id=charge_id, payment_intent_id=payment_intent_id):
            return {}
    return {"invoices": {payment_intent_id: invoice_for_payment_intent(payment_intent_id)}}


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
    session.refresh(payment)
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
        session.refresh(row)
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


# --- the table -------------------------------------------------------------------------------

Handler = Callable[[Session, EventContext], Handled]

HANDLERS: dict[str, Handler] = {
    # A customer finished Checkout: link them to their Stripe customer, grant a paid pack once.
    "checkout.session.completed": on_checkout_completed,
    # A delayed payment method (bank debit) cleared after Checkout: now the pack is paid, grant it.
    "checkout.session.async_payment_succeeded": on_checkout_completed,
    # A delayed payment failed after Checkout: the pack stays ungranted, the payment is recorded failed.
    "checkout.session.async_payment_failed": on_checkout_async_failed,
    # An issued link ran out unused: operators see it as expired.
    "checkout.session.expired": on_checkout_expired,
    # A subscription invoice was paid: the period's allowance (or an upgrade's top-up), once per invoice.
    "invoice.paid": on_invoice_paid,
    # The same payment, reported under a second type; the shared source keys make it a no-op.
    "invoice.payment_succeeded": on_invoice_paid,
    # A renewal payment failed: the subscription is past due and its credits freeze.
    "invoice.payment_failed": on_invoice_payment_failed,
    # Subscription state: tier, status, period end, cancel_at_period_end; newer snapshots only.
    "customer.subscription.created": on_subscription_changed,
    # Plan changes (upgrade top-up), renewals, past due, cancel at period end.
    "customer.subscription.updated": on_subscription_changed,
    # The subscription ended: tier none, its remaining credits expire, packs stay.
    "customer.subscription.deleted": on_subscription_changed,
    # Money went back: take back the payment's credits in proportion, idempotent on the cumulative amount.
    "charge.refunded": on_charge_refunded,
    # A chargeback opened: hold the payment's remaining credits and flag the account.
    "charge.dispute.created": on_dispute_created,
    # The chargeback ended: won releases the hold, lost takes the credits back.
    "charge.dispute.closed": on_dispute_closed,
}

EVENT_TYPES = tuple(HANDLERS)


def handle(session: Session, ctx: EventContext) -> Handled:
    handler = HANDLERS.get(ctx.type)
    if handler is None:
        return Handled(ignored=True, note="event type not handled")
    return handler(session, ctx)
