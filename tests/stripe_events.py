"""Stripe event payloads shaped like the current API (2026-10-28.endive), and signed delivery headers.

Written from Stripe's documentation, for tests of the webhook sidecar, reconcile and the benchmarks:
* invoices name their subscription and its metadata under `parent.subscription_details`, and carry no
  `charge`/`payment_intent` (the invoice payments list links them);
* an invoice line's price is `pricing.price_details.price`, its subscription
  `parent.subscription_item_details.subscription`, and proration lines say `proration: true` there;
* a subscription's period is on its items (`items.data[0].current_period_end`);
* `charge.refunded` carries the cumulative `amount_refunded` but no list of refunds.

Every builder returns a plain dict; `event(...)` wraps an object into an event; `encode` gives the exact
body to sign and send; `signed_headers(body, secret)` signs it like Stripe does.
"""
from __future__ import annotations

import itertools
import json
import time

import stripe

API_VERSION = "2026-10-28.endive"
WEBHOOK_SECRET = "whsec_test_webhooks0000000000000000a1b2"
DEFAULT_PRICES = {
    "starter": "price_test_starter_0001", "professional": "price_test_professional_0001",
    "business": "price_test_business_0001", "pack_100": "price_test_pack100_0001",
    "pack_250": "price_test_pack250_0001", "pack_500": "price_test_pack500_0001",
    "pack_1000": "price_test_pack1000_0001",
}
PLAN_AMOUNTS = {"starter": 999, "professional": 2999, "business": 9999}
PACK_AMOUNTS = {"pack_100": 1000, "pack_250": 2000, "pack_500": 3500, "pack_1000": 6000}
_counter = itertools.count(1)


def new_id(prefix: str) -> str:
    return f"{prefix}_T{next(_counter):06d}{int(time.time() * 1000) % 100000:05d}"


def price_env(prices: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables that configure `prices` (default DEFAULT_PRICES) as the catalog's prices."""
    from billing_core.settings import PRICE_SETTINGS

    prices = prices or DEFAULT_PRICES
    return {PRICE_SETTINGS[key]: price_id for key, price_id in prices.items()}


# --- events and delivery ---------------------------------------------------------------------

def event(type: str, obj: dict, *, id: str | None = None, created: int | None = None, livemode: bool = False,
          api_version: str | None = API_VERSION, previous_attributes: dict | None = None) -> dict:
    data: dict = {"object": obj}
    if previous_attributes is not None:
        data["previous_attributes"] = previous_attributes
    return {"id": id or new_id("evt"), "object": "event", "api_version": api_version,
            "created": int(time.time()) if created is None else int(created), "data": data, "livemode": livemode,
            "pending_webhooks": 1, "request": {"id": None, "idempotency_key": None}, "type": type}


def encode(evt: dict) -> str:
    return json.dumps(evt, separators=(",", ":"))


def signed_headers(payload: str | bytes, secret: str = WEBHOOK_SECRET, *, timestamp: int | None = None) -> dict:
    if isinstance(payload, bytes):
        payload = payload.decode("utf-8")
    header = stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp=timestamp)
    return {"Stripe-Signature": header, "Content-Type": "application/json"}


# --- checkout --------------------------------------------------------------------------------

def checkout_session(*, user_id: str, item: str, session_id: str | None = None, mode: str | None = None,
                     customer: str | None = None, payment_intent: str | None = None,
                     subscription: str | None = None, amount_total: int | None = None,
                     payment_status: str = "paid", status: str = "complete", email: str | None = None,
                     created: int | None = None, livemode: bool = False) -> dict:
    mode = mode or ("subscription" if item in PLAN_AMOUNTS else "payment")
    if amount_total is None:
        amount_total = PLAN_AMOUNTS.get(item) or PACK_AMOUNTS.get(item, 0)
    return {
        "id": session_id or new_id("cs_test"), "object": "checkout.session", "mode": mode, "status": status,
        "payment_status": payment_status, "client_reference_id": user_id,
        "metadata": {"user_id": user_id, "item": item}, "customer": customer or new_id("cus"),
        "customer_email": email, "customer_details": {"email": email, "name": None},
        "payment_intent": (payment_intent or new_id("pi")) if mode == "payment" else None,
        "subscription": (subscription or new_id("sub")) if mode == "subscription" else None,
        "invoice": None, "amount_total": amount_total, "amount_subtotal": amount_total, "currency": "usd",
        "created": created or int(time.time()), "expires_at": (created or int(time.time())) + 86400,
        "livemode": livemode, "url": None, "success_url": "http://localhost:5000/checkout/success",
        "cancel_url": "http://localhost:5000/checkout/cancel",
    }


