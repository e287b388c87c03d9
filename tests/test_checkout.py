"""Checkout links and portal links: the exact Stripe parameters, idempotency, refusals, Stripe errors, the CLI."""
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from billing_core import db
from billing_core.catalog import UnknownItem, UnknownPrice
from billing_core.checkout import (CLOCK_SKEW_MARGIN_SECONDS, IDEMPOTENCY_WINDOW_SECONDS, CheckoutRefused, create_checkout_link,
                                   create_portal_link, mark_link_status)
from billing_core.models import Account, CheckoutLink, Subscription
from billing_core.settings import PROJECT_ROOT, reset_settings_cache
from billing_core.stripe_client import StripeActionError, StripeNotConfigured
from stripe_fixtures import TEST_SECRET_KEY
from wiring import wiring

# The start of an idempotency window, so `NOW + a few minutes` stays in the same window.
NOW = datetime.fromtimestamp(1_900_000_000 // IDEMPOTENCY_WINDOW_SECONDS * IDEMPOTENCY_WINDOW_SECONDS, timezone.utc)
KEY_BODY = TEST_SECRET_KEY[len("sk_test_"):-4]


@pytest.fixture
def stripe_ready(database_url, fake_stripe, stripe_prices, stripe_state):
    stripe_state.now = lambda: NOW.timestamp()
    return stripe_state


def link_at(state, moment, **kwargs):
    """Create a link at `moment`, with Stripe's clock showing the same time."""
    state.now = lambda: moment.timestamp()
    return create_checkout_link(**wiring(), now=moment, **kwargs)


def session_posts(state):
    return state.requests_to("POST", "/v1/checkout/sessions")


def links(database_url):
    with db.read_session(db.get_engine(database_url)) as session:
        return list(session.execute(select(CheckoutLink).order_by(CheckoutLink.id)).scalars())


def account(database_url, user_id):
    with db.read_session(db.get_engine(database_url)) as session:
        return session.get(Account, user_id)


def add_subscription(database_url, user_id, status, tier="starter"):
    with db.write_session(db.get_engine(database_url)) as session:
        session.add(Account(user_id=user_id))
        session.flush()
        session.add(Subscription(id=f"sub_{user_id}", user_id=user_id, tier=tier, status=status))


def test_plan_link_sends_exactly_these_parameters(stripe_ready, stripe_prices, database_url):
    link = create_checkout_link(**wiring(), user_id="agent-1", item="starter", email="ops@example.com", operator="alice",
                                now=NOW)
    [request] = session_posts(stripe_ready)
    expires_at = int(NOW.timestamp()) + 24 * 3600 - CLOCK_SKEW_MARGIN_SECONDS
    assert request.params == {
        "mode": "subscription",
        "line_items": [{"price": stripe_prices["starter"], "quantity": "1"}],
        "client_reference_id": "agent-1",
        "metadata": {"user_id": "agent-1", "item": "starter", "credits": "100"},
        "subscription_data": {"metadata": {"user_id": "agent-1", "item": "starter"}},
        "customer_email": "ops@example.com",
        "success_url": "http://localhost:5000/checkout/success?session_id={CHECKOUT_SESSION_ID}",
        "cancel_url": "http://localhost:5000/checkout/cancel",
        "expires_at": str(expires_at),
    }
    assert request.idempotency_key.startswith("checkout-link-")
    session = stripe_ready.objects["checkout_sessions"][link.session_id]
    assert link.url == session["url"] and link.expires_at == datetime.fromtimestamp(expires_at, timezone.utc)
    assert link.as_dict() == {"url": link.url, "session_id": link.session_id, "item": "starter",
                              "user_id": "agent-1", "expires_at": link.expires_at.isoformat()}
    [recorded] = links(database_url)
    assert (recorded.session_id, recorded.user_id, recorded.item, recorded.operator, recorded.status,
            recorded.url) == (link.session_id, "agent-1", "starter", "alice", "open", link.url)
    assert recorded.idempotency_key == request.idempotency_key
    assert account(database_url, "agent-1").email == "ops@example.com"


def test_pack_link_for_a_new_customer_creates_one(stripe_ready, stripe_prices, database_url):
    create_checkout_link(**wiring(), user_id="agent-2", item="pack_250", now=NOW)
    [request] = session_posts(stripe_ready)
    params = request.params
    assert params["mode"] == "payment"
    assert params["line_items"] == [{"price": stripe_prices["pack_250"], "quantity": "1"}]
    assert params["metadata"] == {"user_id": "agent-2", "item": "pack_250", "credits": "250"}
    assert params["payment_intent_data"] == {"metadata": {"user_id": "agent-2", "item": "pack_250"}}
    assert params["customer_creation"] == "always"
    assert "customer" not in params and "customer_email" not in params and "subscription_data" not in params


def test_known_customer_is_used_instead_of_the_email(stripe_ready, database_url):
    customer = stripe_ready.add_customer(email="old@example.com")
    with db.write_session() as session:
        session.add(Account(user_id="agent-3", email="old@example.com", stripe_customer_id=customer["id"]))
    create_checkout_link(**wiring(), user_id="agent-3", item="pack_100", email="new@example.com", now=NOW)
    params = session_posts(stripe_ready)[0].params
    assert params["customer"] == customer["id"]
    assert "customer_email" not in params and "customer_creation" not in params


def test_stored_email_is_used_when_none_is_given(stripe_ready, database_url):
    with db.write_session() as session:
        session.add(Account(user_id="agent-4", email="stored@example.com"))
    create_checkout_link(**wiring(), user_id="agent-4", item="business", now=NOW)
    assert session_posts(stripe_ready)[0].params["customer_email"] == "stored@example.com"


def test_double_click_returns_the_same_link_and_makes_one_session(stripe_ready, database_url):
    first = create_checkout_link(**wiring(), user_id="agent-5", item="professional", now=NOW)
    second = link_at(stripe_ready, NOW + timedelta(minutes=3), user_id="agent-5", item="professional")
    assert (second.session_id, second.url, second.reused) == (first.session_id, first.url, True)
    assert len(session_posts(stripe_ready)) == 1
    assert len(stripe_ready.objects["checkout_sessions"]) == 1 and len(links(database_url)) == 1


def test_retry_within_the_window_sends_identical_parameters(stripe_ready, database_url):
    """When the link wasn't recorded (a crash after Stripe answered), the retry reuses the key and
    Stripe (strict about differing parameters) hands back the same session."""
    first = create_checkout_link(**wiring(), user_id="agent-6", item="pack_500", now=NOW)
    with db.write_session() as session:
        session.delete(session.execute(select(CheckoutLink)).scalars().one())
    second = link_at(stripe_ready, NOW + timedelta(minutes=7), user_id="agent-6", item="pack_500")
    one, two = session_posts(stripe_ready)
    assert one.idempotency_key == two.idempotency_key and one.params == two.params
    assert second.session_id == first.session_id and not second.reused
    assert len(stripe_ready.objects["checkout_sessions"]) == 1 and len(links(database_url)) == 1


def test_a_new_window_or_another_item_gets_a_new_link(stripe_ready, database_url):
    first = create_checkout_link(**wiring(), user_id="agent-7", item="pack_100", now=NOW)
    later = link_at(stripe_ready, NOW + timedelta(seconds=IDEMPOTENCY_WINDOW_SECONDS), user_id="agent-7",
                    item="pack_100")
    other = create_checkout_link(**wiring(), user_id="agent-7", item="pack_250", now=NOW)
    assert len({first.session_id, later.session_id, other.session_id}) == 3
    assert len(links(database_url)) == 3


def test_double_click_across_a_window_boundary_returns_the_same_link(stripe_ready, database_url):
    late = NOW + timedelta(seconds=IDEMPOTENCY_WINDOW_SECONDS - 5)
    first = link_at(stripe_ready, late, user_id="agent-31", item="pack_100")
    second = link_at(stripe_ready, late + timedelta(seconds=10), user_id="agent-31", item="pack_100")
    assert (second.session_id, second.url, second.reused) == (first.session_id, first.url, True)
    assert len(session_posts(stripe_ready)) == 1 and len(links(database_url)) == 1
    # another payer, or a link issued more than a window ago, is not reused
    other = link_at(stripe_ready, late + timedelta(seconds=10), user_id="agent-31", item="pack_100",
                    email="someone@example.com")
    much_later = link_at(stripe_ready, late + timedelta(seconds=IDEMPOTENCY_WINDOW_SECONDS + 10),
                         user_id="agent-31", item="pack_100")
    assert len({first.session_id, other.session_id, much_later.session_id}) == 3


def test_a_link_from_the_previous_window_about_to_expire_is_not_reused(stripe_ready, database_url, monkeypatch):
    monkeypatch.setenv("CHECKOUT_LINK_EXPIRY_HOURS", "1")
    reset_settings_cache()
    late = NOW + timedelta(seconds=IDEMPOTENCY_WINDOW_SECONDS - 5)
    first = link_at(stripe_ready, late, user_id="agent-32", item="pack_100")
    with db.write_session() as session:  # pretend it runs out in 20 minutes
        session.execute(select(CheckoutLink)).scalars().one().expires_at = late + timedelta(minutes=20)
    second = link_at(stripe_ready, late + timedelta(seconds=10), user_id="agent-32", item="pack_100")
    assert second.session_id != first.session_id and not second.reused


def test_expiry_setting_is_sent(stripe_ready, database_url, monkeypatch):
    monkeypatch.setenv("CHECKOUT_LINK_EXPIRY_HOURS", "2")
    reset_settings_cache()
    link = create_checkout_link(**wiring(), user_id="agent-8", item="pack_100", now=NOW)
    expected = NOW + timedelta(hours=2) - timedelta(seconds=CLOCK_SKEW_MARGIN_SECONDS)
    assert session_posts(stripe_ready)[0].params["expires_at"] == str(int(expected.timestamp()))
    assert link.expires_at == expected


def test_expiry_stays_within_stripes_limits_at_the_end_of_a_window(stripe_ready, database_url, monkeypatch):
    monkeypatch.setenv("CHECKOUT_LINK_EXPIRY_HOURS", "1")
    reset_settings_cache()
    late = NOW + timedelta(seconds=IDEMPOTENCY_WINDOW_SECONDS - 1)
    link = link_at(stripe_ready, late, user_id="agent-8", item="pack_100")
    assert link.expires_at - late >= timedelta(minutes=30)


def test_simultaneous_clicks_make_one_session_and_one_record(stripe_ready, database_url):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: create_checkout_link(**wiring(), user_id="agent-30", item="starter", now=NOW),
                                range(4)))
    assert len({r.session_id for r in results}) == 1
    assert len(stripe_ready.objects["checkout_sessions"]) == 1 and len(links(database_url)) == 1


