"""The payload readers on both of Stripe's layouts, and an older-API account's events through the real sidecar.

Before API 2025-03 (e.g. `2024-06-20`, still the default version of many accounts, which `stripe listen`
forwards) an invoice names its subscription in `subscription` and that subscription's metadata in
`subscription_details.metadata`, its lines carry `price`/`plan`/`proration`/`subscription` directly, it names
its `charge` and `payment_intent`, and a subscription's period end is on the subscription itself.
"""
from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from billing_core import db, ledger, stripe_payloads as sp
from billing_core.models import Payment, StripeEvent, Subscription
from stripe_events import (send, DEFAULT_PRICES, charge_refunded, event, invoice_line, invoice_object, new_id)

OLD_API_VERSION = "2024-06-20"
NOW = int(time.time())
START, END = NOW - 5 * 86400, NOW + 25 * 86400
STARTER = DEFAULT_PRICES["starter"]


def old_price(price_id: str) -> dict:
    return {"id": price_id, "object": "price", "type": "recurring", "currency": "usd",
            "recurring": {"interval": "month", "interval_count": 1}}


def old_invoice_line(*, price: str, subscription_id: str, amount: int, proration: bool = False) -> dict:
    return {"id": new_id("il"), "object": "line_item", "type": "subscription", "amount": amount, "currency": "usd",
            "quantity": 1, "period": {"start": START, "end": END}, "price": old_price(price),
            "plan": {"id": price, "object": "plan"}, "proration": proration, "subscription": subscription_id,
            "subscription_item": "si_old"}


def old_invoice(*, invoice_id: str, subscription_id: str, customer: str, user_id: str | None, charge: str,
                payment_intent: str, price: str = STARTER, amount: int = 999) -> dict:
    """A paid first invoice as API 2024-06-20 renders it: no `parent`, no `pricing`."""
    return {"id": invoice_id, "object": "invoice", "customer": customer, "customer_email": None,
            "billing_reason": "subscription_create", "status": "paid", "currency": "usd", "created": START + 10,
            "amount_due": amount, "amount_paid": amount, "total": amount, "livemode": False,
            "subscription": subscription_id, "charge": charge, "payment_intent": payment_intent,
            "subscription_details": {"metadata": {"user_id": user_id} if user_id else {}},
            "metadata": {},
            "lines": {"object": "list", "has_more": False,
                      "data": [old_invoice_line(price=price, subscription_id=subscription_id, amount=amount)]}}


def old_subscription(*, subscription_id: str, customer: str, user_id: str, price: str = STARTER) -> dict:
    """A subscription as API 2024-06-20 renders it: the period on the subscription, not on its items."""
    return {"id": subscription_id, "object": "subscription", "customer": customer, "status": "active",
            "cancel_at_period_end": False, "created": START, "current_period_start": START,
            "current_period_end": END, "metadata": {"user_id": user_id}, "livemode": False,
            "plan": {"id": price, "object": "plan"},
            "items": {"object": "list", "data": [{"id": "si_old", "object": "subscription_item",
                                                  "price": old_price(price), "quantity": 1}]}}


# --- the readers -----------------------------------------------------------------------------

def test_invoice_readers_find_each_field_in_todays_layout():
    line = invoice_line(price=STARTER, subscription_id="sub_new", period_start=START, period_end=END, amount=999,
                        proration=True)
    invoice = invoice_object(invoice_id="in_new", customer="cus_new", subscription_id="sub_new", user_id="u_new",
                             billing_reason="subscription_create", lines=[line])
    assert sp.invoice_subscription_id(invoice) == "sub_new"
    assert sp.invoice_user(invoice) == "u_new"
    assert sp.invoice_payment_refs(invoice) == (None, None)  # today's webhooks carry no payment
    assert (sp.line_price(line), sp.line_is_proration(line), sp.line_period_end(line)) == (STARTER, True, END)
    assert sp.line_subscription_id(line) == "sub_new"


def test_invoice_readers_find_each_field_in_the_layout_before_2025_03():
    invoice = old_invoice(invoice_id="in_old", subscription_id="sub_old", customer="cus_old", user_id="u_old",
                          charge="ch_old", payment_intent="pi_old")
    line = invoice["lines"]["data"][0]
    assert sp.invoice_subscription_id(invoice) == "sub_old"
    assert sp.invoice_user(invoice) == "u_old"
    assert sp.invoice_payment_refs(invoice) == ("pi_old", "ch_old")
    assert (sp.line_price(line), sp.line_is_proration(line), sp.line_period_end(line)) == (STARTER, False, END)
    assert sp.line_subscription_id(line) == "sub_old"


