"""The support tools through AppTest: refund with a clawback preview (Payments, Customers) against the Stripe
double, the dry-run Preview on Webhook events, the API-version table, and the Expiring credits page."""
from __future__ import annotations

from datetime import timedelta

import pytest
import stripe
from sqlalchemy import select
from starlette.testclient import TestClient

from billing_core import db, ledger
from billing_core.models import RefundRequest, StripeEvent, utcnow
from billing_core.formatting import escape_markdown
from billing_core.settings import reset_settings_cache
from billing_core.webapp import create_app
from dashboard_helpers import (ADMIN, SUPPORT, add_operators, fresh_sign_in_throttle_and_caches,  # noqa: F401
                               signed_in, texts)
from db_dump import database_dump
from stripe_events import checkout_completed, configure_webhooks, deliver, event


@pytest.fixture
def shop(database_url, fake_stripe, monkeypatch):
    """Two operators and u1's paid 500-credit pack ($35.00), its charge in the Stripe double."""
    add_operators(database_url)
    configure_webhooks(monkeypatch)
    fake_stripe.state.add_charge(id="ch_p", payment_intent="pi_p", amount=3500, customer="cus_u1")
    with TestClient(create_app()) as client:
        assert deliver(client, checkout_completed(user_id="u1", item="pack_500", session_id="cs_test_p",
                                                  payment_intent="pi_p", customer="cus_u1")).status_code == 200
    return fake_stripe.state


def button(at, key):
    return next(b for b in at.button if b.key == key)


def preview_part(at, *, key="pay_refund", amount="17.50", reason="customer asked, ticket 7"):
    at.radio(key=f"{key}_whole").set_value("part").run()
    at.text_input(key=f"{key}_amount").input(amount)
    at.text_input(key=f"{key}_reason").input(reason)
    button(at, f"{key}_preview").click()
    return at.run()


def frame_with(at, column):
    return next(d.value for d in at.dataframe if column in d.value.columns)


def metrics(at) -> dict:
    return {m.label: m.value for m in at.metric}


def test_refund_from_payments_previews_then_refunds_and_shows_pending(database_url, shop):
    at = signed_in(ADMIN, "payments")
    assert at.selectbox(key="pay_refund_pick").value == "cs_test_p"
    before = database_dump(database_url)
    at = preview_part(at)
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert database_dump(database_url) == before  # the preview changed nothing
    shown = metrics(at)
    assert (shown["Refund"], shown["Credits taken back"], shown["Balance before"], shown["Balance after"]) == (
        "$17.50", "250", "500", "250")
    assert button(at, "pay_refund_go").disabled
    at.checkbox(key="pay_refund_confirm").check().run()
    button(at, "pay_refund_go").click()
    at = at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    [request] = shop.requests_to("POST", "/v1/refunds")
    assert request.params == {"payment_intent": "pi_p", "amount": "1750", "reason": "requested_by_customer",
                              "metadata": {"operator": "alice", "reason": "customer asked, ticket 7",
                                           "payment": "cs_test_p"}}
    assert any("pending until Stripe reports it" in s.value for s in at.success)
    assert "refund pending" in " ".join(at.dataframe[0].value["Status"].tolist())
    assert at.dataframe[-1].value["Status"].tolist() == ["pending"]
    with db.read_session() as session:
        assert ledger.balance(session, "u1") == 500  # until charge.refunded arrives
        assert session.execute(select(RefundRequest.operator, RefundRequest.amount_cents)).all() == [("alice", 1750)]


def test_a_preview_for_other_inputs_is_not_confirmable(database_url, shop):
    at = preview_part(signed_in(ADMIN, "payments"))
    at.text_input(key="pay_refund_amount").input("5.00").run()
    assert not any(b.key == "pay_refund_go" for b in at.button)  # preview again first
    at = preview_part(at, amount="99.00")
    assert any("over what is left" in e.value for e in at.error)


def test_whole_refund_that_goes_negative_warns_before_confirming(database_url, shop):
    with db.write_session() as session:
        ledger.consume(session, user_id="u1", credits=450, reference="job")
    at = signed_in(ADMIN, "payments")
    at.text_input(key="pay_refund_reason").input("fraud")
    button(at, "pay_refund_preview").click()
    at = at.run()
    assert metrics(at)["Balance after"] == "-450"
    assert any("would go to -450 credits and be flagged" in w.value for w in at.warning)


def test_support_may_refund_only_when_the_setting_allows(database_url, shop, monkeypatch):
    at = signed_in(SUPPORT, "payments")
    assert "Only an admin may refund" in texts(at) and not any(b.key == "pay_refund_preview" for b in at.button)
    monkeypatch.setenv("SUPPORT_CAN_REFUND", "true")
    reset_settings_cache()
    at = signed_in(SUPPORT, "payments")
    assert any(b.key == "pay_refund_preview" for b in at.button)