def checkout_completed(*, type: str = "checkout.session.completed", created: int | None = None,
                       event_id: str | None = None, **session_fields) -> dict:
    return event(type, checkout_session(created=created, **session_fields), id=event_id, created=created)


# --- subscriptions ---------------------------------------------------------------------------

def subscription_object(*, subscription_id: str, customer: str, price: str, user_id: str | None,
                        period_start: int, period_end: int, status: str = "active",
                        cancel_at_period_end: bool = False, created: int | None = None) -> dict:
    return {
        "id": subscription_id, "object": "subscription", "customer": customer, "status": status,
        "cancel_at_period_end": cancel_at_period_end, "canceled_at": None, "created": created or period_start,
        "currency": "usd", "livemode": False, "metadata": {"user_id": user_id} if user_id else {},
        "latest_invoice": None, "start_date": created or period_start, "billing_mode": {"type": "flexible"},
        "items": {"object": "list", "has_more": False, "data": [{
            "id": new_id("si"), "object": "subscription_item", "subscription": subscription_id, "quantity": 1,
            "current_period_start": period_start, "current_period_end": period_end,
            "price": {"id": price, "object": "price", "type": "recurring", "currency": "usd",
                      "recurring": {"interval": "month", "interval_count": 1}},
        }]},
    }


def subscription_event(type: str, *, created: int | None = None, event_id: str | None = None,
                       previous_price: str | None = None, previous_attributes: dict | None = None,
                       **fields) -> dict:
    """customer.subscription.created/updated/deleted; `previous_price` fills previous_attributes.items."""
    obj = subscription_object(**fields)
    if previous_price is not None:
        previous_attributes = dict(previous_attributes or {})
        previous_attributes["items"] = {"object": "list", "data": [{"price": {"id": previous_price}}]}
    return event(type, obj, id=event_id, created=created, previous_attributes=previous_attributes)


# --- invoices --------------------------------------------------------------------------------

def invoice_line(*, price: str, subscription_id: str, period_start: int, period_end: int, amount: int,
                 proration: bool = False, description: str | None = None) -> dict:
    return {
        "id": new_id("il"), "object": "line_item", "amount": amount, "currency": "usd",
        "description": description, "quantity": 1, "period": {"start": period_start, "end": period_end},
        "pricing": {"type": "price_details", "price_details": {"price": price, "product": "prod_test"},
                    "unit_amount_decimal": str(abs(amount))},
        "parent": {"type": "subscription_item_details", "subscription_item_details": {
            "subscription": subscription_id, "subscription_item": "si_test", "proration": proration,
            "proration_details": {"credited_items": None}, "invoice_item": None}},
    }


def invoice_object(*, invoice_id: str, customer: str, subscription_id: str, user_id: str | None,
                   billing_reason: str, lines: list[dict], amount_paid: int | None = None, status: str = "paid",
                   created: int | None = None) -> dict:
    total = sum(line["amount"] for line in lines)
    created = created or int(time.time())
    return {
        "id": invoice_id, "object": "invoice", "customer": customer, "customer_email": None,
        "billing_reason": billing_reason, "status": status, "currency": "usd", "created": created,
        "amount_due": max(total, 0), "amount_paid": max(total, 0) if amount_paid is None else amount_paid,
        "amount_remaining": 0, "total": total, "subtotal": total, "livemode": False,
        # the invoice's own period is the period it *collected for*, not the line's service period
        "period_start": created, "period_end": created,
        "parent": {"type": "subscription_details", "quote_details": None, "subscription_details": {
            "subscription": subscription_id, "metadata": {"user_id": user_id} if user_id else {}}},
        "lines": {"object": "list", "has_more": False, "data": lines},
        "status_transitions": {"paid_at": created if status == "paid" else None},
    }


def invoice_paid(*, type: str = "invoice.paid", created: int | None = None, event_id: str | None = None,
                 **fields) -> dict:
    return event(type, invoice_object(created=created, **fields), id=event_id, created=created)


