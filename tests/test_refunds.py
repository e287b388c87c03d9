"""Refunds from the console: the clawback preview, the refund's exact Stripe parameters and idempotency,
the pending state until charge.refunded arrives, refusals, and the property "preview == what charge.refunded
later does" through the real sidecar with really signed deliveries, on SQLite and PostgreSQL."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import select
from starlette.testclient import TestClient

from billing_core import db, ledger, refunds
from billing_core.models import RefundRequest
from billing_core.settings import PROJECT_ROOT
from billing_core.webapp import create_app
from db_dump import database_dump
from wiring import wiring
from stripe_events import PACK_AMOUNTS, checkout_completed, configure_webhooks, deliver

PACK_CREDITS = {"pack_100": 100, "pack_250": 250, "pack_500": 500, "pack_1000": 1000}
_example = itertools.count(1)


@pytest.fixture
def sidecar(database_url, fake_stripe, monkeypatch):
    configure_webhooks(monkeypatch)
    with TestClient(create_app()) as client:
        yield client


def preview(**kw):
    return refunds.preview_refund(**kw, **wiring())


def refund(**kw):
    return refunds.create_refund(**kw, **wiring())


def buy_pack(client, state, *, user="u1", item="pack_500", tag="p") -> str:
    """A paid pack through the sidecar, with its charge in the Stripe double; returns the PaymentIntent id."""
    intent, session_id = f"pi_{tag}", f"cs_test_{tag}"
    state.add_charge(id=f"ch_{tag}", payment_intent=intent, amount=PACK_AMOUNTS[item], customer=f"cus_{user}")
    response = deliver(client, checkout_completed(user_id=user, item=item, session_id=session_id,
                                                  payment_intent=intent, customer=f"cus_{user}"))
    assert response.status_code == 200 and response.json()["status"] == "processed", response.text
    return intent


def spend(user: str, credits: int, reference: str) -> None:
    with db.write_session() as session:
        ledger.consume(session, user_id=user, credits=credits, reference=reference)


def balance(user: str) -> dict:
    with db.read_session() as session:
        return ledger.account_summary(session, user).as_dict()


def deliver_stripe_events(client, state, type: str = "charge.refunded") -> None:
    """Deliver the double's events of `type` not yet delivered, signed, oldest first."""
    delivered = state.objects.setdefault("_delivered", {})
    pending = sorted((e for e in state.objects.get("events", {}).values()
                      if e["type"] == type and e["id"] not in delivered), key=lambda e: e["_seq"])
    for evt in pending:
        body = {k: v for k, v in evt.items() if not k.startswith("_")}
        response = deliver(client, body)
        assert response.status_code == 200, response.text
        delivered[evt["id"]] = True


# --- preview ----------------------------------------------------------------------------------

def test_preview_shows_the_clawback_and_changes_nothing(sidecar, fake_stripe, database_url):
    buy_pack(sidecar, fake_stripe.state)  # 500 credits for $35.00
    spend("u1", 100, "job-1")
    before = database_dump(database_url)
    outcome = preview(payment_ref="cs_test_p", amount=1750)
    assert database_dump(database_url) == before
    data = outcome.as_dict()
    assert (data["amount"], data["currency"], data["credits_taken_back"]) == (1750, "usd", 250)
    assert (data["balance_before"], data["balance_after"], data["flagged_after"]) == (400, 150, False)
    assert data["refund"] is None and data["dry_run"] is True
    assert fake_stripe.state.requests == []  # a preview never asks Stripe


def test_preview_of_a_full_refund_after_spending_shows_negative_and_flagged(sidecar, fake_stripe):
    buy_pack(sidecar, fake_stripe.state)
    spend("u1", 400, "job-1")
    data = preview(payment_ref="pi_p").as_dict()
    assert data["amount"] == 3500 and data["credits_taken_back"] == 500
    assert (data["balance_before"], data["balance_after"], data["flagged_after"]) == (100, -400, True)