def test_unknown_item_is_refused_before_stripe(stripe_ready, database_url):
    with pytest.raises(UnknownItem, match="unknown item 'gold'; choose one of: starter"):
        create_checkout_link(**wiring(), user_id="agent-9", item="gold", now=NOW)
    assert stripe_ready.requests == [] and links(database_url) == []


def test_no_price_configured_is_refused(stripe_ready, database_url, monkeypatch):
    monkeypatch.delenv("STRIPE_PRICE_PACK_1000")
    reset_settings_cache()
    with pytest.raises(UnknownPrice, match="no price configured for pack_1000: set STRIPE_PRICE_PACK_1000"):
        create_checkout_link(**wiring(), user_id="agent-9", item="pack_1000", now=NOW)
    assert stripe_ready.requests == []


def test_stripe_not_configured_is_refused(database_url):
    with pytest.raises(StripeNotConfigured, match="Stripe is not configured"):
        create_checkout_link(**wiring(), user_id="agent-9", item="pack_100", now=NOW)
    assert links(database_url) == []


def test_bad_email_is_refused(stripe_ready, database_url):
    with pytest.raises(CheckoutRefused, match="'not-an-email' is not an email address"):
        create_checkout_link(**wiring(), user_id="agent-9", item="pack_100", email="not-an-email", now=NOW)


