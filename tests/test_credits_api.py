"""The credits API through Starlette's TestClient and a real uvicorn server, on SQLite and PostgreSQL."""
from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import func, select
from starlette.applications import Starlette
from starlette.testclient import TestClient

from billing_core import credits_api, db, ledger
from billing_core.models import Consumption, LedgerEntry
from billing_core.settings import reset_settings_cache
from live_server import running_server, sidecar_app

TOKEN = "api_token_for_tests_9f3a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def api_token(monkeypatch):
    monkeypatch.setenv("BILLING_API_TOKEN", TOKEN)
    reset_settings_cache()
    return TOKEN


@pytest.fixture
def client(database_url, api_token):
    with TestClient(Starlette(routes=credits_api.routes())) as test_client:
        yield test_client


def give_credits(user_id: str, credits: int, *, key: str | None = None) -> None:
    with db.write_session() as session:
        ledger.grant_pack(session, user_id=user_id, credits=credits, source_key=key or f"test-grant:{user_id}:{credits}")


def current_balance(user_id: str) -> int:
    with db.read_session() as session:
        return ledger.balance(session, user_id)


def open_dispute_on(user_id: str) -> None:
    with db.write_session() as session:
        account = ledger.lock_account(session, user_id=user_id)
        account.open_disputes += 1
        ledger.refresh_flag(session, account)


def consume(client, user_id, body, headers=AUTH):
    return client.post(f"/api/accounts/{user_id}/consume", json=body, headers=headers)


# --- reading ------------------------------------------------------------------------------

def test_get_account_has_the_balance_json_names(client):
    give_credits("alice", 250)
    response = client.get("/api/accounts/alice", headers=AUTH)
    assert response.status_code == 200
    data = response.json()
    assert data["user_id"] == "alice"
    assert data["balance"] == 250
    assert data["spendable_balance"] == 250
    assert data["tier"] == "none"
    assert data["subscription_status"] is None
    assert data["flagged"] is False
    assert [(row["source"], row["credits"]) for row in data["breakdown"]] == [("pack", 250)]
    with db.read_session() as session:
        assert data == ledger.account_summary(session, "alice").as_dict()


def test_get_unknown_account_is_404(client):
    response = client.get("/api/accounts/nobody", headers=AUTH)
    assert response.status_code == 404
    assert response.json() == {"error": "no account for user 'nobody'"}


def test_user_id_with_a_slash_and_spaces_is_reachable_percent_encoded(client):
    give_credits("team/a b", 10)
    response = client.get("/api/accounts/team%2Fa%20b", headers=AUTH)
    assert response.status_code == 200 and response.json()["user_id"] == "team/a b"
    response = client.post("/api/accounts/team%2Fa%20b/consume", json={"credits": 3, "reference": "r1"}, headers=AUTH)
    assert response.status_code == 200 and response.json()["balance"] == 7


# --- spending -----------------------------------------------------------------------------

def test_consume_spends_and_answers_the_new_balance(client):
    give_credits("alice", 100)
    response = consume(client, "alice", {"credits": 30, "reference": "job-1"})
    assert response.status_code == 200
    assert response.json() == {"user_id": "alice", "balance": 70, "spendable_balance": 70, "credits": 30,
                                "reference": "job-1"}
    assert response.headers["Idempotent-Replayed"] == "false"
    assert current_balance("alice") == 70


def test_same_reference_again_gives_the_identical_answer_and_spends_nothing(client):
    give_credits("alice", 100)
    first = consume(client, "alice", {"credits": 30, "reference": "job-1"})
    consume(client, "alice", {"credits": 10, "reference": "job-2"})
    again = consume(client, "alice", {"credits": 30, "reference": "job-1"})
    assert again.status_code == 200
    assert again.content == first.content
    assert again.headers["Idempotent-Replayed"] == "true"
    assert current_balance("alice") == 60


def test_replay_still_answers_after_the_account_was_flagged(client):
    give_credits("alice", 100)
    first = consume(client, "alice", {"credits": 30, "reference": "job-1"})
    open_dispute_on("alice")
    again = consume(client, "alice", {"credits": 30, "reference": "job-1"})
    assert again.status_code == 200 and again.content == first.content
    assert consume(client, "alice", {"credits": 1, "reference": "job-2"}).status_code == 402


def test_different_amount_under_a_used_reference_is_409(client):
    give_credits("alice", 100)
    consume(client, "alice", {"credits": 30, "reference": "job-1"})
    response = consume(client, "alice", {"credits": 31, "reference": "job-1"})
    assert response.status_code == 409
    assert "already used to spend 30 credits, not 31" in response.json()["error"]
    assert current_balance("alice") == 70


def test_insufficient_spendable_credits_is_402_and_spends_nothing(client):
    give_credits("alice", 20)
    response = consume(client, "alice", {"credits": 21, "reference": "job-1"})
    assert response.status_code == 402
    assert response.json() == {"error": "insufficient credits: 21 requested, 20 spendable"}
    assert current_balance("alice") == 20
    # the refused reference was not used up: it can spend once there is enough
    give_credits("alice", 5)
    assert consume(client, "alice", {"credits": 21, "reference": "job-1"}).json()["balance"] == 4