@pytest.mark.parametrize("ref", ["cs_test_p", "pi_p"])
def test_a_payment_is_found_by_any_id_the_payments_page_shows(sidecar, fake_stripe, ref):
    buy_pack(sidecar, fake_stripe.state)
    assert preview(payment_ref=ref, amount=700).credits_taken_back == 100


# --- the refund -------------------------------------------------------------------------------

def test_refund_sends_exact_parameters_and_stays_pending_until_charge_refunded(sidecar, fake_stripe):
    state = fake_stripe.state
    buy_pack(sidecar, state)
    outcome = refund(payment_ref="cs_test_p", amount=700, reason="double charge, ticket 42",
                                    operator="alice")
    [request] = state.requests_to("POST", "/v1/refunds")
    assert request.params == {"payment_intent": "pi_p", "amount": "700", "reason": "requested_by_customer",
                              "metadata": {"operator": "alice", "reason": "double charge, ticket 42",
                                           "payment": "cs_test_p"}}
    assert request.idempotency_key and request.idempotency_key.startswith("refund:pi_p:700:")
    assert outcome.refund in state.objects["refunds"]
    assert balance("u1")["balance"] == 500  # nothing changes before Stripe's event
    with db.read_session() as session:
        [row] = refunds.refund_requests(session, user_id="u1")
    assert (row["status"], row["amount_cents"], row["operator"], row["refund"]) == ("pending", 700, "alice",
                                                                                   outcome.refund)
    deliver_stripe_events(sidecar, state)
    assert balance("u1")["balance"] == 400
    with db.read_session() as session:
        assert refunds.refund_requests(session, user_id="u1")[0]["status"] == "applied"


def test_a_pending_refund_counts_against_what_is_left(sidecar, fake_stripe):
    buy_pack(sidecar, fake_stripe.state)
    refund(payment_ref="pi_p", amount=3000, reason="partial", operator="alice")
    with pytest.raises(refunds.RefundRefused, match="over what is left .* 500 USD cents"):
        preview(payment_ref="pi_p", amount=600)
    rest = preview(payment_ref="pi_p")  # what is left, after the pending refund applies
    assert (rest.amount, rest.refunded_after) == (500, 3500)
    assert rest.as_dict()["balance_before"] == 500 - 429 and rest.as_dict()["balance_after"] == 0


def test_network_retry_reuses_the_idempotency_key_and_refunds_once(sidecar, fake_stripe):
    state = fake_stripe.state
    buy_pack(sidecar, state)
    state.fail_next(connection_error=True)
    refund(payment_ref="pi_p", amount=1000, reason="r", operator="alice")
    sent = state.requests_to("POST", "/v1/refunds")
    assert len(sent) == 2 and sent[0].idempotency_key == sent[1].idempotency_key
    assert len(state.objects["refunds"]) == 1


def test_a_request_cut_off_after_stripe_refunded_is_recorded_once_when_repeated(sidecar, fake_stripe, monkeypatch):
    state = fake_stripe.state
    buy_pack(sidecar, state)
    real_record = refunds._record
    monkeypatch.setattr(refunds, "_record", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("cut off")))
    with pytest.raises(RuntimeError):
        refund(payment_ref="pi_p", amount=1000, reason="r", operator="alice")
    monkeypatch.setattr(refunds, "_record", real_record)
    outcome = refund(payment_ref="pi_p", amount=1000, reason="r", operator="alice")
    assert len(state.objects["refunds"]) == 1 and outcome.refund in state.objects["refunds"]
    keys = {r.idempotency_key for r in state.requests_to("POST", "/v1/refunds")}
    assert len(keys) == 1
    with db.read_session() as session:
        assert len(session.execute(select(RefundRequest)).all()) == 1