@pytest.mark.parametrize("status", ["active", "trialing", "past_due"])
def test_plan_link_is_refused_with_a_live_subscription(stripe_ready, database_url, status):
    add_subscription(database_url, "agent-10", status)
    with pytest.raises(CheckoutRefused) as caught:
        create_checkout_link(**wiring(), user_id="agent-10", item="business", now=NOW)
    assert f"agent-10 already has a subscription (starter, {status}, sub_agent-10)" in str(caught.value)
    assert "python -m billing_core portal-link agent-10" in str(caught.value)
    assert session_posts(stripe_ready) == []


def test_pack_link_and_new_plan_after_cancellation_are_allowed(stripe_ready, database_url):
    add_subscription(database_url, "agent-11", "canceled")
    create_checkout_link(**wiring(), user_id="agent-11", item="starter", now=NOW)
    create_checkout_link(**wiring(), user_id="agent-11", item="pack_100", now=NOW)
    assert len(session_posts(stripe_ready)) == 2


@pytest.mark.parametrize("break_it, cause, words", [
    (lambda s: setattr(s, "api_key", "sk_test_anotherAccountKey00009999"), "authentication",
     "Stripe authentication failed"),
    (lambda s: s.fail_next(status=429), "rate_limited", "rate limit"),
    (lambda s: s.fail_next(connection_error=True, times=3), "unreachable", "Stripe is unreachable"),
    (lambda s: s.objects["prices"].clear(), "invalid_price", "invalid price"),
    (lambda s: [p.update(active=False) for p in s.objects["prices"].values()], "invalid_price", "inactive price"),
])
def test_stripe_errors_become_one_clear_line_and_record_nothing(stripe_ready, database_url, break_it, cause,
                                                                 words):
    break_it(stripe_ready)
    with pytest.raises(StripeActionError) as caught:
        create_checkout_link(**wiring(), user_id="agent-12", item="pack_100", now=NOW)
    message = str(caught.value)
    assert caught.value.cause == cause and words in message
    assert message.startswith("creating the checkout link for agent-12 (pack_100) failed: ")
    assert KEY_BODY not in message and "\n" not in message
    assert links(database_url) == [] and account(database_url, "agent-12") is None


