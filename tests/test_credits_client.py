"""The DevOps Agent's client against a real uvicorn server running the credits API."""
from __future__ import annotations

import logging
import socket

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from billing_core import db, ledger
from billing_core.credits_client import (AccountNotFound, ApiUnavailable, CreditsClient, CreditsError,
                                         InsufficientCredits, InvalidRequest, ReferenceConflict, Unauthorized)
from billing_core.settings import reset_settings_cache
from live_server import free_port, running_server, sidecar_app

TOKEN = "client_test_token_5c1e"


@pytest.fixture
def base_url(database_url, monkeypatch):
    monkeypatch.setenv("BILLING_API_TOKEN", TOKEN)
    reset_settings_cache()
    with running_server(sidecar_app()) as url:
        yield url


@pytest.fixture
def credits(base_url):
    with CreditsClient(base_url, TOKEN, timeout=10) as client:
        yield client


def give_credits(user_id: str, credits: int) -> None:
    with db.write_session() as session:
        ledger.grant_pack(session, user_id=user_id, credits=credits, source_key=f"test-grant:{user_id}")


def test_balance_and_consume(credits):
    give_credits("agent-user", 100)
    assert credits.balance("agent-user")["spendable_balance"] == 100
    answer = credits.consume("agent-user", 25, reference="run-1/step-1")
    assert answer == {"user_id": "agent-user", "balance": 75, "spendable_balance": 75, "credits": 25,
                      "reference": "run-1/step-1"}
    assert credits.consume("agent-user", 25, reference="run-1/step-1") == answer
    assert credits.balance("agent-user")["balance"] == 75


def test_user_ids_are_url_encoded(credits):
    for user_id in ("org/team 1", "a?b#c", "ünï/..", "x/consume"):
        give_credits(user_id, 10)
        assert credits.balance(user_id)["user_id"] == user_id
        assert credits.consume(user_id, 4, reference="r")["balance"] == 6
    with pytest.raises(AccountNotFound):
        credits.balance("org")


def test_each_refusal_raises_its_exception(credits):
    give_credits("agent-user", 10)
    with pytest.raises(InsufficientCredits, match="11 requested, 10 spendable") as refused:
        credits.consume("agent-user", 11, reference="big")
    assert refused.value.status == 402
    with pytest.raises(AccountNotFound, match="no account for user 'ghost'") as missing:
        credits.consume("ghost", 1, reference="r")
    assert missing.value.status == 404
    with pytest.raises(AccountNotFound):
        credits.balance("ghost")
    credits.consume("agent-user", 2, reference="once")
    with pytest.raises(ReferenceConflict) as conflict:
        credits.consume("agent-user", 3, reference="once")
    assert conflict.value.status == 409
    for credits_value in (0, -1, True, 1.5, "2"):
        with pytest.raises(InvalidRequest) as invalid:
            credits.consume("agent-user", credits_value, reference="r2")
        assert invalid.value.status == 422
    with pytest.raises(InvalidRequest):
        credits.consume("agent-user", 1, reference="")
    with pytest.raises(InvalidRequest):
        credits.balance("")
    assert credits.balance("agent-user")["balance"] == 8


def test_flagged_account_raises_insufficient_credits(credits):
    give_credits("agent-user", 10)
    with db.write_session() as session:
        account = ledger.lock_account(session, user_id="agent-user")
        account.open_disputes = 1
        ledger.refresh_flag(session, account)
    with pytest.raises(InsufficientCredits, match="flagged"):
        credits.consume("agent-user", 1, reference="r")


def test_every_exception_is_a_credits_error():
    for error in (InsufficientCredits, AccountNotFound, ReferenceConflict, Unauthorized, ApiUnavailable,
                  InvalidRequest):
        assert issubclass(error, CreditsError)


def test_wrong_token_raises_unauthorized_without_showing_either_token(base_url, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "wrong_token_value_0000"
    with CreditsClient(base_url, wrong) as client:
        with pytest.raises(Unauthorized) as refused:
            client.balance("anyone")
        assert refused.value.status == 401
        assert wrong not in str(refused.value) and wrong not in repr(client)
    with CreditsClient(base_url, TOKEN) as client:
        give_credits("agent-user", 5)
        client.consume("agent-user", 1, reference="r")
        assert TOKEN not in repr(client)
    assert TOKEN not in caplog.text and wrong not in caplog.text


def test_closed_api_raises_api_unavailable(database_url):
    with running_server(sidecar_app()) as url, CreditsClient(url, TOKEN) as client:  # no BILLING_API_TOKEN set
        with pytest.raises(ApiUnavailable, match="BILLING_API_TOKEN is not configured") as closed:
            client.balance("anyone")
    assert closed.value.status == 503


def test_nothing_listening_raises_api_unavailable():
    with CreditsClient(f"http://127.0.0.1:{free_port()}", TOKEN, timeout=2) as client:
        with pytest.raises(ApiUnavailable, match="cannot reach the credits API") as failed:
            client.consume("agent-user", 1, reference="r")
    assert failed.value.status is None


def test_a_server_that_never_answers_raises_api_unavailable_after_the_timeout():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts connections, never answers
        port = silent.getsockname()[1]
        with CreditsClient(f"http://127.0.0.1:{port}", TOKEN, timeout=0.3) as client:
            with pytest.raises(ApiUnavailable, match=r"no answer within 0.3 s"):
                client.balance("agent-user")
            with pytest.raises(ApiUnavailable, match=r"no answer within 0.3 s"):
                client.consume("agent-user", 1, reference="r")


def test_unexpected_answers_raise_credits_error():
    app = Starlette(routes=[
        Route("/api/accounts/boom", lambda request: PlainTextResponse("Internal Server Error", status_code=500)),
        Route("/api/accounts/proxy", lambda request: PlainTextResponse("Bad Gateway", status_code=502)),
        Route("/api/accounts/list", lambda request: JSONResponse([1, 2])),
    ])
    with running_server(app) as url, CreditsClient(url, TOKEN) as client:
        with pytest.raises(CreditsError, match="HTTP 500") as boom:
            client.balance("boom")
        assert type(boom.value) is CreditsError and boom.value.status == 500
        with pytest.raises(ApiUnavailable, match="HTTP 502"):
            client.balance("proxy")
        with pytest.raises(CreditsError, match="HTTP 200"):
            client.balance("list")


def test_constructor_checks_its_arguments():
    with pytest.raises(ValueError, match="http"):
        CreditsClient("127.0.0.1:5000", TOKEN)
    with pytest.raises(ValueError, match="token"):
        CreditsClient("http://127.0.0.1:5000", "")
