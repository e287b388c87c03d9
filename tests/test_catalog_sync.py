"""sync-catalog (lookup keys, second run creates nothing, drift replaced), --write-env, check-config --stripe."""
import os
import stat
import subprocess
import sys

import pytest

from billing_core.catalog import CATALOG, PACKS, PLANS
from billing_core.catalog_sync import check_prices_against_stripe, sync_catalog, write_env_prices
from billing_core.settings import PRICE_SETTINGS, PROJECT_ROOT, get_settings, load_settings, reset_settings_cache
from billing_core.stripe_client import StripeActionError
from stripe_fixtures import TEST_SECRET_KEY


def posts(state):
    return [r for r in state.requests if r.method == "POST"]


def test_first_sync_creates_every_product_and_price_with_lookup_keys(fake_stripe, stripe_state):
    results = sync_catalog()
    assert [r.item for r in results] == list(CATALOG) and all(r.created for r in results)
    prices = stripe_state.objects["prices"]
    for row in results:
        item = CATALOG[row.item]
        price = prices[row.price_id]
        assert (price["lookup_key"], price["unit_amount"], price["currency"], price["active"]) == \
            (item.lookup_key, item.amount_cents, "usd", True)
        assert price["product"] == f"devops_agent_{item.key}"
        assert stripe_state.objects["products"][price["product"]]["metadata"]["item"] == item.key
    price_posts = stripe_state.requests_to("POST", "/v1/prices")
    starter = next(r.params for r in price_posts if r.params["lookup_key"] == "starter_monthly")
    assert starter == {"product": "devops_agent_starter", "unit_amount": "999", "currency": "usd",
                       "lookup_key": "starter_monthly", "recurring": {"interval": "month", "interval_count": "1"},
                       "metadata": {"item": "starter", "credits": "100"}, "nickname": "Starter"}
    pack = next(r.params for r in price_posts if r.params["lookup_key"] == "pack_100")
    assert "recurring" not in pack and pack["unit_amount"] == "1000"
    assert len(stripe_state.objects["products"]) == len(PLANS) + len(PACKS)


def test_second_sync_creates_nothing(fake_stripe, stripe_state):
    first = sync_catalog()
    before = len(posts(stripe_state))
    second = sync_catalog()
    assert [(r.item, r.price_id) for r in second] == [(r.item, r.price_id) for r in first]
    assert not any(r.created for r in second)
    assert len(posts(stripe_state)) == before  # only the lookup-key list was asked for


def test_a_drifted_price_is_replaced_and_takes_over_the_lookup_key(fake_stripe, stripe_state):
    sync_catalog()
    old = next(p for p in stripe_state.objects["prices"].values() if p["lookup_key"] == "pack_100")
    old["unit_amount"] = 1500
    results = {r.item: r for r in sync_catalog()}
    replaced = results["pack_100"]
    assert replaced.created and replaced.price_id != old["id"]
    assert f"replaces {old['id']}, which costs 1500 (minor units), the catalog says 1000" == replaced.note
    assert old["lookup_key"] is None
    assert stripe_state.objects["prices"][replaced.price_id]["lookup_key"] == "pack_100"
    assert stripe_state.requests_to("POST", "/v1/prices")[-1].params["transfer_lookup_key"] == "true"
    assert [key for key, r in results.items() if r.created] == ["pack_100"]


def test_sync_reuses_a_product_left_from_an_interrupted_run(fake_stripe, stripe_state):
    stripe_state.add_product(id="devops_agent_pack_100", name="DevOps Agent 100 credits")
    sync_catalog()
    assert len(stripe_state.requests_to("POST", "/v1/products")) == len(CATALOG) - 1


def test_sync_errors_are_one_line(fake_stripe, stripe_state):
    stripe_state.fail_next(status=429)
    with pytest.raises(StripeActionError, match="syncing the catalog with Stripe failed: Stripe rate limit"):
        sync_catalog()