def test_same_key_with_other_parameters_is_stripes_idempotency_error(fake_stripe):
    from billing_core.stripe_client import get_stripe_client

    state = fake_stripe.state
    state.add_charge(id="ch_z", payment_intent="pi_z", amount=1000)
    client = get_stripe_client()
    client.v1.refunds.create(params={"payment_intent": "pi_z", "amount": 100}, options={"idempotency_key": "k1"})
    with pytest.raises(Exception, match="idempotent requests can only be used with the same parameters"):
        client.v1.refunds.create(params={"payment_intent": "pi_z", "amount": 200}, options={"idempotency_key": "k1"})
    with pytest.raises(Exception, match="unknown parameter: foo"):
        client.v1.refunds.create(params={"payment_intent": "pi_z", "foo": "x"})


def test_an_invoice_payment_is_refunded_through_the_payment_its_invoice_names(sidecar, fake_stripe):
    from stripe_events import DEFAULT_PRICES, invoice_paid, subscription_invoice

    state = fake_stripe.state
    state.add_charge(id="ch_inv", payment_intent="pi_inv", amount=999)
    state.add_invoice_payment(invoice="in_r1", payment_intent="pi_inv", amount_paid=999)
    lines = subscription_invoice(invoice_id="in_r1", customer="cus_1", subscription_id="sub_r1", user_id="u1",
                                 price=DEFAULT_PRICES["starter"], period_start=1, period_end=4_000_000_000,
                                 amount=999, billing_reason="subscription_create")["lines"]["data"]
    deliver(sidecar, invoice_paid(invoice_id="in_r1", customer="cus_1", subscription_id="sub_r1", user_id="u1",
                                  billing_reason="subscription_create", lines=lines))
    granted = balance("u1")["balance"]
    assert granted > 0
    shown = preview(payment_ref="in_r1")
    assert shown.credits_taken_back == granted
    refund(payment_ref="in_r1", reason="cancelled in the first week", operator="alice")
    assert state.requests_to("POST", "/v1/refunds")[0].params["payment_intent"] == "pi_inv"
    deliver_stripe_events(sidecar, state)
    assert balance("u1")["balance"] == shown.as_dict()["balance_after"] == 0


# --- refusals ---------------------------------------------------------------------------------

def test_refusals_name_the_problem(sidecar, fake_stripe):
    buy_pack(sidecar, fake_stripe.state)
    with pytest.raises(refunds.RefundRefused, match="unknown payment cs_test_nope"):
        preview(payment_ref="cs_test_nope")
    with pytest.raises(refunds.RefundRefused, match="unknown payment xyz"):
        preview(payment_ref="xyz")
    with pytest.raises(refunds.RefundRefused, match="over what is left"):
        preview(payment_ref="pi_p", amount=3501)
    refund(payment_ref="pi_p", reason="all", operator="alice")
    deliver_stripe_events(sidecar, fake_stripe.state)
    with pytest.raises(refunds.RefundRefused, match="already fully refunded"):
        refund(payment_ref="pi_p", reason="again", operator="alice")


def test_stripe_refusing_is_a_refusal(sidecar, fake_stripe):
    buy_pack(sidecar, fake_stripe.state)
    fake_stripe.state.objects["charges"]["ch_p"]["disputed"] = True
    with pytest.raises(refunds.RefundRefused, match="Stripe refused the refund: .*charged back"):
        refund(payment_ref="pi_p", amount=100, reason="r", operator="alice")
    with db.read_session() as session:
        assert session.execute(select(RefundRequest)).all() == []


# --- the property -----------------------------------------------------------------------------

