"""One plan per user: an admin cancels the newer of two live subscriptions and refunds its latest payment,
through the strict Stripe double (exact parameters, idempotency), and the Customers page offers it."""
import json

import pytest

from billing_core import db
from billing_core.models import Account, StripeEvent, Subscription
from billing_core.second_subscription import (SecondSubscriptionError, cancel_and_refund_newer,
                                              candidate_subscription_ids, live_subscriptions)
from dashboard_helpers import ADMIN, SUPPORT, add_operators, signed_in, texts
from stripe_events import subscription_event
from wiring import wiring

T0 = 1_900_000_000


@pytest.fixture
def two_subscriptions(database_url, fake_stripe, stripe_prices, stripe_state):
    """agent-1 has sub_first (stored, applied) and sub_second (its created event waits as needs-attention);
    sub_second's first invoice was paid with pi_second / ch_second."""
    state = stripe_state
    for sub_id, created, invoice in (("sub_first", T0, "in_first"), ("sub_second", T0 + 60, "in_second")):
        state.add_object("subscriptions", {"id": sub_id, "object": "subscription", "status": "active",
                                           "created": created, "customer": "cus_1", "latest_invoice": invoice,
                                           "metadata": {"user_id": "agent-1"}, "cancellation_details": None})
    state.add_invoice_payment(invoice="in_second", payment_intent="pi_second", amount_paid=9999)
    state.add_charge(id="ch_second", payment_intent="pi_second", amount=9999, customer="cus_1")
    with db.write_session() as session:
        session.add(Account(user_id="agent-1", stripe_customer_id="cus_1"))
        session.flush()
        session.add(Subscription(id="sub_first", user_id="agent-1", tier="starter", status="active"))
        evt = subscription_event("customer.subscription.created", subscription_id="sub_second", customer="cus_1",
                                 price=stripe_prices["business"], user_id="agent-1", period_start=T0 + 60,
                                 period_end=T0 + 60 + 30 * 86400, created=T0 + 60)
        session.add(StripeEvent(id=evt["id"], type=evt["type"], created=evt["created"], payload=json.dumps(evt),
                                status="needs_attention", error="second live subscription"))
    return state


def test_candidates_are_stored_subscriptions_and_those_of_needs_attention_events(two_subscriptions):
    with db.read_session() as session:
        assert candidate_subscription_ids(session, user_id="agent-1") == ["sub_first", "sub_second"]
        assert candidate_subscription_ids(session, user_id="agent-2") == []
    assert [s.id for s in live_subscriptions(**wiring(), user_id="agent-1")] == ["sub_first", "sub_second"]


def test_cancel_and_refund_the_newer_subscription_with_exact_parameters(two_subscriptions):
    state = two_subscriptions
    result = cancel_and_refund_newer(**wiring(), user_id="agent-1", operator="alice")
    assert (result.subscription_id, result.kept_subscription_id, result.canceled_now) == ("sub_second", "sub_first",
                                                                                          True)
    assert (result.refunded_cents, result.currency) == (9999, "usd")
    [cancel] = state.requests_to("DELETE", "/v1/subscriptions/sub_second")
    assert cancel.params == {"cancellation_details": {
        "comment": "second live subscription of agent-1; sub_first is kept; canceled by alice"}}
    [refund] = state.requests_to("POST", "/v1/refunds")
    assert refund.params == {"payment_intent": "pi_second", "reason": "duplicate",
                             "metadata": {"user_id": "agent-1", "subscription": "sub_second"}}
    assert refund.idempotency_key == "refund-second-sub_second"
    assert state.objects["subscriptions"]["sub_second"]["status"] == "canceled"
    assert state.objects["subscriptions"]["sub_first"]["status"] == "active"
    assert state.objects["charges"]["ch_second"]["amount_refunded"] == 9999
    assert result.message() == (f"sub_second canceled; sub_first is kept; refunded 9999 USD (minor units) of "
                                f"pi_second as {result.refund_id}")


