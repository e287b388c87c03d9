"""The support tools in a real headless Chromium against `streamlit run Home.py` and the Stripe double:
refund a part of a payment from a customer's page (preview, confirm, pending, then applied once Stripe's
charge.refunded is ingested), preview an event before replaying it, and the Expiring credits page.
Screenshots: refund-preview, refund-pending, refund-applied, replay-preview, expiring-credits."""
from __future__ import annotations

import json

import pytest
from sqlalchemy import select, update

from billing_core import db, events, ledger, refunds
from billing_core.models import Payment, RefundRequest
from billing_core.settings import load_settings
from dashboard_helpers import seeded_db, seeded_template  # noqa: F401
from stripe_events import WEBHOOK_SECRET
from test_browser import CHROMIUM, browser_page, dashboard, screenshot, settle, visit  # noqa: F401
from test_browser import open_customer

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium"),
]


def a_pack_payment(url: str) -> tuple[str, int, int, str]:
    """A demo customer's newest refundable payment, made a pack bought with a PaymentIntent the Stripe double
    knows: (user id, payment id, amount, Checkout Session id)."""
    with db.read_session(db.get_engine(url)) as session:
        candidates = [p for p in refunds.refundable_payments(session, limit=500) if p["ref"].startswith("cs_")]
        for row in candidates:
            newest = refunds.refundable_payments(session, user_id=row["user_id"])[0]
            if newest["payment_id"] == row["payment_id"]:
                return row["user_id"], row["payment_id"], row["amount_cents"], row["ref"]
    pytest.fail("the demo data has no refundable pack payment")


def test_refund_flow_in_chromium(dashboard, browser_page, seeded_db, stripe_server):
    page = browser_page
    user_id, payment_id, amount, session_id = a_pack_payment(seeded_db)
    engine = db.get_engine(seeded_db)
    with db.write_session(engine) as session:
        session.execute(update(Payment).where(Payment.id == payment_id).values(payment_intent_id="pi_browser"))
    stripe_server.state.add_charge(id="ch_browser", payment_intent="pi_browser", amount=amount)
    with db.read_session(engine) as session:
        balance_before = ledger.balance(session, user_id)

    page.goto(dashboard)
    open_customer(page, user_id)
    settle(page)
    page.get_by_role("heading", name="Refund").wait_for()
    settle(page)
    page.get_by_text("Part of it").click()
    settle(page)
    page.get_by_label("Amount to refund (USD)").fill(f"{amount / 200:.2f}")
    page.get_by_label("Amount to refund (USD)").press("Enter")
    page.get_by_label("Reason (kept in the refund's metadata in Stripe)").fill("browser test: half back")
    page.get_by_label("Reason (kept in the refund's metadata in Stripe)").press("Enter")
    settle(page)
    page.get_by_role("button", name="Preview refund").click()
    page.get_by_text("Credits taken back").wait_for()
    settle(page)
    screenshot(page, "refund-preview")

    page.get_by_text("I confirm this refund").click()
    settle(page)
    page.get_by_role("button", name="Refund in Stripe").click()
    page.get_by_text("pending until Stripe reports it").wait_for()
    settle(page)
    screenshot(page, "refund-pending")
    [sent] = stripe_server.state.requests_to("POST", "/v1/refunds")
    assert sent.params["payment_intent"] == "pi_browser" and sent.params["amount"] == str(amount // 2)
    assert sent.params["reason"] == "requested_by_customer" and sent.params["metadata"]["operator"] == "alice"
    with db.read_session(engine) as session:
        request = session.execute(select(RefundRequest)).scalars().one()
        assert ledger.balance(session, user_id) == balance_before  # the ledger waits for charge.refunded

    # Stripe's charge.refunded, as the sidecar would ingest it
    [refunded] = [e for e in stripe_server.state.objects["events"].values() if e["type"] == "charge.refunded"]
    body = {k: v for k, v in refunded.items() if not k.startswith("_")}
    settings = load_settings({"DATABASE_URL": seeded_db, "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
                              "STRIPE_SECRET_KEY": "sk_test_x", "STRIPE_API_BASE": stripe_server.url,
                              "BILLING_ENV_FILE": "/nonexistent"})
    assert events.ingest(body, raw_payload=json.dumps(body), engine=engine, settings=settings).status == "processed"
    page.goto(dashboard)  # a new session: sign in again
    open_customer(page, user_id)
    settle(page)
    page.get_by_text("Refunds made from the console").wait_for()
    settle(page)
    screenshot(page, "refund-applied")
    with db.read_session(engine) as session:
        assert refunds.refund_requests(session, user_id=user_id)[0]["refund"] == request.stripe_refund_id
        assert refunds.refund_requests(session, user_id=user_id)[0]["status"] == "applied"
        assert ledger.balance(session, user_id) < balance_before

    visit(page, "Webhook events", "Webhook events")
    page.get_by_role("button", name="Preview replay").click()
    page.get_by_text("Nothing was changed").wait_for()
    settle(page)
    screenshot(page, "replay-preview")

    visit(page, "Expiring credits", "Expiring credits")
    page.get_by_text("Expiring in 7 days").wait_for()
    page.wait_for_timeout(800)  # let the chart draw
    screenshot(page, "expiring-credits")
