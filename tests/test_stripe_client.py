"""The one Stripe client, its error messages, and the Stripe double's strictness (which every Stripe test relies on)."""
import pytest
import requests
import stripe

from billing_core.settings import get_settings, load_settings
from billing_core.stripe_client import (StripeActionError, StripeNotConfigured, describe_stripe_error,
                                        get_stripe_client, make_stripe_client, mask_keys, stripe_errors)
from stripe_double import FakeHTTPClient, StripeState
from stripe_fixtures import TEST_SECRET_KEY

KEY_BODY = TEST_SECRET_KEY[len("sk_test_"):-4]


def settings_with(**env):
    return load_settings({"BILLING_ENV_FILE": "/nonexistent.env", **env})


def action_error(fake_client, call, *, settings=None) -> StripeActionError:
    with pytest.raises(StripeActionError) as caught:
        with stripe_errors("doing the thing", settings=settings):
            call(fake_client)
    message = str(caught.value)
    assert KEY_BODY not in message and "\n" not in message
    assert message.startswith("doing the thing failed: ")
    return caught.value


def test_no_key_means_not_configured_with_the_fix():
    with pytest.raises(StripeNotConfigured, match=r"Stripe is not configured: set STRIPE_SECRET_KEY in config/.env"):
        get_stripe_client()


def test_client_retries_connection_errors_twice(fake_stripe, stripe_state):
    stripe_state.fail_next(connection_error=True, times=2)
    price = stripe_state.add_price(unit_amount=1000)
    assert get_stripe_client().v1.prices.retrieve(price["id"]).unit_amount == 1000
    assert len(stripe_state.requests_to("GET", f"/v1/prices/{price['id']}")) == 3

    stripe_state.fail_next(connection_error=True, times=3)
    error = action_error(get_stripe_client(), lambda c: c.v1.prices.retrieve(price["id"]))
    assert error.cause == "unreachable"
    assert "Stripe is unreachable" in str(error)


def test_api_base_setting_points_the_client_at_another_server(stripe_server):
    product = get_stripe_client().v1.products.create(params={"name": "Via the base address"})
    assert stripe_server.state.objects["products"][product.id]["name"] == "Via the base address"
    assert stripe_server.state.requests[-1].headers["authorization"] == f"Bearer {TEST_SECRET_KEY}"


def test_authentication_failure_names_the_cause_and_masks_the_key(fake_stripe, stripe_state):
    stripe_state.api_key = "sk_test_someOtherKeyThatStripeKnows9999"
    error = action_error(get_stripe_client(), lambda c: c.v1.products.list())
    assert error.cause == "authentication"
    assert "Stripe authentication failed" in str(error)
    assert "sk_test_…a1b2" in str(error)


def test_rate_limit_is_named(fake_stripe, stripe_state):
    stripe_state.fail_next(status=429)
    error = action_error(get_stripe_client(), lambda c: c.v1.products.list())
    assert error.cause == "rate_limited" and error.status == 429
    assert "rate limit" in str(error)


def test_invalid_and_inactive_prices_are_named(fake_stripe, stripe_state):
    def session_for(price_id):
        return lambda c: c.v1.checkout.sessions.create(params={
            "mode": "payment", "line_items": [{"price": price_id, "quantity": 1}]})

    error = action_error(get_stripe_client(), session_for("price_doesnotexist"))
    assert error.cause == "invalid_price" and error.param == "line_items[0][price]"
    assert "invalid price" in str(error) and "price_doesnotexist" in str(error)

    inactive = stripe_state.add_price(unit_amount=500, active=False)
    error = action_error(get_stripe_client(), session_for(inactive["id"]))
    assert error.cause == "invalid_price" and str(error).startswith("doing the thing failed: inactive price")


def test_idempotency_error_is_named(fake_stripe, stripe_state):
    client = get_stripe_client()
    client.v1.products.create(params={"name": "A"}, options={"idempotency_key": "same-key"})
    error = action_error(client, lambda c: c.v1.products.create(params={"name": "B"},
                                                               options={"idempotency_key": "same-key"}))
    assert error.cause == "idempotency" and "idempotency error" in str(error)