def test_a_second_click_changes_nothing_more(two_subscriptions):
    state = two_subscriptions
    first = cancel_and_refund_newer(**wiring(), user_id="agent-1", operator="alice")
    again = cancel_and_refund_newer(**wiring(), user_id="agent-1", operator="bob")
    assert (again.subscription_id, again.canceled_now, again.refund_id) == ("sub_second", False, first.refund_id)
    assert len(state.requests_to("DELETE", "/v1/subscriptions/sub_second")) == 1
    assert len(state.objects["refunds"]) == 1 and state.objects["charges"]["ch_second"]["amount_refunded"] == 9999


def test_a_refund_that_failed_after_the_cancellation_is_finished_by_the_next_click(two_subscriptions):
    state = two_subscriptions
    charge = state.objects["charges"].pop("ch_second")  # Stripe can't find the payment to refund yet
    with pytest.raises(Exception, match="refunding sub_second's latest payment failed"):
        cancel_and_refund_newer(**wiring(), user_id="agent-1", operator="alice")
    assert state.objects["subscriptions"]["sub_second"]["status"] == "canceled"
    state.objects["charges"]["ch_second"] = charge
    result = cancel_and_refund_newer(**wiring(), user_id="agent-1", operator="alice")
    assert (result.canceled_now, result.refunded_cents) == (False, 9999)


def test_an_already_refunded_payment_is_reported_not_refunded_again(two_subscriptions):
    two_subscriptions.objects["charges"]["ch_second"]["amount_refunded"] = 9999
    result = cancel_and_refund_newer(**wiring(), user_id="agent-1", operator="alice")
    assert result.refund_id is None and "was already refunded" in result.note


def test_one_live_subscription_is_refused(two_subscriptions):
    two_subscriptions.objects["subscriptions"]["sub_second"]["status"] = "canceled"
    with pytest.raises(SecondSubscriptionError, match="agent-1 has 1 live subscription in Stripe: nothing to cancel"):
        cancel_and_refund_newer(**wiring(), user_id="agent-1", operator="alice")
    assert two_subscriptions.requests_to("POST", "/v1/refunds") == []


def test_the_double_refuses_to_cancel_twice_and_unknown_parameters(two_subscriptions):
    from billing_core.stripe_client import make_stripe_client
    import stripe

    client = make_stripe_client(wiring()["settings"])
    with pytest.raises(stripe.InvalidRequestError, match="unknown parameter: at_period_end"):
        client.v1.subscriptions.cancel("sub_first", params={"at_period_end": True})
    client.v1.subscriptions.cancel("sub_first")
    with pytest.raises(stripe.InvalidRequestError, match="can not be canceled again"):
        client.v1.subscriptions.cancel("sub_first")
    with pytest.raises(stripe.InvalidRequestError, match="unknown parameter: amount_cents"):
        client.v1.refunds.create(params={"payment_intent": "pi_second", "amount_cents": 5})


# --- the Customers page ---------------------------------------------------------------------

def customers_page(credentials):
    at = signed_in(credentials, page="customers")
    at.text_input(key="customer_query").input("agent-1")
    return at.run()


def test_an_admin_cancels_and_refunds_from_the_customers_page(two_subscriptions, database_url):
    add_operators(database_url)
    at = customers_page(ADMIN)
    assert "Second subscription" in texts(at)
    button = next(b for b in at.button if b.label == "Cancel and refund the newer subscription")
    button.click()
    at.run()
    assert "Tick the confirmation box" in texts(at)
    assert two_subscriptions.requests_to("POST", "/v1/refunds") == []
    at.checkbox(key="cancel_second_confirm").check()
    next(b for b in at.button if b.label == "Cancel and refund the newer subscription").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert "sub_second canceled; sub_first is kept; refunded 9999 USD" in texts(at)
    assert two_subscriptions.objects["subscriptions"]["sub_second"]["status"] == "canceled"


def test_support_sees_the_second_subscription_but_no_button(two_subscriptions, database_url):
    add_operators(database_url)
    at = customers_page(SUPPORT)
    assert "Ask an admin to cancel and refund the newer subscription." in texts(at)
    assert not [b for b in at.button if b.label == "Cancel and refund the newer subscription"]