def test_link_status_moves_forward_only(stripe_ready, database_url):
    link = create_checkout_link(**wiring(), user_id="agent-13", item="pack_100", now=NOW)
    with db.write_session() as session:
        assert mark_link_status(session, session_id=link.session_id, status="complete", at=NOW)
        assert not mark_link_status(session, session_id=link.session_id, status="expired")
        assert not mark_link_status(session, session_id=link.session_id, status="open")
        assert not mark_link_status(session, session_id="cs_test_unknown", status="complete")
    [recorded] = links(database_url)
    assert recorded.status == "complete" and recorded.completed_at is not None
    other = create_checkout_link(**wiring(), user_id="agent-13", item="pack_250", now=NOW)
    with db.write_session() as session:
        assert mark_link_status(session, session_id=other.session_id, status="expired")
        with pytest.raises(ValueError, match="link status must be one of"):
            mark_link_status(session, session_id=other.session_id, status="paid")
    assert [link.status for link in links(database_url)] == ["complete", "expired"]


def catalog_portal_configuration(state):
    from billing_core.catalog_sync import PORTAL_METADATA

    return state.add_portal_configuration(metadata=dict(PORTAL_METADATA))


def test_portal_link_needs_a_known_customer(stripe_ready, database_url):
    with pytest.raises(CheckoutRefused, match="no Stripe customer is known for agent-14"):
        create_portal_link(**wiring(), user_id="agent-14")
    customer = stripe_ready.add_customer(email="c@example.com")
    with db.write_session() as session:
        session.add(Account(user_id="agent-14", stripe_customer_id=customer["id"]))
    stripe_ready.add_portal_configuration(is_default=True)
    configuration = catalog_portal_configuration(stripe_ready)
    url = create_portal_link(**wiring(), user_id="agent-14")
    [request] = stripe_ready.requests_to("POST", "/v1/billing_portal/sessions")
    assert request.params == {"customer": customer["id"], "return_url": "http://localhost:5000",
                              "configuration": configuration["id"]}
    assert url.startswith("https://billing.stripe.com/p/session/")