PROPERTY_SETTINGS = settings(max_examples=int(os.environ.get("PROPERTY_EXAMPLES", "0")) or 15, deadline=None,
                             derandomize=not os.environ.get("PROPERTY_EXAMPLES"), database=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def histories(draw) -> dict:
    packs = draw(st.lists(st.sampled_from(sorted(PACK_AMOUNTS)), min_size=1, max_size=3))
    steps = draw(st.lists(st.tuples(st.sampled_from(("spend", "refund")), st.integers(0, len(packs) - 1),
                                    st.floats(0.05, 1.0)), min_size=1, max_size=6))
    return {"packs": packs, "steps": steps}


@PROPERTY_SETTINGS
@given(history=histories())
def test_preview_equals_what_charge_refunded_later_does(sidecar, fake_stripe, history):
    state, user = fake_stripe.state, f"prop{next(_example)}"
    intents = [buy_pack(sidecar, state, user=user, item=item, tag=f"{user}_{n}")
               for n, item in enumerate(history["packs"])]
    for number, (kind, which, share) in enumerate(history["steps"]):
        if kind == "spend":
            spendable = balance(user)["spendable_balance"]
            if spendable > 0:
                spend(user, max(1, int(spendable * share)), f"job-{number}")
            continue
        intent = intents[which]
        with db.read_session() as session:
            left = refunds.refundable_cents(session, refunds.find_payment(session, intent))
        if left <= 0:
            continue
        amount = max(1, int(left * share))
        expected = preview(payment_ref=intent, amount=amount).as_dict()
        before = balance(user)
        assert expected["balance_before"] == before["balance"]
        refund(payment_ref=intent, amount=amount, reason="property", operator="prop", request=str(number))
        deliver_stripe_events(sidecar, state)
        after = balance(user)
        assert (after["balance"], after["flagged"]) == (expected["balance_after"], expected["flagged_after"])
        assert before["balance"] - after["balance"] == expected["credits_taken_back"]


# --- the CLI ----------------------------------------------------------------------------------

def cli(*args):
    return subprocess.run([sys.executable, "-m", "billing_core", *args], capture_output=True, text=True,
                          env=dict(os.environ), cwd=PROJECT_ROOT, timeout=120)


def test_refund_cli_dry_run_then_refund_then_refusals(database_url, stripe_server, monkeypatch):
    configure_webhooks(monkeypatch)
    with TestClient(create_app()) as client:
        buy_pack(client, stripe_server.state)
    dry = cli("refund", "cs_test_p", "--amount", "1750", "--operator", "alice", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    data = json.loads(dry.stdout)
    assert {k: data[k] for k in ("payment", "amount", "currency", "credits_taken_back", "balance_before",
                                 "balance_after", "flagged_after", "refund")} == {
        "payment": "cs_test_p", "amount": 1750, "currency": "usd", "credits_taken_back": 250,
        "balance_before": 500, "balance_after": 250, "flagged_after": False, "refund": None}
    assert stripe_server.state.requests_to("POST", "/v1/refunds") == []

    done = cli("refund", "ch_p", "--amount", "1750", "--reason", "goodwill", "--operator", "alice", "--json")
    assert done.returncode == 0, done.stderr
    refund_id = json.loads(done.stdout)["refund"]
    assert refund_id in stripe_server.state.objects["refunds"]
    text = cli("refund", "pi_p", "--operator", "alice", "--dry-run")
    assert text.returncode == 0 and "dry run: refunding 1750 USD cents of pi_p" in text.stdout

    for args, expected in [
        (("refund", "cs_test_nope", "--operator", "a"), "error: unknown payment cs_test_nope"),
        (("refund", "pi_p", "--amount", "1751", "--operator", "a"), "error: the amount 1751 is over what is left"),
        (("refund", "pi_p", "--amount", "-5", "--operator", "a"), "error: the amount must be a positive whole"),
    ]:
        result = cli(*args)
        assert result.returncode == 1 and result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(expected), result.stderr
    stripe_server.state.objects["charges"]["ch_p"]["disputed"] = True  # a chargeback the ledger hasn't heard of
    refused = cli("refund", "pi_p", "--amount", "100", "--operator", "a")
    assert refused.returncode == 1 and refused.stderr.startswith("error: Stripe refused the refund"), refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    stripe_server.state.objects["charges"]["ch_p"]["disputed"] = False
    full = cli("refund", "pi_p", "--operator", "a", "--json")
    assert full.returncode == 0 and json.loads(full.stdout)["amount"] == 1750, full.stderr
    again = cli("refund", "pi_p", "--operator", "a")
    assert again.returncode == 1 and again.stderr.strip() == "error: payment pi_p is already fully refunded"
    with db.read_session() as session:  # only charge.refunded changes the ledger
        assert refunds.find_payment(session, "pi_p").amount_refunded == 0
