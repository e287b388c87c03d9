"""sync-catalog (lookup keys, second run creates nothing, drift replaced), --write-env, check-config --stripe."""
import os
import stat
import subprocess
import sys

import pytest
import stripe

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
    [configuration] = stripe_server.state.objects["portal_configurations"]
    assert f"customer portal configuration {configuration}: created" in first.stdout
    text = env_file.read_text()
    assert text.startswith(f"# keep me\nSTRIPE_SECRET_KEY={TEST_SECRET_KEY}\nSTRIPE_WEBHOOK_SECRET=whsec_abc123\n")
    written = load_settings({"BILLING_ENV_FILE": str(env_file)}).price_ids
    lookup = {p["lookup_key"]: p["id"] for p in stripe_server.state.objects["prices"].values()}
    assert written == {item.key: lookup[item.lookup_key] for item in CATALOG.values()}

    second = cli("sync-catalog")
    assert second.returncode == 0, second.stderr
    assert "0 price(s) created, 7 already in Stripe" in second.stdout
    assert f"customer portal configuration {configuration}: unchanged" in second.stdout
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

    stripe_server.state.objects["portal_configurations"][configuration]["features"]["subscription_cancel"][
        "mode"] = "immediately"
    check = cli("check-config", "--stripe")
    assert (f"ERROR: customer portal: configuration {configuration} cancels immediately, the catalog cancels at "
            "the period's end") in check.stdout


def test_sync_catalog_without_a_key_is_one_line():
    result = cli("sync-catalog")
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: Stripe is not configured")
    assert len(result.stderr.strip().splitlines()) == 1



# --- the customer portal configuration --------------------------------------------------------

from billing_core.catalog_sync import (PORTAL_METADATA, check_portal_against_stripe,  # noqa: E402
                                       find_portal_configuration, plan_prices_of, sync_portal_configuration)
from billing_core.stripe_client import get_stripe_client  # noqa: E402


def sync_everything():
    results = sync_catalog()
    return results, sync_portal_configuration(plan_prices_of(results))


def expected_portal_params(results):
    by_item = {r.item: r for r in results}
    return {
        "business_profile": {"headline": "DevOps Agent: change or cancel your plan"},
        "default_return_url": "http://localhost:5000",
        "features": {
            "subscription_update": {
                "enabled": "true", "default_allowed_updates": ["price"],
                "products": [{"product": f"devops_agent_{plan.key}", "prices": [by_item[plan.key].price_id]}
                             for plan in PLANS],
                "proration_behavior": "always_invoice",
                "schedule_at_period_end": {"conditions": [{"type": "decreasing_item_amount"}]},
            },
            "subscription_cancel": {"enabled": "true", "mode": "at_period_end"},
            "payment_method_update": {"enabled": "true"},
            "invoice_history": {"enabled": "true"},
        },
        "metadata": {"managed_by": "billing_core", "purpose": "plan_changes"},
    }


def test_sync_creates_the_portal_configuration_with_exactly_these_parameters(fake_stripe, stripe_state):
    results, portal = sync_everything()
    assert portal.action == "created"
    [request] = stripe_state.requests_to("POST", "/v1/billing_portal/configurations")
    assert request.params == expected_portal_params(results)
    assert request.idempotency_key.startswith("portal-configuration-")
    stored = stripe_state.objects["portal_configurations"][portal.configuration_id]
    assert stored["metadata"] == PORTAL_METADATA and stored["active"]
    assert check_portal_against_stripe(load_settings({"STRIPE_SECRET_KEY": TEST_SECRET_KEY, **{
        PRICE_SETTINGS[r.item]: r.price_id for r in results}})) == []


def test_a_second_sync_finds_the_configuration_by_its_metadata_and_changes_nothing(fake_stripe, stripe_state):
    stripe_state.add_portal_configuration(is_default=True)  # the account's own default is left alone
    stripe_state.add_portal_configuration(metadata={"managed_by": "someone_else"})
    _, first = sync_everything()
    before = len(posts(stripe_state))
    _, second = sync_everything()
    assert (second.configuration_id, second.action) == (first.configuration_id, "unchanged")
    assert len(posts(stripe_state)) == before
    assert len(stripe_state.objects["portal_configurations"]) == 3


def test_a_retried_create_is_answered_from_stripes_idempotency_record(fake_stripe, stripe_state):
    results = sync_catalog()
    plan_prices = plan_prices_of(results)
    client = get_stripe_client()
    first = sync_portal_configuration(plan_prices, client=client)
    key = stripe_state.requests_to("POST", "/v1/billing_portal/configurations")[0].idempotency_key
    stripe_state.objects["portal_configurations"].clear()  # as if the list had not shown it yet
    again = sync_portal_configuration(plan_prices, client=client)
    assert again.configuration_id == first.configuration_id
    assert [r.idempotency_key for r in stripe_state.requests_to("POST", "/v1/billing_portal/configurations")] == [key] * 2