def test_an_expanded_payments_list_names_the_payment_intent():
    invoice = {"id": "in_x", "payments": {"data": [
        {"object": "invoice_payment", "payment": {"type": "payment_intent", "payment_intent": "pi_x"}}]}}
    assert sp.invoice_payment_refs(invoice) == ("pi_x", None)


def test_subscription_readers_on_both_layouts():
    old = old_subscription(subscription_id="sub_old", customer="cus_old", user_id="u")
    assert sp.subscription_period_end(old) == END and sp.subscription_price(old)["id"] == STARTER
    new = {"items": {"data": [{"price": {"id": STARTER}, "current_period_end": END + 1}]}, "current_period_end": END}
    assert sp.subscription_period_end(new) == END + 1  # today's place wins


@pytest.mark.parametrize("value", [True, -1, 10**13, "999", 1.5])
def test_amounts_that_cannot_be_stored_need_attention_naming_the_field(value):
    with pytest.raises(sp.NeedsAttention, match="amount_paid"):
        sp.as_amount(value, what="amount_paid")


def test_ids_and_texts_are_checked():
    assert sp.id_of({"id": "cus_1"}) == "cus_1" and sp.id_of(None) is None
    with pytest.raises(sp.NeedsAttention, match="malformed Stripe id"):
        sp.id_of("cus_" + "x" * 200)
    assert sp.lenient_id("bad id") is None
    with pytest.raises(sp.NeedsAttention, match="printable"):
        sp.as_text("a\x00b", what="metadata.user_id", max_len=200)
    assert sp.as_currency("EUR", default="usd") == "eur"


# --- an older-API account through the sidecar ------------------------------------------------

def balance(user_id: str) -> int:
    with db.read_session() as session:
        return ledger.balance(session, user_id)


def test_an_old_layout_invoice_names_its_user_in_subscription_details_and_grants(sidecar):
    """Today's code read only `parent.subscription_details.metadata`, so this invoice (unknown customer,
    no subscription stored yet) waited in needs-attention."""
    invoice = old_invoice(invoice_id="in_old1", subscription_id="sub_old1", customer="cus_old1", user_id="u_old",
                          charge="ch_old1", payment_intent="pi_old1")
    evt = event("invoice.paid", invoice, api_version=OLD_API_VERSION, created=START + 10)
    assert send(sidecar, evt)["status"] == "processed"
    assert balance("u_old") == 100
    with db.read_session() as session:
        payment = session.execute(select(Payment).where(Payment.invoice_id == "in_old1")).scalars().one()
        subscription = session.get(Subscription, "sub_old1")
        stored = session.get(StripeEvent, evt["id"])
    assert (payment.user_id, payment.payment_intent_id, payment.charge_id) == ("u_old", "pi_old1", "ch_old1")
    assert (subscription.user_id, subscription.tier, subscription.current_period_end) == ("u_old", "starter", END)
    assert stored.api_version == OLD_API_VERSION


def test_an_old_layout_refund_finds_its_invoice_payment_without_asking_stripe(sidecar):
    """The older invoice names its PaymentIntent, so the refund needs no invoice payments lookup (no Stripe
    key is configured here: a lookup would find nothing and the refund would wait)."""
    invoice = old_invoice(invoice_id="in_old2", subscription_id="sub_old2", customer="cus_old2", user_id="u_ref",
                          charge="ch_old2", payment_intent="pi_old2")
    send(sidecar, event("invoice.paid", invoice, api_version=OLD_API_VERSION, created=START + 10))
    refund = charge_refunded(charge_id="ch_old2", payment_intent="pi_old2", amount=999, amount_refunded=999)
    assert send(sidecar, refund)["status"] == "processed"
    assert balance("u_ref") == 0


def test_an_old_layout_subscription_event_reads_the_period_from_the_subscription(sidecar):
    sub = old_subscription(subscription_id="sub_old3", customer="cus_old3", user_id="u_sub")
    assert send(sidecar, event("customer.subscription.created", sub, api_version=OLD_API_VERSION,
                               created=START))["status"] == "processed"
    with db.read_session() as session:
        row = session.get(Subscription, "sub_old3")
    assert (row.user_id, row.tier, row.status, row.current_period_end) == ("u_sub", "starter", "active", END)