def test_describe_masks_any_key_in_stripe_text():
    exc = stripe.InvalidRequestError("Key sk_live_abcdefghijklmnop1234 and whsec_abcdefghijklmnop5678 leaked",
                                     param="x")
    text = describe_stripe_error(exc, settings=settings_with())
    assert "abcdefghijklmnop" not in text
    assert "sk_live_…1234" in text and "whsec_…5678" in text
    assert mask_keys("Invalid API Key provided: sk_test_********************a1b2") == \
        "Invalid API Key provided: sk_test_…a1b2"


def test_server_error_is_named(fake_stripe, stripe_state):
    stripe_state.fail_next(status=500, type="api_error", message="boom", times=3)
    error = action_error(get_stripe_client(), lambda c: c.v1.products.list())
    assert "internal error (HTTP 500)" in str(error)
    assert len(stripe_state.requests_to("GET", "/v1/products")) == 3  # retried twice


def test_injected_http_client_wins_over_the_default():
    state = StripeState()
    client = make_stripe_client(settings_with(STRIPE_SECRET_KEY=TEST_SECRET_KEY), http_client=FakeHTTPClient(state))
    client.v1.customers.create(params={"email": "a@example.com"})
    assert [r.path for r in state.requests] == ["/v1/customers"]
    assert get_settings().stripe_secret_key == ""  # nothing leaked into the process settings


# --- the double itself -------------------------------------------------------------------

def test_double_rejects_unknown_parameters_by_name(fake_stripe):
    with pytest.raises(stripe.InvalidRequestError) as caught:
        get_stripe_client().v1.checkout.sessions.create(params={
            "mode": "payment", "line_items": [{"price": "price_x", "quantity": 1, "colour": "red"}]})
    assert caught.value.param == "line_items[0][colour]" and caught.value.code == "parameter_unknown"


def test_double_rejects_customer_with_customer_email(fake_stripe, stripe_state):
    customer = stripe_state.add_customer(email="a@example.com")
    price = stripe_state.add_price(unit_amount=100)
    with pytest.raises(stripe.InvalidRequestError, match="customer, customer_email"):
        get_stripe_client().v1.checkout.sessions.create(params={
            "mode": "payment", "line_items": [{"price": price["id"], "quantity": 1}],
            "customer": customer["id"], "customer_email": "a@example.com"})


def test_double_replays_same_key_same_params(fake_stripe, stripe_state):
    price = stripe_state.add_price(unit_amount=100)
    params = {"mode": "payment", "line_items": [{"price": price["id"], "quantity": 1}]}
    first = get_stripe_client().v1.checkout.sessions.create(params=params, options={"idempotency_key": "k"})
    again = get_stripe_client().v1.checkout.sessions.create(params=params, options={"idempotency_key": "k"})
    assert first.id == again.id and len(stripe_state.objects["checkout_sessions"]) == 1


def test_double_pages_events_newest_first(fake_stripe, stripe_state):
    for n in range(5):
        stripe_state.add_event("invoice.paid", {"id": f"in_{n}", "object": "invoice"}, created=1000 + n)
    client = get_stripe_client()
    page = client.v1.events.list(params={"limit": 2, "created": {"gte": 1001}})
    assert [e.data.object.id for e in page.data] == ["in_4", "in_3"] and page.has_more
    everything = client.v1.events.list(params={"limit": 2, "created": {"gte": 1001}}).auto_paging_iter()
    assert [e.data.object.id for e in everything] == ["in_4", "in_3", "in_2", "in_1"]
    newer = client.v1.events.list(params={"limit": 1, "ending_before": page.data[1].id})
    assert [e.data.object.id for e in newer.data] == ["in_4"] and not newer.has_more


def test_double_lists_invoice_payments_by_invoice_and_payment_intent(fake_stripe, stripe_state):
    stripe_state.add_invoice_payment(invoice="in_1", payment_intent="pi_1", amount_paid=999)
    stripe_state.add_invoice_payment(invoice="in_2", payment_intent="pi_2", amount_paid=2999)
    client = get_stripe_client()
    by_invoice = client.v1.invoice_payments.list(params={"invoice": "in_1"})
    assert [p.payment.payment_intent for p in by_invoice.data] == ["pi_1"]
    by_intent = client.v1.invoice_payments.list(params={"payment": {"type": "payment_intent",
                                                                     "payment_intent": "pi_2"}})
    assert [p.invoice for p in by_intent.data] == ["in_2"]


def test_double_server_refuses_requests_without_a_key(stripe_server):
    response = requests.get(f"{stripe_server.url}/v1/prices", timeout=10)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "invalid_request_error"