def test_refund_from_the_customer_page(database_url, shop):
    at = signed_in(ADMIN, "customers")
    at.text_input(key="customer_query").input("u1").run()
    at = preview_part(at, key="cust_refund", amount="35.00")
    assert metrics(at)["Credits taken back"] == "500"
    at.checkbox(key="cust_refund_confirm").check().run()
    button(at, "cust_refund_go").click()
    at = at.run()
    assert not at.error, [e.value for e in at.error]
    assert shop.requests_to("POST", "/v1/refunds")[0].params["amount"] == "3500"
    assert not any(b.key == "cust_refund_preview" for b in at.button)  # nothing left to refund
    assert "No payment here has anything left to refund." in texts(at)


# --- webhook events -------------------------------------------------------------------------------

def test_needs_attention_preview_shows_the_diff_and_changes_nothing(database_url, shop):
    evt = checkout_completed(user_id="", item="pack_100", session_id="cs_test_q", payment_intent="pi_q",
                             customer="cus_q")
    evt["data"]["object"]["client_reference_id"] = None
    evt["data"]["object"]["metadata"] = {"item": "pack_100"}
    with TestClient(create_app()) as client:
        assert deliver(client, evt).json()["status"] == "needs_attention"
    at = signed_in(ADMIN, "events")
    at.text_input(key=f"assign_{evt['id']}").input("u5")
    next(b for b in at.button if b.label == "Preview").click()
    before = database_dump(database_url)
    at = at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert database_dump(database_url) == before
    assert escape_markdown(f"Dry run of {evt['id']}") in texts(at) and "**processed**" in texts(at)
    accounts = frame_with(at, "Balance before")
    assert accounts.to_dict("records")[0] == {"Account": "u5", "Balance before": 0, "Balance after": 100,
                                                   "Tier": "none", "Flagged after": "no"}


def test_preview_replay_of_a_chosen_event_and_the_api_versions(database_url, shop):
    with TestClient(create_app()) as client:
        deliver(client, event("customer.created", {"id": "cus_old", "object": "customer"}, api_version="2024-06-20"))
    at = signed_in(ADMIN, "events")
    assert any("another API version than the pinned" in w.value for w in at.warning)
    versions = frame_with(at, "API version")
    assert set(versions["API version"]) == {stripe.api_version, "2024-06-20"}
    button(at, "ev_preview").click()
    at = at.run()
    assert not at.exception and "Dry run of" in texts(at) and "Nothing was changed" in texts(at)


# --- expiring credits -----------------------------------------------------------------------------

def test_expiring_credits_page_shows_totals_table_and_csv(database_url):
    add_operators(database_url)
    for user, days, tier in (("a", 3, "starter"), ("b", 20, "business")):
        period_end = int((utcnow() + timedelta(days=days)).timestamp())
        with db.write_session() as session:
            ledger.grant_subscription_period(session, user_id=user, subscription_id=f"sub_{user}", tier=tier,
                                             period_end=period_end, source_key=f"t:{user}")
    at = signed_in(ADMIN, "expiring")
    assert not at.exception, [e.value for e in at.exception]
    shown = metrics(at)
    assert shown["Accounts, 7 days"] == "1" and shown["Accounts, 30 days"] == "2"
    assert at.dataframe[0].value["User"].tolist() == ["b", "a"]
    at.radio(key="expiring_days").set_value(7).run()
    assert at.dataframe[0].value["User"].tolist() == ["a"]
    assert any(b.key == "expiring_csv" for b in at.get("download_button"))


def test_the_same_filled_in_refund_form_refunds_once(database_url, shop):
    """A rerun cut off after the refund was recorded submits the same form (the same token) again."""
    at = preview_part(signed_in(ADMIN, "payments"))
    at.checkbox(key="pay_refund_confirm").check().run()
    at.session_state["pay_refund_token"] = "form-1"
    button(at, "pay_refund_go").click()
    at = at.run()
    at = preview_part(at)  # the same inputs, and (as if the clean-up had been lost) the same token
    at.checkbox(key="pay_refund_confirm").check().run()
    at.session_state["pay_refund_token"] = "form-1"
    button(at, "pay_refund_go").click()
    at = at.run()
    assert any("already made for this request" in s.value for s in at.success), [s.value for s in at.success]
    assert len(shop.objects["refunds"]) == 1 and len(shop.requests_to("POST", "/v1/refunds")) == 1


def test_replay_of_the_chosen_event_is_admin_only(database_url, shop):
    evt = checkout_completed(user_id="u8", item="pack_100", session_id="cs_test_r", payment_intent="pi_r")
    with TestClient(create_app()) as client:
        deliver(client, evt)
    support = signed_in(SUPPORT, "events")
    assert button(support, "ev_replay").disabled and not button(support, "ev_preview").disabled
    at = signed_in(ADMIN, "events")
    at.selectbox(key="ev_payload_pick").set_value(evt["id"]).run()
    button(at, "ev_replay").click()
    at = at.run()
    assert any(escape_markdown(f"Replayed {evt['id']}: processed") in s.value for s in at.success), [s.value for s in at.success]
    with db.read_session() as session:
        assert ledger.balance(session, "u8") == 100  # replayed once more, applied once
        assert session.get(StripeEvent, evt["id"]).reprocessed_by == "alice"
