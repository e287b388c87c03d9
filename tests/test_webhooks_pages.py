"""The pages Checkout sends the customer back to, and the one Stripe lookup the handlers make,
against the Stripe test double (tests/stripe_double.py)."""
from __future__ import annotations

import pytest
from sqlalchemy import func, select
from starlette.testclient import TestClient

from billing_core import db, handlers, ledger
from billing_core.models import LedgerEntry, StripeEvent
from billing_core.settings import get_settings
from billing_core.webapp import create_app
from stripe_events import charge_refunded, configure_webhooks, deliver, event


@pytest.fixture
def sidecar(database_url, monkeypatch, fake_stripe):
    configure_webhooks(monkeypatch)
    with TestClient(create_app()) as client:
        yield client


def paid_session(state, *, user_id="u1", item="pack_250", mode="payment", payment_status="paid"):
    created = state.add_checkout_session(mode=mode, client_reference_id=user_id,
                                         metadata={"user_id": user_id, "item": item, "credits": "250"},
                                         amount_total=2000, amount_subtotal=2000)
    return state.complete_checkout_session(created["id"], payment_status=payment_status)


def balance(user_id: str) -> int:
    with db.read_session() as session:
        return ledger.balance(session, user_id)


def ledger_entries() -> int:
    with db.read_session() as session:
        return session.execute(select(func.count()).select_from(LedgerEntry)).scalar_one()


def test_success_page_fulfils_a_paid_session_once_and_shows_the_new_balance(sidecar, stripe_state):
    session = paid_session(stripe_state)
    page = sidecar.get("/checkout/success", params={"session_id": session["id"]})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "250 credits" in page.text and "Your credit balance is now 250 credits." in page.text
    assert balance("u1") == 250
    # the webhook arrives late: the same fulfilment, applied once
    late = deliver(sidecar, event("checkout.session.completed", session))
    assert late.json()["status"] == "processed"
    again = sidecar.get("/checkout/success", params={"session_id": session["id"]})
    assert "now 250 credits" in again.text
    assert balance("u1") == 250 and ledger_entries() == 1
    assert stripe_state.requests_to("GET", f"/v1/checkout/sessions/{session['id']}")


def test_webhook_first_then_success_page_grants_once(sidecar, stripe_state):
    session = paid_session(stripe_state, item="pack_100")
    deliver(sidecar, event("checkout.session.completed", session))
    page = sidecar.get("/checkout/success", params={"session_id": session["id"]})
    assert "now 100 credits" in page.text and balance("u1") == 100 and ledger_entries() == 1


def test_success_page_shows_only_that_sessions_user(sidecar, stripe_state):
    with db.write_session() as s:
        ledger.adjust(s, user_id="someone-else", credits=987, reason="test", operator="t")
    session = paid_session(stripe_state, user_id="u1", item="pack_100")
    page = sidecar.get("/checkout/success", params={"session_id": session["id"]})
    assert "now 100 credits" in page.text
    assert "987" not in page.text and "someone-else" not in page.text and "u1" not in page.text


def test_success_page_for_an_unpaid_session_grants_nothing(sidecar, stripe_state):
    session = paid_session(stripe_state, payment_status="unpaid")
    page = sidecar.get("/checkout/success", params={"session_id": session["id"]})
    assert page.status_code == 200 and "still being processed" in page.text
    assert balance("u1") == 0


def test_success_page_for_a_subscription_links_it_and_says_credits_follow(sidecar, stripe_state):
    session = paid_session(stripe_state, item="starter", mode="subscription")
    page = sidecar.get("/checkout/success", params={"session_id": session["id"]})
    assert page.status_code == 200 and "Starter plan" in page.text and "first invoice" in page.text


def test_success_page_for_an_unknown_session_or_when_stripe_is_down(sidecar, stripe_state):
    missing = sidecar.get("/checkout/success", params={"session_id": "cs_test_doesnotexist"})
    assert missing.status_code == 404 and "could not find" in missing.text
    session = paid_session(stripe_state)
    stripe_state.fail_next(connection_error=True, times=5)
    down = sidecar.get("/checkout/success", params={"session_id": session["id"]})
    assert down.status_code == 503 and "credits will appear shortly" in down.text
    assert "sk_test" not in down.text and balance("u1") == 0


