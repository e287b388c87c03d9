"""Deploying past one process: the worker and pool settings, the SQLite refusal, a pool that fails fast
(500 to Stripe, 503 + Retry-After on the credits API, /healthz says busy), and `check-config --database`."""
from __future__ import annotations

import time
from contextlib import contextmanager

import pytest
from starlette.testclient import TestClient

from billing_core import cli, db
from billing_core.connection_budget import Budget, ServerLimits, budget_problems
from billing_core.settings import check_config, load_settings, reset_settings_cache
from billing_core.webapp import create_app
from stripe_events import checkout_completed, configure_webhooks, deliver

API_TOKEN = "deploy-test-token-0000000000"


def settings_with(**values):
    return load_settings({"BILLING_ENV_FILE": "/nonexistent/deploy.env", **values})


# --- settings ------------------------------------------------------------------------------------

def test_worker_and_pool_settings_have_per_process_defaults():
    settings = settings_with()
    assert (settings.webhook_workers, settings.db_pool_size, settings.db_max_overflow) == (1, 5, 5)
    assert settings.db_pool_timeout == 3.0 and settings.connections_per_process == 10


def test_worker_and_pool_settings_are_read_and_bad_values_named():
    settings = settings_with(WEBHOOK_WORKERS="4", DB_POOL_SIZE="3", DB_MAX_OVERFLOW="0", DB_POOL_TIMEOUT="0.5",
                             DATABASE_URL="postgresql://db.internal/billing")
    assert (settings.webhook_workers, settings.db_pool_size, settings.db_max_overflow) == (4, 3, 0)
    assert settings.db_pool_timeout == 0.5
    bad = settings_with(WEBHOOK_WORKERS="0", DB_POOL_SIZE="many", DB_POOL_TIMEOUT="600")
    messages = [str(p) for p in check_config(bad)]
    assert any("WEBHOOK_WORKERS: must be between 1 and 64, not 0" in m for m in messages)
    assert any("DB_POOL_SIZE: must be a whole number, not 'many'" in m for m in messages)
    assert any("DB_POOL_TIMEOUT: must be between 0.05 and 60 seconds, not 600" in m for m in messages)


def test_several_workers_on_sqlite_are_a_configuration_error():
    problems = check_config(settings_with(WEBHOOK_WORKERS="2", DATABASE_URL="sqlite:////tmp/x.db"))
    assert [p.setting for p in problems if p.level == "error"] == ["WEBHOOK_WORKERS"]
    assert not [p for p in check_config(settings_with(WEBHOOK_WORKERS="2", DATABASE_URL="postgresql://h/db"))
                if p.setting == "WEBHOOK_WORKERS"]