def test_write_env_keeps_every_other_line(tmp_path):
    path = tmp_path / ".env"
    path.write_text("# my settings\nSTRIPE_SECRET_KEY=sk_test_abc\n\nSTRIPE_PRICE_STARTER=price_old  # old\n"
                    "export STRIPE_PRICE_PACK_100=price_older\nBASE_URL=https://example.com\nNO_NEWLINE=1")
    path.chmod(0o600)
    write_env_prices(path, {"starter": "price_new1", "pack_100": "price_new2", "business": "price_new3"})
    assert path.read_text() == ("# my settings\nSTRIPE_SECRET_KEY=sk_test_abc\n\nSTRIPE_PRICE_STARTER=price_new1\n"
                                "STRIPE_PRICE_PACK_100=price_new2\nBASE_URL=https://example.com\nNO_NEWLINE=1\n"
                                "STRIPE_PRICE_BUSINESS=price_new3\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [".env"]  # no temp file left behind
    values = load_settings({"BILLING_ENV_FILE": str(path)}).price_ids
    assert (values["starter"], values["pack_100"], values["business"]) == ("price_new1", "price_new2", "price_new3")


def test_write_env_creates_a_missing_file(tmp_path):
    path = tmp_path / "config" / ".env"
    write_env_prices(path, {"pack_250": "price_x"})
    assert path.read_text() == "STRIPE_PRICE_PACK_250=price_x\n"


# --- check-config --stripe ------------------------------------------------------------------

def test_matching_prices_have_no_problems(fake_stripe, stripe_prices):
    assert check_prices_against_stripe(get_settings()) == []


def test_drift_is_reported_by_item(fake_stripe, stripe_prices, stripe_state, monkeypatch):
    prices = stripe_state.objects["prices"]
    prices[stripe_prices["starter"]]["unit_amount"] = 1099
    prices[stripe_prices["professional"]]["recurring"]["interval"] = "year"
    prices[stripe_prices["business"]].update(type="one_time", recurring=None)
    prices[stripe_prices["pack_100"]].update(active=False)
    prices[stripe_prices["pack_250"]].update(currency="eur")
    prices[stripe_prices["pack_500"]].update(livemode=True)
    monkeypatch.setenv("STRIPE_PRICE_PACK_1000", "price_missing")
    reset_settings_cache()
    problems = {p.setting: p.message for p in check_prices_against_stripe(get_settings())}
    assert problems == {
        "STRIPE_PRICE_STARTER": f"starter: price {stripe_prices['starter']} costs 1099 (minor units), "
                                "the catalog says 999",
        "STRIPE_PRICE_PROFESSIONAL": f"professional: price {stripe_prices['professional']} recurs every 1 year(s), "
                                     "the catalog says monthly",
        "STRIPE_PRICE_BUSINESS": f"business: price {stripe_prices['business']} is a one-time price, the catalog "
                                 "says monthly recurring",
        "STRIPE_PRICE_PACK_100": f"pack_100: price {stripe_prices['pack_100']} is archived (inactive)",
        "STRIPE_PRICE_PACK_250": f"pack_250: price {stripe_prices['pack_250']} is in eur, the catalog says usd",
        "STRIPE_PRICE_PACK_500": f"pack_500: price {stripe_prices['pack_500']} is a live-mode price but "
                                 "STRIPE_SECRET_KEY is a test-mode key",
        "STRIPE_PRICE_PACK_1000": "pack_1000: price price_missing does not exist in this Stripe account (test mode)",
    }


def test_auth_failure_is_reported_once(fake_stripe, stripe_prices, stripe_state):
    stripe_state.api_key = "sk_test_otherAccount000000000000"
    [problem] = check_prices_against_stripe(get_settings())
    assert problem.setting == "STRIPE_SECRET_KEY" and "Stripe authentication failed" in problem.message
    assert TEST_SECRET_KEY not in problem.message


def test_no_key_is_one_problem():
    [problem] = check_prices_against_stripe(get_settings())
    assert problem.level == "error" and "Stripe is not configured" in problem.message


# --- the commands, as a subprocess against the Stripe-compatible server --------------------

def cli(*args):
    return subprocess.run([sys.executable, "-m", "billing_core", *args], capture_output=True, text=True,
                          env=dict(os.environ), cwd=PROJECT_ROOT, timeout=120)


def test_sync_catalog_write_env_then_check_config(stripe_server, tmp_path, monkeypatch):
    env_file = tmp_path / ".env"
    env_file.write_text(f"# keep me\nSTRIPE_SECRET_KEY={TEST_SECRET_KEY}\nSTRIPE_WEBHOOK_SECRET=whsec_abc123\n")
    monkeypatch.setenv("BILLING_ENV_FILE", str(env_file))
    monkeypatch.delenv("STRIPE_SECRET_KEY")  # read from the file, like an operator's setup

    first = cli("sync-catalog", "--write-env")
    assert first.returncode == 0, first.stderr
    assert "7 price(s) created, 0 already in Stripe (test mode)" in first.stdout
    text = env_file.read_text()
    assert text.startswith(f"# keep me\nSTRIPE_SECRET_KEY={TEST_SECRET_KEY}\nSTRIPE_WEBHOOK_SECRET=whsec_abc123\n")
    written = load_settings({"BILLING_ENV_FILE": str(env_file)}).price_ids
    lookup = {p["lookup_key"]: p["id"] for p in stripe_server.state.objects["prices"].values()}
    assert written == {item.key: lookup[item.lookup_key] for item in CATALOG.values()}

    second = cli("sync-catalog")
    assert second.returncode == 0, second.stderr
    assert "0 price(s) created, 7 already in Stripe" in second.stdout
    assert f"STRIPE_PRICE_PACK_100={written['pack_100']}" in second.stdout
    assert env_file.read_text() == text

    check = cli("check-config", "--stripe")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "0 error(s)" in check.stdout

    stripe_server.state.objects["prices"][written["pack_500"]]["unit_amount"] = 3000
    check = cli("check-config", "--stripe")
    assert check.returncode == 1
    assert (f"ERROR: STRIPE_PRICE_PACK_500: pack_500: price {written['pack_500']} costs 3000 (minor units), "
            "the catalog says 3500") in check.stdout
    assert TEST_SECRET_KEY not in check.stdout + check.stderr


def test_sync_catalog_without_a_key_is_one_line():
    result = cli("sync-catalog")
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: Stripe is not configured")
    assert len(result.stderr.strip().splitlines()) == 1