def test_portal_link_refuses_without_the_catalogs_configuration(stripe_ready, database_url):
    customer = stripe_ready.add_customer(email="c@example.com")
    with db.write_session() as session:
        session.add(Account(user_id="agent-15", stripe_customer_id=customer["id"]))
    stripe_ready.add_portal_configuration(is_default=True)  # Stripe's default would apply downgrades at once
    with pytest.raises(CheckoutRefused, match="run: python -m billing_core sync-catalog"):
        create_portal_link(**wiring(), user_id="agent-15")
    catalog_portal_configuration(stripe_ready)["active"] = False
    with pytest.raises(CheckoutRefused, match="no active customer portal configuration"):
        create_portal_link(**wiring(), user_id="agent-15")
    assert stripe_ready.requests_to("POST", "/v1/billing_portal/sessions") == []


# --- the CLI as an operator runs it, against the Stripe-compatible server ------------------

def cli(*args):
    env = dict(os.environ)  # DATABASE_URL, STRIPE_SECRET_KEY, STRIPE_API_BASE, STRIPE_PRICE_* set by fixtures
    return subprocess.run([sys.executable, "-m", "billing_core", *args], capture_output=True, text=True, env=env,
                          cwd=PROJECT_ROOT, timeout=120)


def one_line_error(result) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert KEY_BODY not in result.stderr + result.stdout
    return lines[0]


def wait_until_not_near_a_window_boundary(margin=60):
    """The CLI uses the real clock; keep both calls of a double-click test inside one idempotency window."""
    import time

    into_window = time.time() % IDEMPOTENCY_WINDOW_SECONDS
    if into_window > IDEMPOTENCY_WINDOW_SECONDS - margin:
        time.sleep(IDEMPOTENCY_WINDOW_SECONDS - into_window + 1)