def test_serve_webhooks_refuses_several_workers_on_sqlite(sqlite_url, monkeypatch, capsys):
    assert cli.main(["serve-webhooks", "--port", "5999", "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert "--workers 2 needs PostgreSQL" in err and "one writer at a time" in err
    assert cli.main(["serve-webhooks", "--port", "5999", "--workers", "0"]) == 1
    assert "--workers must be between 1 and 64, not 0" in capsys.readouterr().err
    monkeypatch.setenv("WEBHOOK_WORKERS", "3")
    reset_settings_cache()
    assert cli.main(["serve-webhooks", "--port", "5999"]) == 1
    assert "--workers 3 needs PostgreSQL" in capsys.readouterr().err


def test_the_engine_uses_the_pool_settings(database_url, monkeypatch):
    monkeypatch.setenv("DB_POOL_SIZE", "2")
    monkeypatch.setenv("DB_MAX_OVERFLOW", "1")
    reset_settings_cache()
    engine = db.make_engine(database_url)
    try:
        status = db.pool_status(engine)
        if database_url.startswith("postgresql"):
            assert (status["size"], status["max_overflow"], status["limit"]) == (2, 1, 3)
        else:  # a local file counts against no server's limit
            assert status["limit"] == 60
    finally:
        engine.dispose()


def test_healthz_counts_the_events_a_person_should_look_at(database_url, monkeypatch):
    configure_webhooks(monkeypatch)
    with TestClient(create_app()) as client:
        assert client.get("/healthz").json()["events"] == {"failed": 0, "needs_attention": 0}
        unknown_user = checkout_completed(user_id="u1", item="pack_100")
        unknown_user["data"]["object"]["metadata"] = {}
        unknown_user["data"]["object"]["client_reference_id"] = None
        assert deliver(client, unknown_user).json()["status"] == "needs_attention"
        assert client.get("/healthz").json()["events"] == {"failed": 0, "needs_attention": 1}


# --- an exhausted pool fails fast -----------------------------------------------------------------

@contextmanager
def tiny_pool(url: str, monkeypatch):
    """The process's engine for `url` replaced by one with a single connection and a 0.3 s wait."""
    monkeypatch.setenv("DB_POOL_SIZE", "1")
    monkeypatch.setenv("DB_MAX_OVERFLOW", "0")
    monkeypatch.setenv("DB_POOL_TIMEOUT", "0.3")
    monkeypatch.setenv("BILLING_API_TOKEN", API_TOKEN)
    reset_settings_cache()
    old = db._engines.pop(url, None)
    try:
        yield db.get_engine(url)
    finally:
        db._engines.pop(url).dispose()
        if old is not None:
            db._engines[url] = old


def test_an_exhausted_pool_answers_quickly_503_on_the_api_and_500_to_stripe(database_url, monkeypatch):
    if not database_url.startswith("postgresql"):
        pytest.skip("the pool limits apply to PostgreSQL connections")
    configure_webhooks(monkeypatch)
    with tiny_pool(database_url, monkeypatch) as engine, TestClient(create_app()) as client:
        health = client.get("/healthz")
        assert health.status_code == 200 and health.json()["pool"]["limit"] == 1
        held = engine.connect()  # the only connection
        try:
            started = time.monotonic()
            api = client.get("/api/accounts/u1", headers={"Authorization": f"Bearer {API_TOKEN}"})
            webhook = deliver(client, checkout_completed(user_id="u1", item="pack_100"))
            health = client.get("/healthz")
            elapsed = time.monotonic() - started
        finally:
            held.close()
        assert api.status_code == 503 and api.headers["retry-after"] == "1"
        assert api.json() == {"error": "the billing database is busy; retry shortly"}
        assert webhook.status_code == 500
        assert health.status_code == 503 and health.json()["database"] == "busy"
        assert health.json()["pool"] == {"in_use": 1, "idle": 0, "limit": 1, "size": 1, "max_overflow": 0}
        assert elapsed < 20  # each waited DB_POOL_TIMEOUT (0.3 s), not SQLAlchemy's 30 s
        # with the connection back, the redelivery is stored and applied
        assert deliver(client, checkout_completed(user_id="u2", item="pack_100")).status_code == 200


def test_pool_exhausted_names_the_settings(database_url, monkeypatch):
    if not database_url.startswith("postgresql"):
        pytest.skip("the pool limits apply to PostgreSQL connections")
    with tiny_pool(database_url, monkeypatch) as engine:
        with engine.connect():
            with pytest.raises(db.PoolExhausted, match=r"all 1 database connections .*DB_POOL_SIZE 1 \+ "
                                                        r"DB_MAX_OVERFLOW 0.* within 0.3 s \(DB_POOL_TIMEOUT\)"):
                engine.connect()


# --- check-config --database -------------------------------------------------------------------

LIMITS = ServerLimits(version="15.2", max_connections=100, reserved=3, open_now=4)


def budget(processes: int, workers: int, dashboards: int = 1, pool: int = 5, overflow: int = 5) -> Budget:
    return Budget(processes=processes, workers=workers, dashboards=dashboards, per_pool=pool + overflow,
                  pool_size=pool, max_overflow=overflow)


def test_the_budget_multiplies_processes_workers_and_pools():
    assert budget(3, 2, dashboards=2).total == (3 * 2 + 2) * 10
    assert budget_problems(budget(2, 2), LIMITS) == []  # 50 of 97


def test_a_budget_over_the_servers_limit_warns_with_the_numbers():
    [problem] = budget_problems(budget(3, 4), LIMITS)  # (12 + 1) × 10 = 130 > 97
    text = str(problem)
    assert problem.level == "warning"
    assert "3 sidecar process(es) × 4 worker(s) + 1 dashboard(s)" in text and "= 130 connections" in text
    assert "the server allows 97 (max_connections 100 − 3 reserved" in text


def test_a_budget_that_leaves_no_room_for_cli_runs_warns():
    [problem] = budget_problems(budget(1, 8, dashboards=1, pool=5, overflow=0), ServerLimits("15", 50, 3, 0))
    assert "leaves 2, fewer than 5 for CLI runs" in str(problem)  # 45 of 47


def test_check_config_database_reports_the_server_and_the_budget(database_url, monkeypatch, capsys):
    monkeypatch.setenv("STRIPE_SECRET_KEY", "sk_test_" + "d" * 24)
    reset_settings_cache()
    assert cli.main(["check-config", "--database", "--processes", "2", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    if database_url.startswith("postgresql"):
        assert "database: PostgreSQL" in out and "max_connections" in out
        assert "2 sidecar process(es) × 2 worker(s) + 1 dashboard(s)" in out and "= 50 connections at most" in out
    else:
        assert "database: SQLite" in out and "no connection budget" in out
    assert "schema" not in out  # the test database is migrated


def test_check_config_database_never_creates_a_missing_sqlite_file(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "not-yet.db"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{missing}")
    reset_settings_cache()
    assert cli.main(["check-config", "--database"]) == 0
    assert "no such database file yet" in capsys.readouterr().out and not missing.exists()


def test_check_config_database_names_an_unreachable_server(monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", "postgresql://billing:s3cretpw@127.0.0.1:1/billing")
    reset_settings_cache()
    assert cli.main(["check-config", "--database"]) == 1
    out = capsys.readouterr().out
    assert "ERROR: DATABASE_URL: could not connect to postgresql://billing:***@127.0.0.1:1/billing" in out
    assert "s3cretpw" not in out
