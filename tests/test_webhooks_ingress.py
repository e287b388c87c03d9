"""Ingress: signatures, rejections, exactly-once storage under duplicates and concurrency, failures that
leave nothing behind, replay, health and the schema check."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import stripe
from sqlalchemy import func, select
from starlette.testclient import TestClient

from billing_core import cli, db, events, ledger
from wiring import wiring
from billing_core.models import Account, LedgerEntry, Payment, StripeEvent
from billing_core.settings import get_settings, reset_settings_cache
from billing_core.webapp import create_app
from stripe_events import balance, checkout_completed, configure_webhooks, deliver, encode, signed_headers, stored

URL = "/api/stripe/webhook"


def count(model) -> int:
    with db.read_session() as session:
        return session.execute(select(func.count()).select_from(model)).scalar_one()


def post_raw(client, body: str | bytes, headers: dict):
    return client.post(URL, content=body.encode() if isinstance(body, str) else body, headers=headers)


# --- rejections ------------------------------------------------------------------------------

def test_missing_signature_is_refused(sidecar):
    body = encode(checkout_completed(user_id="u1", item="pack_100"))
    response = post_raw(sidecar, body, {"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"] == "missing Stripe-Signature header"
    assert count(StripeEvent) == 0


def test_wrong_secret_and_tampered_body_are_refused(sidecar):
    body = encode(checkout_completed(user_id="u1", item="pack_100"))
    response = post_raw(sidecar, body, signed_headers(body, "whsec_someone_else_000000000000"))
    assert response.status_code == 400 and response.json()["error"] == "invalid signature"
    tampered = body.replace('"pack_100"', '"pack_1000"')
    response = post_raw(sidecar, tampered, signed_headers(body))
    assert response.status_code == 400 and response.json()["error"] == "invalid signature"
    response = post_raw(sidecar, body, {"Stripe-Signature": "garbage"})
    assert response.status_code == 400 and response.json()["error"] == "invalid signature"
    assert count(StripeEvent) == 0 and count(LedgerEntry) == 0


def test_stale_timestamp_is_refused(sidecar):
    body = encode(checkout_completed(user_id="u1", item="pack_100"))
    response = post_raw(sidecar, body, signed_headers(body, timestamp=int(time.time()) - 301))
    assert response.status_code == 400 and response.json()["error"].startswith("stale timestamp")
    fresh_enough = post_raw(sidecar, body, signed_headers(body, timestamp=int(time.time()) - 200))
    assert fresh_enough.status_code == 200


@pytest.mark.parametrize("body, reason", [
    ("this is not json", "body is not JSON"),
    ('["a list"]', "not a Stripe event: the body is not a JSON object"),
    ('{"id": "ch_1", "type": "charge.refunded", "data": {"object": {}}, "created": 1}',
     "not a Stripe event: id must be a string starting with evt_"),
    ('{"id": "evt_1", "data": {"object": {}}, "created": 1}', "not a Stripe event: type is missing"),
    ('{"id": "evt_1", "type": "charge.refunded", "data": {}, "created": 1}',
     "not a Stripe event: data.object is missing"),
    ('{"id": "evt_1", "type": "charge.refunded", "data": {"object": {}}}', "not a Stripe event: created is missing"),
])
def test_bodies_that_are_not_events_are_refused(sidecar, body, reason):
    response = post_raw(sidecar, body, signed_headers(body))
    assert response.status_code == 400 and response.json()["error"] == reason
    assert count(StripeEvent) == 0


def test_oversized_body_is_refused_with_413(sidecar):
    body = '{"pad": "' + "x" * events.MAX_BODY_BYTES + '"}'
    response = post_raw(sidecar, body, signed_headers(body))
    assert response.status_code == 413
    assert count(StripeEvent) == 0


def test_live_event_refused_with_a_test_key_and_test_event_refused_with_a_live_key(database_url, monkeypatch):
    configure_webhooks(monkeypatch)
    monkeypatch.setenv("STRIPE_SECRET_KEY", "sk_test_51WebhookTests00000000a1b2")
    reset_settings_cache()
    with TestClient(create_app()) as client:
        live = checkout_completed(user_id="u1", item="pack_100")
        live["livemode"] = True
        response = deliver(client, live)
        assert response.status_code == 400 and "live-mode event refused" in response.json()["error"]
    monkeypatch.setenv("STRIPE_SECRET_KEY", "sk_live_51WebhookTests00000000a1b2")
    reset_settings_cache()
    with TestClient(create_app()) as client:
        response = deliver(client, checkout_completed(user_id="u1", item="pack_100"))
        assert response.status_code == 400 and "test-mode event refused" in response.json()["error"]
    assert count(StripeEvent) == 0 and balance("u1") == 0


def test_any_of_several_comma_separated_secrets_is_accepted(database_url, monkeypatch):
    configure_webhooks(monkeypatch, secret="whsec_dashboard_000000000000, whsec_cli_listen_0000000000")
    with TestClient(create_app()) as client:
        assert deliver(client, checkout_completed(user_id="u1", item="pack_100"),
                       secret="whsec_cli_listen_0000000000").status_code == 200
        assert deliver(client, checkout_completed(user_id="u1", item="pack_100"),
                       secret="whsec_dashboard_000000000000").status_code == 200
    assert balance("u1") == 200


def test_without_a_webhook_secret_every_delivery_is_refused(database_url):
    with TestClient(create_app()) as client:
        response = deliver(client, checkout_completed(user_id="u1", item="pack_100"))
    assert response.status_code == 500 and "STRIPE_WEBHOOK_SECRET" in response.json()["error"]
    assert count(StripeEvent) == 0


# --- storage and exactly-once ----------------------------------------------------------------

def test_event_is_stored_with_its_facts_and_api_version_mismatch_is_visible(sidecar):
    evt = checkout_completed(user_id="u1", item="pack_100")
    evt["api_version"] = "2024-06-20"
    body = encode(evt)
    response = post_raw(sidecar, body, signed_headers(body))
    assert response.status_code == 200 and response.json()["status"] == "processed"
    row = stored(evt["id"])
    assert (row.type, row.api_version, row.livemode, row.created, row.payload, row.source, row.attempts) == \
        ("checkout.session.completed", "2024-06-20", False, evt["created"], body, "webhook", 1)
    assert events.api_version_mismatch(row) and balance("u1") == 100
    current = checkout_completed(user_id="u1", item="pack_100")
    deliver(sidecar, current)
    assert not events.api_version_mismatch(stored(current["id"]))
    assert stored(current["id"]).api_version == stripe.api_version


def test_duplicates_one_after_another_change_nothing(sidecar):
    evt = checkout_completed(user_id="u1", item="pack_250")
    answers = [deliver(sidecar, evt).json() for _ in range(4)]
    assert [a["duplicate"] for a in answers] == [False, True, True, True]
    assert balance("u1") == 250 and count(StripeEvent) == 1 and count(Payment) == 1
    assert stored(evt["id"]).attempts == 1


def test_identical_deliveries_at_the_same_moment_apply_once(sidecar):
    evt = checkout_completed(user_id="u1", item="pack_500")
    barrier = threading.Barrier(8)

    def post(_):
        barrier.wait()
        return deliver(sidecar, evt)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))
    assert [r.status_code for r in responses] == [200] * 8
    assert sum(not r.json()["duplicate"] for r in responses) == 1
    assert balance("u1") == 500 and count(Payment) == 1 and count(LedgerEntry) == 1


def test_concurrent_ingest_of_the_same_payment_under_two_event_types(database_url, monkeypatch):
    """The pipeline itself, from threads: copies of two events for one payment, all at once."""
    configure_webhooks(monkeypatch)
    fields = dict(session_id="cs_test_both", user_id="u1", item="pack_1000", payment_intent="pi_both")
    both = [checkout_completed(**fields), checkout_completed(type="checkout.session.async_payment_succeeded",
                                                             **fields)]
    barrier = threading.Barrier(10)

    def run(number):
        evt = both[number % 2]
        barrier.wait()
        return events.ingest(evt, raw_payload=encode(evt), **wiring())

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(run, range(10)))
    assert {r.status for r in results} == {"processed"}
    assert sum(not r.duplicate for r in results) == 2
    assert balance("u1") == 1000 and count(LedgerEntry) == 1 and count(StripeEvent) == 2


def test_failure_mid_processing_leaves_nothing_behind_and_answers_500(sidecar, monkeypatch):
    real_grant = ledger.grant_pack_once
    secret_key = "sk_live_51ShouldNeverBeShown000a1b2"

    def grant_then_fail(session, **kwargs):
        real_grant(session, **kwargs)  # the first write happens ...
        raise RuntimeError(f"disk on fire while using {secret_key}")  # ... then processing blows up

    monkeypatch.setattr(ledger, "grant_pack_once", grant_then_fail)
    evt = checkout_completed(user_id="u1", item="pack_100", customer="cus_f")
    response = deliver(sidecar, evt)
    assert response.status_code == 500
    assert secret_key not in response.text
    row = stored(evt["id"])
    assert (row.status, row.attempts) == ("failed", 1)
    assert "RuntimeError: disk on fire" in row.error and secret_key not in row.error and "…a1b2" in row.error
    assert count(LedgerEntry) == 0 and count(Payment) == 0 and count(Account) == 0
    monkeypatch.setattr(ledger, "grant_pack_once", real_grant)
    retried = deliver(sidecar, evt)  # Stripe retries: now it applies, once
    assert retried.status_code == 200 and retried.json()["status"] == "processed"
    assert (stored(evt["id"]).status, stored(evt["id"]).attempts, stored(evt["id"]).error) == ("processed", 2, None)
    assert balance("u1") == 100


def test_needs_attention_rolls_back_its_effects(sidecar, monkeypatch):
    from billing_core import handlers

    def link_then_give_up(session, checkout_session, **kwargs):
        ledger.lock_account(session, user_id="half", stripe_customer_id="cus_half")
        raise handlers.NeedsAttention("cannot decide")

    monkeypatch.setattr(handlers.checkout, "fulfil_checkout_session", link_then_give_up)
    evt = checkout_completed(user_id="u1", item="pack_100")
    assert deliver(sidecar, evt).json()["status"] == "needs_attention"
    assert count(Account) == 0 and stored(evt["id"]).error == "cannot decide"


# --- replay ----------------------------------------------------------------------------------

def test_replay_command_reprocesses_failed_events(sidecar, monkeypatch, capsys):
    real_grant = ledger.grant_pack_once
    monkeypatch.setattr(ledger, "grant_pack_once", lambda session, **kw: (_ for _ in ()).throw(RuntimeError("boom")))
    failed = [checkout_completed(user_id="u1", item="pack_100") for _ in range(2)]
    for evt in failed:
        assert deliver(sidecar, evt).status_code == 500
    monkeypatch.setattr(ledger, "grant_pack_once", real_grant)
    assert cli.main(["replay", "--failed"]) == 0
    out = capsys.readouterr().out
    assert all(f"{evt['id']}: processed (user u1)" in out for evt in failed)
    assert balance("u1") == 200
    assert cli.main(["replay", "--failed"]) == 0
    assert "no failed events to replay" in capsys.readouterr().out


def test_replay_named_events_is_idempotent_and_can_assign_a_user(sidecar, capsys):
    done = checkout_completed(user_id="u1", item="pack_100")
    deliver(sidecar, done)
    orphan = checkout_completed(user_id="", item="pack_250", customer="cus_orphan")
    orphan["data"]["object"]["metadata"] = {"item": "pack_250"}
    assert deliver(sidecar, orphan).json()["status"] == "needs_attention"
    assert cli.main(["replay", done["id"]]) == 0
    assert cli.main(["replay", orphan["id"], "--user", "u7", "--operator", "carol", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert f"{done['id']}: processed (user u1)" == lines[0]
    assert json.loads(lines[1])["results"][0]["status"] == "processed"
    assert balance("u1") == 100 and balance("u7") == 250
    with db.read_session() as session:
        assert session.get(StripeEvent, orphan["id"]).reprocessed_by == "carol"
    assert cli.main(["replay", "evt_missing"]) == 1
    assert "no stored event evt_missing" in capsys.readouterr().err
    assert cli.main(["replay"]) == 1


# --- health and startup ----------------------------------------------------------------------

def test_healthz_reports_the_database_and_the_last_event(sidecar):
    first = sidecar.get("/healthz").json()
    assert (first["database"], first["last_event_at"]) == ("ok", None) and first["pool"]["limit"] > 0
    deliver(sidecar, checkout_completed(user_id="u1", item="pack_100"))
    body = sidecar.get("/healthz").json()
    assert body["database"] == "ok" and body["last_event_at"]
    if db.is_sqlite(db.get_engine()):  # the group writer applied it: one event taken, one group committed
        assert first["webhook_writer"]["taken"] == 0
        assert body["webhook_writer"] == {"queued": 0, "taken": 1, "groups": 1, "stopped": False}
    else:  # PostgreSQL: each event on the thread pool, no writer
        assert "webhook_writer" not in body


def test_healthz_answers_503_when_the_database_is_unreachable(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/nowhere")
    reset_settings_cache()
    with TestClient(create_app(check_schema=False)) as client:
        response = client.get("/healthz")
    assert response.status_code == 503 and response.json()["database"] == "unreachable"


def test_sidecar_refuses_to_start_on_an_out_of_date_schema(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    reset_settings_cache()
    with pytest.raises(db.SchemaOutOfDate, match="init-db"):
        create_app()
    assert cli.main(["serve-webhooks", "--port", "5999"]) == 1
    assert "init-db" in capsys.readouterr().err
    db.get_engine(get_settings().database_url).dispose()


def test_checkout_pages_are_plain_and_the_cancel_page_says_nothing_was_charged(sidecar):
    response = sidecar.get("/checkout/cancel")
    assert response.status_code == 200 and "Nothing was charged" in response.text
    assert response.headers["content-type"].startswith("text/html")
    bad = sidecar.get("/checkout/success", params={"session_id": "<script>x</script>"})
    assert bad.status_code == 400 and "<script>" not in bad.text


def test_reprocess_refuses_a_bad_assigned_user_without_touching_the_event(sidecar):
    orphan = checkout_completed(user_id="", item="pack_100", customer="cus_orphan")
    orphan["data"]["object"]["metadata"] = {"item": "pack_100"}
    deliver(sidecar, orphan)
    with pytest.raises(ledger.LedgerError, match="longer than 200"):
        events.reprocess(orphan["id"], assigned_user_id="x" * 201, **wiring())
    row = stored(orphan["id"])
    assert (row.status, row.attempts, row.assigned_user_id) == ("needs_attention", 1, None)
    with pytest.raises(events.UnknownEvent):
        events.reprocess("evt_nope", **wiring())


def test_a_real_uvicorn_server_takes_signed_deliveries(database_url, monkeypatch):
    import httpx

    from live_server import running_server

    configure_webhooks(monkeypatch)
    evt = checkout_completed(user_id="u1", item="pack_100")
    body = encode(evt)
    with running_server(create_app()) as base:
        first = httpx.post(base + URL, content=body, headers=signed_headers(body))
        again = httpx.post(base + URL, content=body, headers=signed_headers(body))
        health = httpx.get(base + "/healthz")
    assert (first.status_code, first.json()["status"]) == (200, "processed")
    assert again.json()["duplicate"] is True and health.json()["last_event_at"]
    assert balance("u1") == 100


def test_replay_failed_also_picks_up_an_event_left_received_by_a_crash(database_url, monkeypatch):
    from datetime import timedelta

    from billing_core.models import utcnow

    configure_webhooks(monkeypatch)
    evt = checkout_completed(user_id="u1", item="pack_100")
    events._store(db.get_engine(), evt, encode(evt), "webhook")  # stored, then the process died
    assert [r.event_id for r in events.replay_failed(**wiring())] == []  # too fresh: may still be in progress
    with db.write_session() as session:
        session.get(StripeEvent, evt["id"]).received_at = utcnow() - timedelta(minutes=5)
    assert [(r.event_id, r.status) for r in events.replay_failed(**wiring())] == [(evt["id"], "processed")]
    assert balance("u1") == 100


def test_signed_but_absurdly_nested_json_is_a_400_not_a_crash(sidecar):
    body = "[" * 100_000 + "]" * 100_000
    response = post_raw(sidecar, body, signed_headers(body))
    assert response.status_code == 400 and response.json()["error"] == "body is not JSON"


# --- validly signed events with odd values: a 400 or needs-attention, never a 500 -------------

def _pack_checkout(**session_fields) -> dict:
    evt = checkout_completed(user_id="u1", item="pack_100", customer="cus_odd", payment_intent="pi_odd")
    evt["data"]["object"].update(session_fields)
    return evt


def _with(evt: dict, **fields) -> dict:
    evt.update(fields)
    return evt


def _subscription(*, status="active", period_end=None) -> dict:
    from stripe_events import DEFAULT_PRICES, subscription_event

    now = int(time.time())
    return subscription_event("customer.subscription.created", subscription_id="sub_odd", customer="cus_odd",
                              price=DEFAULT_PRICES["starter"], user_id="u1", period_start=now,
                              period_end=period_end or now + 30 * 86400, status=status)


def _renewal(*, period_end) -> dict:
    from stripe_events import DEFAULT_PRICES, event, subscription_invoice

    now = int(time.time())
    return event("invoice.paid", subscription_invoice(
        invoice_id="in_odd", customer="cus_odd", subscription_id="sub_odd", user_id="u1",
        price=DEFAULT_PRICES["starter"], period_start=now, period_end=period_end, amount=999,
        billing_reason="subscription_cycle"))


ODD_EVENTS = {
    "event created 10**20": (lambda: _with(_pack_checkout(), created=10**20), 400),
    "NUL in the event id": (lambda: _with(_pack_checkout(), id="evt_odd\u0000id"), 400),
    "lone surrogate in the event id": (lambda: _with(_pack_checkout(), id="evt_odd\ud800id"), 400),
    "amount_total 10**25": (lambda: _pack_checkout(amount_total=10**25), "needs_attention"),
    "currency 5": (lambda: _pack_checkout(currency=5), "needs_attention"),
    "session created 10**12": (lambda: _pack_checkout(created=10**12), "needs_attention"),
    "subscription period_end 10**20": (lambda: _subscription(period_end=10**20), "needs_attention"),
    "invoice line period end 10**20": (lambda: _renewal(period_end=10**20), "needs_attention"),
    "subscription status of 100 chars": (lambda: _subscription(status="s" * 100), "needs_attention"),
    "customer id of 500 chars": (lambda: _pack_checkout(customer="cus_" + "x" * 496), "needs_attention"),
    "customer email of 400 chars": (lambda: _pack_checkout(customer_details={"email": "e" * 388 + "@example.com"}),
                                    "needs_attention"),
}


@pytest.mark.parametrize("case", list(ODD_EVENTS))
def test_signed_events_with_odd_values_never_answer_500_and_write_only_the_event(sidecar, case):
    from billing_core.models import CheckoutLink, Dispute, Subscription

    build, expected = ODD_EVENTS[case]
    evt = build()
    response = deliver(sidecar, evt)
    if expected == 400:
        assert response.status_code == 400, response.text
        assert count(StripeEvent) == 0
    else:
        assert response.status_code == 200, response.text
        assert response.json()["status"] == expected
        row = stored(evt["id"])
        assert row.status == expected and row.error and row.error.isprintable()
    for model in (Account, Payment, Subscription, LedgerEntry, Dispute, CheckoutLink):
        assert count(model) == 0, model.__name__


def test_a_copy_failing_after_another_copy_finished_the_event_does_not_mark_it_failed(sidecar):
    """Two copies race; the second loses its database connection while waiting for the first. Its failure is
    recorded only on an event that is still pending, never over a finished one."""
    evt = checkout_completed(user_id="u1", item="pack_100")
    assert deliver(sidecar, evt).json()["status"] == "processed"
    events._record_failure(db.get_engine(), evt["id"], "OperationalError: server closed the connection")
    with db.read_session() as session:
        row = session.get(StripeEvent, evt["id"])
        assert (row.status, row.error) == ("processed", None)