def test_invoice_for_payment_intent_asks_stripes_invoice_payments_list(fake_stripe, stripe_state):
    stripe_state.add_invoice_payment(invoice="in_42", payment_intent="pi_42", amount_paid=999)
    assert handlers.invoice_for_payment_intent("pi_42", settings=get_settings()) == "in_42"
    assert handlers.invoice_for_payment_intent("pi_other", settings=get_settings()) is None
    request = stripe_state.requests_to("GET", "/v1/invoice_payments")[0]
    assert request.params["payment"] == {"type": "payment_intent", "payment_intent": "pi_42"}


def test_invoice_lookup_failure_answers_500_so_stripe_retries(sidecar, stripe_state):
    stripe_state.fail_next(status=500, type="api_error", message="boom", times=5)
    evt = charge_refunded(charge_id="ch_9", payment_intent="pi_9", amount=999, amount_refunded=999)
    response = deliver(sidecar, evt)
    assert response.status_code == 500
    with db.read_session() as session:
        row = session.get(StripeEvent, evt["id"])
    assert row.status == "failed" and "looking up the invoice paid by pi_9" in row.error


def test_the_stripe_lookup_happens_while_no_database_lock_is_held(sidecar, stripe_state, monkeypatch):
    """A slow Stripe answer must not stall other writers (credits API spends) on the same account."""
    import threading

    with db.write_session() as s:
        ledger.adjust(s, user_id="u1", credits=10, reason="seed", operator="t")
    real_lookup = handlers.invoice_for_payment_intent
    finished = []

    def lookup_while_someone_writes(payment_intent_id, **kwargs):
        def write():
            with db.write_session() as s:
                ledger.adjust(s, user_id="u1", credits=5, reason="meanwhile", operator="t")
            finished.append(True)

        writer = threading.Thread(target=write)
        writer.start()
        writer.join(timeout=60)  # a deadlock guard: with a lock held here the writer could never finish
        return real_lookup(payment_intent_id, **kwargs)

    monkeypatch.setattr(handlers.refunds, "invoice_for_payment_intent", lookup_while_someone_writes)
    evt = charge_refunded(charge_id="ch_l", payment_intent="pi_l", amount=999, amount_refunded=999)
    assert deliver(sidecar, evt).json()["status"] == "needs_attention"
    assert finished == [True] and balance("u1") == 15


@pytest.mark.parametrize("user_id", ["u" * 300, "user\x00with\x1bcontrol"], ids=["300-chars", "control-chars"])
def test_success_page_with_an_unusable_user_id_says_the_payment_is_being_confirmed(sidecar, stripe_state,
                                                                                  user_id, caplog):
    session = paid_session(stripe_state, user_id=user_id)
    page = sidecar.get("/checkout/success", params={"session_id": session["id"]})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Payment being confirmed" in page.text and "credits will appear shortly" in page.text
    assert ledger_entries() == 0
    assert "could not apply" in caplog.text and "\x00" not in caplog.text and "\x1b" not in caplog.text


def test_success_page_when_the_database_fails_says_the_payment_is_being_confirmed(sidecar, stripe_state,
                                                                                 monkeypatch, caplog):
    from sqlalchemy.exc import OperationalError

    secret = "sk_test_" + "9" * 24

    def broken(*args, **kwargs):
        raise OperationalError(f"INSERT ... key {secret}", {}, Exception("database is locked"))

    monkeypatch.setenv("STRIPE_SECRET_KEY", secret)
    monkeypatch.setattr(handlers.checkout, "fulfil_checkout_session", broken)
    session = paid_session(stripe_state)
    page = sidecar.get("/checkout/success", params={"session_id": session["id"]})
    assert page.status_code == 200 and "Payment being confirmed" in page.text
    assert "OperationalError" in caplog.text and secret not in caplog.text and secret not in page.text