def test_flagged_account_is_402_with_the_reason(client):
    give_credits("alice", 100)
    open_dispute_on("alice")
    response = consume(client, "alice", {"credits": 1, "reference": "job-1"})
    assert response.status_code == 402
    assert response.json()["error"] == "account alice is flagged (open dispute); spending is paused"
    assert current_balance("alice") == 100
    assert client.get("/api/accounts/alice", headers=AUTH).json()["spendable_balance"] == 0


def test_consume_for_unknown_account_is_404_and_creates_nothing(client):
    response = consume(client, "nobody", {"credits": 1, "reference": "job-1"})
    assert response.status_code == 404
    assert response.json() == {"error": "no account for user 'nobody'"}
    assert client.get("/api/accounts/nobody", headers=AUTH).status_code == 404


BAD_BODIES = [
    (b"not json", "must be JSON"),
    (b"", "must be JSON"),
    (b"[" * 4000, "must be JSON"),  # nesting deep enough to exhaust the JSON parser's recursion
    (b"[1, 2]", "must be a JSON object"),
    (b'"text"', "must be a JSON object"),
    (b'{"reference": "r"}', "missing field(s): credits"),
    (b'{"credits": 1}', "missing field(s): reference"),
    (b'{"credits": 1, "reference": "r", "user_id": "bob"}', "unknown field(s): user_id"),
    (b'{"credits": true, "reference": "r"}', "credits must be a whole number, not true"),
    (b'{"credits": 1.5, "reference": "r"}', "credits must be a whole number, not 1.5"),
    (b'{"credits": "5", "reference": "r"}', 'credits must be a whole number, not "5"'),
    (b'{"credits": null, "reference": "r"}', "credits must be a whole number, not null"),
    (b'{"credits": 0, "reference": "r"}', "credits must be positive, not 0"),
    (b'{"credits": -3, "reference": "r"}', "credits must be positive, not -3"),
    (b'{"credits": 1000000001, "reference": "r"}', "credits must be at most 1000000000"),
    (b'{"credits": 1, "reference": ""}', "reference must not be empty"),
    (b'{"credits": 1, "reference": "   "}', "reference must not be empty"),
    (b'{"credits": 1, "reference": 7}', "reference must be a string"),
    (b'{"credits": 1, "reference": "' + b"x" * 201 + b'"}', "longer than 200 characters"),
    (b'{"credits": 1, "reference": "a\\nb"}', "control characters"),
]


@pytest.mark.parametrize("body, message", BAD_BODIES)
def test_bad_body_is_422_naming_the_problem(client, body, message):
    give_credits("alice", 100)
    response = client.post("/api/accounts/alice/consume", content=body, headers=AUTH)
    assert response.status_code == 422
    assert message in response.json()["error"]
    assert current_balance("alice") == 100


def test_reference_of_exactly_200_characters_is_accepted(client):
    give_credits("alice", 100)
    response = consume(client, "alice", {"credits": 1, "reference": "x" * 200})
    assert response.status_code == 200


def test_oversized_body_is_413(client):
    give_credits("alice", 100)
    body = b'{"credits": 1, "reference": "' + b"x" * 5000 + b'"}'
    response = client.post("/api/accounts/alice/consume", content=body, headers=AUTH)
    assert response.status_code == 413
    assert current_balance("alice") == 100


# --- authorization ------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": TOKEN},
    {"Authorization": "Bearer "},
])
def test_missing_or_wrong_token_is_401_on_both_endpoints(client, headers):
    give_credits("alice", 100)
    for response in (client.get("/api/accounts/alice", headers=headers),
                     consume(client, "alice", {"credits": 5, "reference": "job-1"}, headers=headers)):
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert "error" in response.json()
        assert TOKEN not in response.text
    assert current_balance("alice") == 100


def test_auth_is_checked_before_the_body_and_the_account(client):
    assert consume(client, "nobody", {"credits": "x"}, headers={}).status_code == 401


def test_without_a_configured_token_the_api_is_closed_with_503(database_url, monkeypatch):
    monkeypatch.delenv("BILLING_API_TOKEN", raising=False)
    reset_settings_cache()
    give_credits("alice", 100)
    with TestClient(Starlette(routes=credits_api.routes())) as test_client:
        for headers in ({}, AUTH, {"Authorization": "Bearer "}):
            for response in (test_client.get("/api/accounts/alice", headers=headers),
                             consume(test_client, "alice", {"credits": 5, "reference": "job-1"}, headers=headers)):
                assert response.status_code == 503
                assert "BILLING_API_TOKEN is not configured" in response.json()["error"]
    assert current_balance("alice") == 100


def test_token_is_read_per_request_so_rotation_takes_effect(client, monkeypatch):
    give_credits("alice", 100)
    monkeypatch.setenv("BILLING_API_TOKEN", "rotated_token_1234")
    reset_settings_cache()
    assert client.get("/api/accounts/alice", headers=AUTH).status_code == 401
    assert client.get("/api/accounts/alice", headers={"Authorization": "Bearer rotated_token_1234"}).status_code == 200


