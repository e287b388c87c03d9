"""Issue 13, the sidecar side: named credits-API tokens rotated without a restart (through create_app), the
token recorded on each spend, the credits API on its own listener, and the return page (database first, one
Stripe lookup per session id, a short timeout without retries, a quick answer when Stripe is slow)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import select
from starlette.testclient import TestClient

from billing_core import credits_api, db, ledger, webapp
from billing_core.models import Consumption
from billing_core.settings import PROJECT_ROOT, reset_settings_cache
from billing_core.webapp import create_app
from live_server import free_port
from stripe_events import configure_webhooks, deliver, event

FIRST, SECOND, CI = "first-token-aaaaaaaaaa", "second-token-bbbbbbbbb", "ci-token-cccccccccccccc"


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def give_credits(user_id: str, credits: int) -> None:
    with db.write_session() as session:
        ledger.grant_pack(session, user_id=user_id, credits=credits, source_key=f"grant:{user_id}:{credits}")


def spend(client, token, reference, user_id="alice"):
    return client.post(f"/api/accounts/{user_id}/consume", json={"credits": 1, "reference": reference},
                       headers=bearer(token))


def test_named_tokens_rotate_without_a_restart(database_url, tmp_path, monkeypatch):
    env_file = tmp_path / "app.env"
    env_file.write_text(f"BILLING_API_TOKENS=agent:{FIRST}\n")
    monkeypatch.setenv("BILLING_ENV_FILE", str(env_file))
    reset_settings_cache()
    clock = {"now": 1000.0}
    monkeypatch.setattr(credits_api, "_clock", lambda: clock["now"])
    give_credits("alice", 100)
    with TestClient(create_app()) as client:
        assert spend(client, FIRST, "job-1").status_code == 200
        env_file.write_text(f"BILLING_API_TOKENS=agent:{SECOND}, ci:{CI}\n")
        clock["now"] += credits_api.TOKEN_RECHECK_SECONDS - 0.1
        assert spend(client, FIRST, "job-2").status_code == 200  # not looked at again yet
        clock["now"] += 0.2
        assert spend(client, FIRST, "job-3").status_code == 401  # the old token is gone
        assert spend(client, SECOND, "job-3").status_code == 200
        assert spend(client, CI, "job-4").status_code == 200
        assert client.get("/api/accounts/alice", headers=bearer(CI)).json()["balance"] == 96
        env_file.write_text("")  # every token removed: closed, not open
        clock["now"] += credits_api.TOKEN_RECHECK_SECONDS
        assert spend(client, SECOND, "job-5").status_code == 503
    assert credits_api.TOKEN_RECHECK_SECONDS <= 10
    with db.read_session() as session:
        spent = session.execute(select(Consumption.reference, Consumption.token_name)
                                .order_by(Consumption.id)).all()
    assert spent == [("job-1", "agent"), ("job-2", "agent"), ("job-3", "agent"), ("job-4", "ci")]


def test_the_single_token_is_named_default_beside_named_ones(database_url, monkeypatch):
    monkeypatch.setenv("BILLING_API_TOKEN", FIRST)
    monkeypatch.setenv("BILLING_API_TOKENS", f"ci:{CI}")
    reset_settings_cache()
    give_credits("alice", 10)
    with TestClient(create_app()) as client:
        assert spend(client, FIRST, "a").status_code == 200
        assert spend(client, CI, "b").status_code == 200
        assert spend(client, CI[:-1], "c").status_code == 401
    with db.read_session() as session:
        assert session.execute(select(Consumption.token_name).order_by(Consumption.id)).scalars().all() == [
            "default", "ci"]


def test_with_api_port_the_webhook_listener_does_not_serve_the_api(sqlite_url, monkeypatch):
    """`serve-webhooks` as a real process with API_PORT: two listeners, each with only its own routes."""
    monkeypatch.setenv("BILLING_API_TOKEN", FIRST)
    give_credits("alice", 10)
    webhook_port, api_port = free_port(), free_port()
    env = {**os.environ, "DATABASE_URL": sqlite_url, "BILLING_API_TOKEN": FIRST, "WEBHOOK_PORT": str(webhook_port),
           "API_PORT": str(api_port), "BILLING_ENV_FILE": "/nonexistent.env"}
    process = subprocess.Popen([sys.executable, "-m", "billing_core", "serve-webhooks"], cwd=PROJECT_ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        webhook, api = f"http://127.0.0.1:{webhook_port}", f"http://127.0.0.1:{api_port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(api + "/healthz", timeout=2)
                httpx.get(webhook + "/healthz", timeout=2)
                break
            except httpx.HTTPError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"serve-webhooks did not start: {process.stdout.read() if process.poll() else ''}")
                time.sleep(0.2)
        assert httpx.get(api + "/api/accounts/alice", headers=bearer(FIRST)).json()["balance"] == 10
        assert httpx.get(webhook + "/api/accounts/alice", headers=bearer(FIRST)).status_code == 404
        assert httpx.post(webhook + "/api/accounts/alice/consume", json={"credits": 1, "reference": "x"},
                          headers=bearer(FIRST)).status_code == 404
        assert httpx.get(webhook + "/checkout/cancel").status_code == 200
        assert httpx.get(api + "/checkout/cancel").status_code == 404
        assert httpx.post(api + "/api/stripe/webhook", content=b"{}").status_code == 404
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=30)  # both listeners stop on one signal
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail("serve-webhooks did not stop on SIGTERM")
    assert process.returncode == 0, output
    assert f"credits API on 127.0.0.1:{api_port}" in output


# --- the return page ---------------------------------------------------------------------------

@pytest.fixture
def sidecar(database_url, monkeypatch, fake_stripe):
    configure_webhooks(monkeypatch)
    with TestClient(create_app()) as client:
        yield client


def paid_session(state, *, user_id="u1", item="pack_250", payment_status="paid"):
    created = state.add_checkout_session(mode="payment", client_reference_id=user_id,
                                         metadata={"user_id": user_id, "item": item, "credits": "250"},
                                         amount_total=2000, amount_subtotal=2000)
    return state.complete_checkout_session(created["id"], payment_status=payment_status)


def test_return_page_reads_the_database_before_stripe(sidecar, stripe_state):
    session = paid_session(stripe_state)
    deliver(sidecar, event("checkout.session.completed", session))  # the webhook came first
    page = sidecar.get("/checkout/success", params={"session_id": session["id"]})
    assert page.status_code == 200 and "Your credit balance is now 250 credits." in page.text
    assert stripe_state.requests_to("GET", f"/v1/checkout/sessions/{session['id']}") == []


def test_return_page_asks_stripe_once_per_session_id_within_the_window(sidecar, stripe_state):
    session = paid_session(stripe_state, payment_status="unpaid")
    for _ in range(5):
        page = sidecar.get("/checkout/success", params={"session_id": session["id"]})
        assert "still being processed" in page.text
    assert len(stripe_state.requests_to("GET", f"/v1/checkout/sessions/{session['id']}")) == 1
    for _ in range(3):
        assert sidecar.get("/checkout/success", params={"session_id": "cs_test_unknown"}).status_code == 404
    assert len(stripe_state.requests_to("GET", "/v1/checkout/sessions/cs_test_unknown")) == 1


def test_return_page_does_not_retry_stripe(sidecar, stripe_state):
    session = paid_session(stripe_state)
    stripe_state.fail_next(status=500, type="api_error", message="boom", times=3)
    page = sidecar.get("/checkout/success", params={"session_id": session["id"]})
    assert page.status_code == 503
    assert len(stripe_state.requests_to("GET", f"/v1/checkout/sessions/{session['id']}")) == 1


def test_a_slow_stripe_gets_a_quick_answer_and_the_credits_follow(database_url, monkeypatch, stripe_server,
                                                                 stripe_state):
    configure_webhooks(monkeypatch)
    monkeypatch.setattr(webapp, "RETURN_PAGE_WAIT", 0.5)
    session = paid_session(stripe_state)
    stripe_state.latency = 1.5
    with TestClient(create_app()) as client:
        started = time.monotonic()
        page = client.get("/checkout/success", params={"session_id": session["id"]})
        assert page.status_code == 200 and "credits are on their way" in page.text
        assert time.monotonic() - started < 1.4  # answered before Stripe did
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the lookup finishes in the background and grants the credits
            page = client.get("/checkout/success", params={"session_id": session["id"]})
            if "balance is now" in page.text:
                break
            time.sleep(0.2)
    assert "Your credit balance is now 250 credits." in page.text
    assert len(stripe_state.requests_to("GET", f"/v1/checkout/sessions/{session['id']}")) == 1


def test_stripe_lookups_for_the_return_page_have_a_timeout_and_no_retries(monkeypatch):
    from billing_core import stripe_client
    from billing_core.settings import load_settings

    monkeypatch.setattr(stripe_client, "_test_http_client", None)
    settings = load_settings({"BILLING_ENV_FILE": "/nonexistent", "STRIPE_SECRET_KEY": "sk_test_" + "x" * 24})
    client = stripe_client.make_stripe_client(settings, max_network_retries=0, timeout=webapp.RETURN_PAGE_STRIPE_TIMEOUT)
    requestor = client._requestor  # stripe-python keeps both here (no public accessor)
    assert requestor._client._timeout == 5.0
    assert requestor._options.max_network_retries == 0


def test_a_flood_of_return_pages_is_all_answered_while_spends_keep_working(database_url, monkeypatch,
                                                                          stripe_server, stripe_state):
    """Hundreds of return-page requests for unknown sessions against a slow Stripe, while the credits API is
    used: every request is answered and every spend succeeds (timings: bench/return_page_flood.py)."""
    from live_server import running_server

    configure_webhooks(monkeypatch)
    monkeypatch.setenv("BILLING_API_TOKEN", FIRST)
    reset_settings_cache()
    give_credits("alice", 1000)
    stripe_state.latency = 1.0
    with running_server(create_app()) as base:
        def return_page(i):
            return httpx.get(f"{base}/checkout/success", params={"session_id": f"cs_test_flood_{i}"},
                             timeout=30).status_code

        def spends():
            with httpx.Client(base_url=base, timeout=30) as api:
                return [api.post("/api/accounts/alice/consume", json={"credits": 1, "reference": f"s-{i}"},
                                 headers=bearer(FIRST)).status_code for i in range(20)]

        with ThreadPoolExecutor(max_workers=33) as pool:
            spent = pool.submit(spends)
            pages = list(pool.map(return_page, range(300)))
        assert spent.result() == [200] * 20
    assert len(pages) == 300 and set(pages) <= {200, 404}
    asked = [r for r in stripe_state.requests if r.path.startswith("/v1/checkout/sessions/cs_test_flood_")]
    assert len(asked) < 300  # a busy pool answers without asking Stripe


def test_new_settings_and_their_problems():
    from billing_core.settings import check_config, load_settings

    def settings(**values):
        return load_settings({"BILLING_ENV_FILE": "/nonexistent", **values})

    default = settings()
    assert (default.dashboard_address, default.api_listener_separate, default.session_idle_minutes,
            default.support_daily_adjustment_cap) == ("127.0.0.1", False, 30, 2000)
    named = settings(BILLING_API_TOKENS=f"agent:{FIRST}, ci:{CI}", BILLING_API_TOKEN=SECOND, API_PORT="5001")
    assert named.api_tokens == {"default": SECOND, "agent": FIRST, "ci": CI}
    assert named.api_listener == ("127.0.0.1", 5001)
    assert "second-token" not in repr(named)
    problems = {(p.setting, p.message) for p in check_config(settings(
        BILLING_API_TOKENS=f"agent:{FIRST},agent:{CI},ci:short,broken", API_PORT="5000",
        DASHBOARD_ADDRESS="0.0.0.0", SESSION_IDLE_MINUTES="0"))}
    messages = "\n".join(f"{s}: {m}" for s, m in problems)
    assert "BILLING_API_TOKENS: entry 2: the name 'agent' is used twice" in messages
    assert "BILLING_API_TOKENS: entry 3 (ci): the token must be at least 16 characters" in messages
    assert "BILLING_API_TOKENS: entry 4 must be name:token" in messages
    assert "API_PORT: 5000 is the webhook listener's port" in messages
    assert "DASHBOARD_ADDRESS: the dashboard listens on 0.0.0.0" in messages
    assert "SESSION_IDLE_MINUTES: must be between 1 and 1440" in messages
    assert FIRST not in messages and CI not in messages
    shared = {p.setting for p in check_config(settings(BILLING_API_TOKEN=FIRST, WEBHOOK_HOST="0.0.0.0"))}
    assert "API_PORT" in shared  # the API on the public webhook listener is pointed out
