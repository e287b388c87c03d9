"""Pytest fixtures around the Stripe double (tests/stripe_double.py); loaded by conftest's pytest_plugins.

* `stripe_state`: a fresh StripeState (the fake Stripe account).
* `fake_stripe`: STRIPE_SECRET_KEY set to TEST_SECRET_KEY and a FakeHTTPClient installed, so every
  `billing_core.stripe_client.get_stripe_client()` talks to `stripe_state` in-process. Returns the client
  (`fake_stripe.requests` / `fake_stripe.state`).
* `stripe_server`: a StripeServer on 127.0.0.1 sharing `stripe_state`, with STRIPE_SECRET_KEY and
  STRIPE_API_BASE set (also seen by subprocesses started with os.environ).
* `sidecar`: the webhook sidecar's app (`create_app()`) in a TestClient on `database_url`, with the webhook secret
  and the catalog's price ids configured (`stripe_events.configure_webhooks`).
* `stripe_prices`: the catalog's products and prices created in `stripe_state` (with lookup keys) and
  STRIPE_PRICE_* set to them; returns {item_key: price_id}. Combine with `fake_stripe` or `stripe_server`.
"""
from __future__ import annotations

import pytest

from starlette.testclient import TestClient

from billing_core import stripe_client
from billing_core.settings import PRICE_SETTINGS, reset_settings_cache
from billing_core.webapp import create_app
from stripe_double import FakeHTTPClient, StripeServer, StripeState
from stripe_events import configure_webhooks

TEST_SECRET_KEY = "sk_test_51DoubleKeyForTestsOnly0000a1b2"


@pytest.fixture
def stripe_state() -> StripeState:
    return StripeState()


@pytest.fixture
def fake_stripe(stripe_state, monkeypatch) -> FakeHTTPClient:
    monkeypatch.setenv("STRIPE_SECRET_KEY", TEST_SECRET_KEY)
    reset_settings_cache()
    client = FakeHTTPClient(stripe_state)
    monkeypatch.setattr(stripe_client, "_test_http_client", client)
    return client


@pytest.fixture
def stripe_server(stripe_state, monkeypatch):
    with StripeServer(stripe_state) as server:
        monkeypatch.setenv("STRIPE_SECRET_KEY", TEST_SECRET_KEY)
        monkeypatch.setenv("STRIPE_API_BASE", server.url)
        reset_settings_cache()
        yield server
    reset_settings_cache()


@pytest.fixture
def stripe_prices(stripe_state, monkeypatch) -> dict[str, str]:
    from billing_core.catalog import CATALOG

    price_ids = stripe_state.seed_catalog(CATALOG.values())
    for key, price_id in price_ids.items():
        monkeypatch.setenv(PRICE_SETTINGS[key], price_id)
    reset_settings_cache()
    return price_ids


@pytest.fixture
def sidecar(database_url, monkeypatch):
    configure_webhooks(monkeypatch)
    with TestClient(create_app()) as client:
        yield client