def test_database_unavailable_is_503(api_token, monkeypatch, tmp_path):
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/never-migrated.db")  # no tables: queries fail
    reset_settings_cache()
    with TestClient(Starlette(routes=credits_api.routes())) as test_client:
        response = test_client.get("/api/accounts/alice", headers=AUTH)
    db._engines.pop(f"sqlite:///{tmp_path}/never-migrated.db").dispose()
    assert response.status_code == 503
    assert response.json() == {"error": "the billing database is unavailable; retry later"}


# --- through the sidecar app --------------------------------------------------------------

def test_routes_are_served_by_the_sidecar_app(database_url, api_token):
    from billing_core import webapp

    give_credits("alice", 100)
    with TestClient(webapp.create_app()) as test_client:
        assert test_client.get("/api/accounts/alice", headers=AUTH).json()["balance"] == 100
        assert consume(test_client, "alice", {"credits": 40, "reference": "job-1"}).json()["balance"] == 60
        assert test_client.get("/api/accounts/alice", headers={}).status_code == 401


# --- concurrency through a real server ----------------------------------------------------

def test_parallel_consumes_never_overspend_and_never_lose_a_spend(database_url, api_token):
    initial = 500
    give_credits("alice", initial)
    rng = random.Random(7)
    amounts = [rng.randint(1, 40) for _ in range(60)]  # asks for far more than there is
    assert sum(amounts) > initial
    start = threading.Barrier(12)

    def spend(http: httpx.Client, number: int) -> tuple[int, int, dict]:
        if number < 12:
            start.wait()
        response = http.post("/api/accounts/alice/consume", json={"credits": amounts[number],
                                                                  "reference": f"job-{number}"})
        return number, response.status_code, response.json()

    with running_server(sidecar_app()) as base_url, \
            httpx.Client(base_url=base_url, headers=AUTH, timeout=60) as http, \
            ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(lambda n: spend(http, n), range(len(amounts))))

    assert {status for _, status, _ in results} <= {200, 402}
    succeeded = [number for number, status, _ in results if status == 200]
    refused = [number for number, status, _ in results if status == 402]
    assert succeeded and refused
    spent = sum(amounts[n] for n in succeeded)
    assert spent <= initial
    assert current_balance("alice") == initial - spent
    # a refusal was correct when it happened: what was left then (at least what is left now) was short
    for number in refused:
        assert amounts[number] > current_balance("alice")
    with db.read_session() as session:
        references = set(session.execute(select(Consumption.reference).where(Consumption.user_id == "alice")).scalars())
        spend_total = session.execute(select(func.sum(LedgerEntry.credits)).where(LedgerEntry.kind == "spend")).scalar()
    assert references == {f"job-{n}" for n in succeeded}
    assert spend_total == -spent
    # every answer's balance is a distinct step of one serial history
    balances_after = sorted((body["balance"] for _, status, body in results if status == 200), reverse=True)
    assert len(set(balances_after)) == len(balances_after)
    assert balances_after[-1] == initial - spent


def test_parallel_retries_of_one_reference_spend_once(database_url, api_token):
    give_credits("alice", 100)
    start = threading.Barrier(10)

    def spend(http: httpx.Client, _number: int):
        start.wait()
        response = http.post("/api/accounts/alice/consume", json={"credits": 15, "reference": "same-job"})
        return response.status_code, response.content

    with running_server(sidecar_app()) as base_url, \
            httpx.Client(base_url=base_url, headers=AUTH, timeout=60) as http, \
            ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(lambda n: spend(http, n), range(10)))

    assert {status for status, _ in results} == {200}
    assert len({content for _, content in results}) == 1
    assert current_balance("alice") == 85


def test_unexpected_error_is_a_json_500_without_details(client, monkeypatch):
    give_credits("alice", 100)

    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(ledger, "account_summary", broken)
    response = client.get("/api/accounts/alice", headers=AUTH)
    assert response.status_code == 500
    assert response.json() == {"error": "internal error in the credits API"}


def test_frozen_credits_of_a_past_due_subscription_are_not_spendable(client):
    import time

    from billing_core.models import Subscription

    period_end = int(time.time()) + 86400 * 20
    with db.write_session() as session:
        ledger.lock_account(session, user_id="alice")
        session.add(Subscription(id="sub_alice", user_id="alice", tier="starter", status="past_due",
                                 current_period_end=period_end))
        session.flush()
        ledger.grant_subscription_period(session, user_id="alice", subscription_id="sub_alice",
                                         period_end=period_end, tier="starter", source_key="invoice:in_alice")
    give_credits("alice", 10)
    account = client.get("/api/accounts/alice", headers=AUTH).json()
    assert (account["balance"], account["spendable_balance"], account["subscription_status"]) == (110, 10, "past_due")
    response = consume(client, "alice", {"credits": 11, "reference": "job-1"})
    assert response.status_code == 402
    assert response.json() == {"error": "insufficient credits: 11 requested, 10 spendable"}
    assert consume(client, "alice", {"credits": 10, "reference": "job-2"}).json()["balance"] == 100