def subscription_invoice(*, invoice_id: str, customer: str, subscription_id: str, user_id: str | None, price: str,
                         period_start: int, period_end: int, amount: int, billing_reason: str,
                         created: int | None = None, status: str = "paid") -> dict:
    """An invoice with one regular subscription line (first invoice or renewal)."""
    line = invoice_line(price=price, subscription_id=subscription_id, period_start=period_start,
                        period_end=period_end, amount=amount)
    return invoice_object(invoice_id=invoice_id, customer=customer, subscription_id=subscription_id,
                          user_id=user_id, billing_reason=billing_reason, lines=[line], created=created,
                          status=status, amount_paid=amount if status == "paid" else 0)


def proration_invoice(*, invoice_id: str, customer: str, subscription_id: str, user_id: str | None,
                      old_price: str, new_price: str, changed_at: int, period_end: int, credit: int, charge: int,
                      created: int | None = None) -> dict:
    """billing_reason subscription_update: a negative line for the unused old plan, a positive one for the new."""
    lines = [
        invoice_line(price=old_price, subscription_id=subscription_id, period_start=changed_at, period_end=period_end,
                     amount=-abs(credit), proration=True, description="Unused time on the old plan"),
        invoice_line(price=new_price, subscription_id=subscription_id, period_start=changed_at, period_end=period_end,
                     amount=abs(charge), proration=True, description="Remaining time on the new plan"),
    ]
    return invoice_object(invoice_id=invoice_id, customer=customer, subscription_id=subscription_id, user_id=user_id,
                          billing_reason="subscription_update", lines=lines, created=created,
                          amount_paid=max(abs(charge) - abs(credit), 0))


# --- charges, refunds, disputes --------------------------------------------------------------

def charge_object(*, charge_id: str, payment_intent: str | None, amount: int, amount_refunded: int = 0,
                  customer: str | None = None, created: int | None = None) -> dict:
    return {
        "id": charge_id, "object": "charge", "amount": amount, "amount_captured": amount,
        "amount_refunded": amount_refunded, "currency": "usd", "customer": customer,
        "payment_intent": payment_intent, "paid": True, "captured": True, "status": "succeeded",
        "refunded": amount_refunded >= amount > 0, "disputed": False, "livemode": False, "metadata": {},
        "created": created or int(time.time()),
    }


def charge_refunded(*, created: int | None = None, event_id: str | None = None, **fields) -> dict:
    return event("charge.refunded", charge_object(**fields), id=event_id, created=created)


def dispute_object(*, dispute_id: str, charge_id: str, payment_intent: str | None, amount: int,
                   status: str = "needs_response", created: int | None = None) -> dict:
    return {
        "id": dispute_id, "object": "dispute", "amount": amount, "currency": "usd", "charge": charge_id,
        "payment_intent": payment_intent, "status": status, "reason": "fraudulent", "livemode": False,
        "is_charge_refundable": False, "created": created or int(time.time()), "metadata": {},
    }


def dispute_event(type: str, *, created: int | None = None, event_id: str | None = None, **fields) -> dict:
    """charge.dispute.created (status needs_response) or charge.dispute.closed (status won or lost)."""
    return event(type, dispute_object(**fields), id=event_id, created=created)


# --- test-side delivery ----------------------------------------------------------------------

def configure_webhooks(monkeypatch, *, secret: str = WEBHOOK_SECRET, prices: dict[str, str] | None = None) -> None:
    """Set STRIPE_WEBHOOK_SECRET and the catalog's price ids for a test, and drop cached settings."""
    from billing_core.settings import reset_settings_cache

    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", secret)
    for name, value in price_env(prices).items():
        monkeypatch.setenv(name, value)
    reset_settings_cache()


def deliver(client, evt: dict, *, secret: str = WEBHOOK_SECRET, path: str = "/api/stripe/webhook"):
    """POST an event to the sidecar the way Stripe does: the exact body, signed now."""
    body = encode(evt)
    return client.post(path, content=body.encode("utf-8"), headers=signed_headers(body, secret))


def send(client, evt: dict) -> dict:
    """Deliver a signed event and expect 200; the sidecar's JSON answer."""
    response = deliver(client, evt)
    assert response.status_code == 200, response.text
    return response.json()


# --- what the sidecar stored ----------------------------------------------------------------------

def balance(user_id: str) -> int:
    """The user's balance in the configured database."""
    from billing_core import db, ledger

    with db.read_session() as session:
        return ledger.balance(session, user_id)


def stored(event_id: str):
    """The stored StripeEvent row, or None."""
    from billing_core import db
    from billing_core.models import StripeEvent

    with db.read_session() as session:
        return session.get(StripeEvent, event_id)