def test_cli_checkout_link_against_the_server(database_url, stripe_server, stripe_prices):
    state = stripe_server.state
    wait_until_not_near_a_window_boundary()
    result = cli("checkout-link", "agent-20", "professional", "--email", "a@example.com", "--operator", "bob",
                 "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"url", "session_id", "expires_at", "item", "user_id"}
    assert (data["item"], data["user_id"]) == ("professional", "agent-20")
    session = state.objects["checkout_sessions"][data["session_id"]]
    assert data["url"] == session["url"]
    assert datetime.fromisoformat(data["expires_at"]).timestamp() == session["expires_at"]
    assert session["metadata"] == {"user_id": "agent-20", "item": "professional", "credits": "500"}
    assert session["customer_email"] == "a@example.com"

    again = cli("checkout-link", "agent-20", "professional", "--email", "a@example.com")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == data["url"]
    assert len(state.objects["checkout_sessions"]) == 1
    [recorded] = links(database_url)
    assert (recorded.operator, recorded.session_id) == ("bob", data["session_id"])


def test_cli_refusals_are_one_line(database_url, stripe_server, stripe_prices):
    assert "unknown item 'gold'" in one_line_error(cli("checkout-link", "agent-21", "gold"))
    add_subscription(database_url, "agent-21", "active")
    error = one_line_error(cli("checkout-link", "agent-21", "starter"))
    assert "already has a subscription (starter, active" in error and "portal-link agent-21" in error
    stripe_server.state.api_key = "sk_test_someoneElsesKey000000000"
    error = one_line_error(cli("checkout-link", "agent-22", "pack_100"))
    assert error.startswith("error: creating the checkout link for agent-22 (pack_100) failed: "
                            "Stripe authentication failed")


def test_cli_portal_link_against_the_server(database_url, stripe_server):
    customer = stripe_server.state.add_customer(email="p@example.com")
    with db.write_session() as session:
        session.add(Account(user_id="agent-23", stripe_customer_id=customer["id"]))
    catalog_portal_configuration(stripe_server.state)
    result = cli("portal-link", "agent-23")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("https://billing.stripe.com/p/session/")


def test_cli_without_stripe_key_says_how_to_fix_it(database_url):
    error = one_line_error(cli("checkout-link", "agent-24", "pack_100"))
    assert error.startswith("error: Stripe is not configured: set STRIPE_SECRET_KEY in config/.env")


def test_cli_refuses_an_old_schema(tmp_path, stripe_server, stripe_prices, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    error = one_line_error(cli("checkout-link", "agent-25", "pack_100"))
    assert "run `python -m billing_core init-db`" in error
    assert stripe_server.state.requests == []


# --- one plan per user: a new plan link expires the user's other open plan links -------------

def test_a_new_plan_link_expires_the_users_other_open_plan_links(stripe_ready, database_url):
    starter = create_checkout_link(**wiring(), user_id="agent-30", item="starter", now=NOW)
    pack = create_checkout_link(**wiring(), user_id="agent-30", item="pack_100", now=NOW)
    other_user = create_checkout_link(**wiring(), user_id="agent-31", item="starter", now=NOW)
    business = link_at(stripe_ready, NOW + timedelta(minutes=2), user_id="agent-30", item="business")
    [expire] = [r for r in stripe_ready.requests if r.path.endswith("/expire")]
    assert (expire.method, expire.path, expire.params) == (
        "POST", f"/v1/checkout/sessions/{starter.session_id}/expire", {})
    assert expire.idempotency_key == f"expire-{starter.session_id}"
    sessions = stripe_ready.objects["checkout_sessions"]
    assert sessions[starter.session_id]["status"] == "expired"
    assert [sessions[s.session_id]["status"] for s in (pack, other_user, business)] == ["open"] * 3
    assert {link.session_id: link.status for link in links(database_url)} == {
        starter.session_id: "expired", pack.session_id: "open", other_user.session_id: "open",
        business.session_id: "open"}


def test_a_pack_link_leaves_plan_links_open(stripe_ready, database_url):
    plan = create_checkout_link(**wiring(), user_id="agent-32", item="professional", now=NOW)
    create_checkout_link(**wiring(), user_id="agent-32", item="pack_500", now=NOW)
    assert not [r for r in stripe_ready.requests if r.path.endswith("/expire")]
    assert stripe_ready.objects["checkout_sessions"][plan.session_id]["status"] == "open"


def test_the_same_plan_link_again_in_the_window_expires_nothing(stripe_ready, database_url):
    first = create_checkout_link(**wiring(), user_id="agent-33", item="starter", now=NOW)
    again = link_at(stripe_ready, NOW + timedelta(minutes=1), user_id="agent-33", item="starter")
    assert again.reused and again.session_id == first.session_id
    assert not [r for r in stripe_ready.requests if r.path.endswith("/expire")]


def test_an_expiry_stripe_already_made_is_recorded_and_a_retry_is_idempotent(stripe_ready, database_url):
    starter = create_checkout_link(**wiring(), user_id="agent-34", item="starter", now=NOW)
    stripe_ready.expire_checkout_session(starter.session_id)  # expired in the Dashboard; webhook not here yet
    stripe_ready.fail_next(status=500, type="api_error", message="boom", times=3)
    with pytest.raises(StripeActionError, match="expiring agent-34's earlier starter link"):
        link_at(stripe_ready, NOW + timedelta(minutes=1), user_id="agent-34", item="business")
    assert [link.status for link in links(database_url)] == ["open"]
    link_at(stripe_ready, NOW + timedelta(minutes=1), user_id="agent-34", item="business")
    assert [link.status for link in links(database_url)] == ["expired", "open"]


def test_a_plan_link_paid_meanwhile_refuses_a_new_plan_link(stripe_ready, database_url):
    starter = create_checkout_link(**wiring(), user_id="agent-35", item="starter", now=NOW)
    stripe_ready.complete_checkout_session(starter.session_id)
    with pytest.raises(CheckoutRefused, match="earlier starter link .* has been paid.*portal-link agent-35"):
        link_at(stripe_ready, NOW + timedelta(minutes=1), user_id="agent-35", item="business")
    assert [link.status for link in links(database_url)] == ["complete"]
    assert len(session_posts(stripe_ready)) == 1


def test_the_double_refuses_to_expire_a_session_that_is_not_open(stripe_ready, fake_stripe):
    import stripe as stripe_module
    from billing_core.stripe_client import make_stripe_client

    session = stripe_ready.add_checkout_session(mode="payment")
    client = make_stripe_client(wiring()["settings"])
    client.v1.checkout.sessions.expire(session["id"])
    with pytest.raises(stripe_module.InvalidRequestError, match="can be expired"):
        client.v1.checkout.sessions.expire(session["id"])
    with pytest.raises(stripe_module.InvalidRequestError, match="unknown parameter: foo"):
        client.v1.checkout.sessions.expire(session["id"], params={"foo": "1"})