def test_a_drifted_configuration_is_updated_in_place(fake_stripe, stripe_state):
    results, first = sync_everything()
    stored = stripe_state.objects["portal_configurations"][first.configuration_id]
    stored["features"]["subscription_update"]["proration_behavior"] = "create_prorations"
    stored["features"]["subscription_update"]["schedule_at_period_end"]["conditions"] = []
    stored["features"]["subscription_cancel"]["mode"] = "immediately"
    stored["active"] = False
    _, second = sync_everything()
    assert (second.configuration_id, second.action) == (first.configuration_id, "updated")
    assert second.drift == (
        "is inactive",
        "prorates plan changes with 'create_prorations', the catalog needs 'always_invoice' (upgrades invoiced at once)",
        "applies downgrades at once, the catalog schedules them for the period's end",
        "cancels immediately, the catalog cancels at the period's end")
    update = stripe_state.requests_to("POST", f"/v1/billing_portal/configurations/{first.configuration_id}")[-1]
    assert update.params == {**expected_portal_params(results), "active": "true"}
    assert update.idempotency_key.startswith(f"portal-configuration-{first.configuration_id}-")
    assert stored["features"]["subscription_update"]["proration_behavior"] == "always_invoice"
    assert stored["features"]["subscription_cancel"]["mode"] == "at_period_end" and stored["active"]
    assert sync_everything()[1].action == "unchanged"


def test_a_replaced_plan_price_moves_into_the_configuration(fake_stripe, stripe_state):
    _, first = sync_everything()
    old = next(p for p in stripe_state.objects["prices"].values() if p["lookup_key"] == "business_monthly")
    old["unit_amount"] = 12345
    results, second = sync_everything()
    new_price = next(r.price_id for r in results if r.item == "business")
    assert second.action == "updated" and new_price != old["id"]
    assert second.drift[0].startswith("offers ") and old["id"] in second.drift[0] and new_price in second.drift[0]
    stored = stripe_state.objects["portal_configurations"][first.configuration_id]
    offered = {p["product"]: p["prices"] for p in stored["features"]["subscription_update"]["products"]}
    assert offered["devops_agent_business"] == [new_price]


def test_the_double_refuses_what_stripe_refuses(fake_stripe, stripe_state):
    results = sync_catalog()
    client = get_stripe_client()
    pack = next(r for r in results if r.item == "pack_100")
    base = {"features": {"subscription_update": {"enabled": True, "default_allowed_updates": ["price"],
                                                 "products": [{"product": pack.product_id,
                                                               "prices": [pack.price_id]}]}}}
    with pytest.raises(stripe.InvalidRequestError, match="active recurring price"):
        client.v1.billing_portal.configurations.create(params=base)
    with pytest.raises(stripe.InvalidRequestError, match="unknown parameter: features\\[subscription_update\\]\\[mode\\]"):
        client.v1.billing_portal.configurations.create(
            params={"features": {"subscription_update": {"enabled": True, "mode": "x"}}})
    with pytest.raises(stripe.InvalidRequestError, match="not a valid proration behavior"):
        client.v1.billing_portal.configurations.create(
            params={"features": {"subscription_cancel": {"enabled": True, "proration_behavior": "always_invoice"}}})
    client.v1.billing_portal.configurations.create(params={"features": {"invoice_history": {"enabled": True}}},
                                                   options={"idempotency_key": "k1"})
    with pytest.raises(stripe.IdempotencyError):
        client.v1.billing_portal.configurations.create(params={"features": {"invoice_history": {"enabled": False}}},
                                                       options={"idempotency_key": "k1"})


def test_check_config_reports_portal_drift(fake_stripe, stripe_prices, stripe_state):
    settings = get_settings()
    [missing] = check_portal_against_stripe(settings)
    assert missing.setting == "customer portal" and "run: python -m billing_core sync-catalog" in missing.message
    products = {key: stripe_state.objects["prices"][price_id]["product"] for key, price_id in stripe_prices.items()}
    configuration = stripe_state.add_portal_configuration(metadata=dict(PORTAL_METADATA), features={
        "subscription_update": {"enabled": True, "default_allowed_updates": ["price"],
                                "products": [{"product": products[key], "prices": [stripe_prices[key]]}
                                             for key in ("starter", "business")],
                                "proration_behavior": "always_invoice"},
        "subscription_cancel": {"enabled": False}})
    problems = [p.message for p in check_portal_against_stripe(settings)]
    assert problems == [
        f"configuration {configuration['id']} offers " + "; ".join(
            f"{k} ({stripe_prices[k]})" for k in ("starter", "business"))
        + ", the catalog's plans are " + "; ".join(
            f"{k} ({stripe_prices[k]})" for k in ("starter", "professional", "business")),
        f"configuration {configuration['id']} applies downgrades at once, the catalog schedules them for the "
        "period's end",
        f"configuration {configuration['id']} does not let customers cancel",
    ]
    assert find_portal_configuration(get_stripe_client())["id"] == configuration["id"]
