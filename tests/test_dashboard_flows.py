"""The dashboard's writes through AppTest: adjustments (with the operator recorded, support's limit),
checkout links against the Stripe double, and reprocessing an event that needs attention."""
import pytest
from sqlalchemy import select

from billing_core.formatting import escape_markdown
from billing_core import db, events, ledger
from wiring import wiring
from billing_core.models import CheckoutLink, LedgerEntry, StripeEvent
from dashboard_helpers import (ADMIN, fresh_sign_in_throttle_and_caches, SUPPORT, add_operators, seeded_db, seeded_template,  # noqa: F401
                               signed_in, texts)
from stripe_events import checkout_completed, encode


def open_customer(credentials, user_id):
    at = signed_in(credentials, "customers")
    at.text_input(key="customer_query").input(user_id).run()
    assert at.subheader[0].value == escape_markdown(user_id)
    return at


def submit_adjustment(at, *, credits, reason, confirm=True):
    at.number_input(key="adjust_credits").set_value(credits)
    at.text_input(key="adjust_reason").input(reason)
    at.checkbox(key="adjust_confirm").set_value(confirm)
    next(b for b in at.button if b.label == "Apply adjustment").click()
    return at.run()


def adjustments(url, user_id):
    with db.read_session(db.get_engine(url)) as session:
        return session.execute(select(LedgerEntry.credits, LedgerEntry.operator, LedgerEntry.reason)
                               .where(LedgerEntry.user_id == user_id, LedgerEntry.kind == "adjustment")
                               .order_by(LedgerEntry.id)).all()


def balance_of(url, user_id):
    with db.read_session(db.get_engine(url)) as session:
        return ledger.balance(session, user_id)


@pytest.fixture
def customer(database_url):
    add_operators(database_url)
    with db.write_session() as session:
        ledger.grant_pack(session, user_id="cust_1", credits=1000, source_key="seed:cust_1")
    return "cust_1"


def test_adjustment_writes_a_ledger_entry_with_the_operator(database_url, customer):
    at = open_customer(ADMIN, customer)
    at = submit_adjustment(at, credits=750, reason="goodwill after the outage")
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("balance is now 1,750" in s.value for s in at.success)
    assert adjustments(database_url, customer) == [(750, "alice", "goodwill after the outage")]
    assert {m.label: m.value for m in at.metric}["Balance (credits)"] == "1,750"
    assert "goodwill after the outage" in at.dataframe[-1].value["Detail"].tolist()


def test_adjustment_form_is_cleared_so_a_second_click_applies_nothing(database_url, customer):
    at = open_customer(ADMIN, customer)
    at = submit_adjustment(at, credits=300, reason="goodwill")
    assert adjustments(database_url, customer) == [(300, "alice", "goodwill")]
    assert (at.number_input(key="adjust_credits").value, at.text_input(key="adjust_reason").value,
            at.checkbox(key="adjust_confirm").value) == (0, "", False)
    next(b for b in at.button if b.label == "Apply adjustment").click()
    at.run()
    assert adjustments(database_url, customer) == [(300, "alice", "goodwill")]
    assert balance_of(database_url, customer) == 1300


def test_the_same_filled_in_form_is_applied_once(database_url, customer):
    """A rerun interrupted after the write (a double click) submits the form again with the same key."""
    at = open_customer(ADMIN, customer)
    state_key = f"adjust_source_key:{customer}"
    form_key = at.session_state[state_key]
    at = submit_adjustment(at, credits=300, reason="goodwill")
    assert at.session_state[state_key] != form_key  # the next form gets a fresh key
    at.session_state[state_key] = form_key  # as if the renewal had been cut off
    at = submit_adjustment(at, credits=300, reason="goodwill")
    assert any("already applied" in s.value for s in at.success)
    assert adjustments(database_url, customer) == [(300, "alice", "goodwill")]
    at = submit_adjustment(at, credits=5, reason="a second, different adjustment")
    assert adjustments(database_url, customer)[-1] == (5, "alice", "a second, different adjustment")


def test_adjustment_needs_confirmation_and_a_reason(database_url, customer):
    at = open_customer(ADMIN, customer)
    at = submit_adjustment(at, credits=10, reason="forgot to confirm", confirm=False)
    assert "Tick the confirmation box" in at.error[0].value
    at = submit_adjustment(at, credits=10, reason="  ")
    assert "a reason is required" in at.error[0].value
    at = submit_adjustment(at, credits=0, reason="nothing")
    assert "must not be zero" in at.error[0].value
    assert adjustments(database_url, customer) == []


def test_negative_adjustment_below_zero_is_refused(database_url, customer):
    at = open_customer(ADMIN, customer)
    at = submit_adjustment(at, credits=-1500, reason="chargeback")
    assert "below zero" in at.error[0].value
    assert balance_of(database_url, customer) == 1000


def test_support_cannot_exceed_its_limit(database_url, customer, monkeypatch):
    from billing_core.settings import reset_settings_cache

    monkeypatch.setenv("SUPPORT_ADJUSTMENT_LIMIT", "200")
    reset_settings_cache()
    at = open_customer(SUPPORT, customer)
    assert "at most 200 credits" in texts(at)
    at = submit_adjustment(at, credits=201, reason="too generous")
    assert "at most 200 credits" in at.error[0].value
    at = submit_adjustment(at, credits=-201, reason="too harsh")
    assert "at most 200 credits" in at.error[0].value
    assert adjustments(database_url, customer) == []
    at = submit_adjustment(at, credits=-200, reason="double grant")
    assert not at.error
    assert adjustments(database_url, customer) == [(-200, "sam", "double grant")]
    assert balance_of(database_url, customer) == 800


def test_link_flow_creates_a_recorded_link(database_url, fake_stripe, stripe_prices):
    add_operators(database_url)
    at = signed_in(ADMIN, "links")
    assert "Stripe is not configured" not in texts(at)
    at.text_input(key="link_query").input("new_user_7").run()
    at.text_input(key="link_email").input("new7@example.com").run()
    at.radio(key="link_item").set_value("pack_250").run()
    at.button(key="link_generate").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    with db.read_session() as session:
        link = session.execute(select(CheckoutLink)).scalars().one()
    assert (link.user_id, link.item, link.operator, link.status) == ("new_user_7", "pack_250", "alice", "open")
    assert at.code[0].value == link.url
    assert link.url.startswith("http")
    assert any("Expires" in c.value for c in at.caption)
    created = fake_stripe.state.requests_to("POST", "/v1/checkout/sessions")
    assert len(created) == 1
    recent = at.dataframe[-1].value
    assert recent["User"].tolist() == ["new_user_7"] and recent["Operator"].tolist() == ["alice"]


def test_link_goes_to_the_exact_user_id_not_a_prefix_match(database_url, fake_stripe, stripe_prices):
    add_operators(database_url)
    with db.write_session() as session:
        ledger.lock_account(session, user_id="cust_0010", email="ten@example.com")
    at = signed_in(ADMIN, "links")
    at.text_input(key="link_query").input("cust_001").run()
    assert at.selectbox[0].value == ""  # the new account, not cust_0010
    assert "New account with user id 'cust_001'" in at.selectbox[0].options
    at.radio(key="link_item").set_value("pack_100").run()
    at.button(key="link_generate").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    with db.read_session() as session:
        assert session.execute(select(CheckoutLink.user_id)).scalars().all() == ["cust_001"]
    at.text_input(key="link_query").input("cust_0010").run()
    assert at.selectbox[0].value == "cust_0010"
    at.text_input(key="link_query").input("ten@example.com").run()
    assert at.selectbox[0].value == "cust_0010"


def test_an_issued_link_disappears_when_the_account_or_item_changes(database_url, fake_stripe, stripe_prices):
    add_operators(database_url)
    at = signed_in(ADMIN, "links")
    at.text_input(key="link_query").input("buyer_1").run()
    at.radio(key="link_item").set_value("pack_100").run()
    at.button(key="link_generate").click().run()
    assert len(at.code) == 1
    at.radio(key="link_item").set_value("pack_250").run()
    assert len(at.code) == 0 and not at.success
    at.radio(key="link_item").set_value("pack_100").run()
    assert len(at.code) == 0  # gone, not hidden: generate again for the link to be shown
    at.button(key="link_generate").click().run()
    assert len(at.code) == 1
    at.text_input(key="link_query").input("buyer_2").run()
    assert len(at.code) == 0


def test_link_page_without_stripe_says_so(database_url):
    add_operators(database_url)
    at = signed_in(SUPPORT, "links")
    assert "Stripe is not configured" in texts(at)
    at.text_input(key="link_query").input("someone").run()
    assert at.button(key="link_generate").disabled


def needs_attention_event(database_url):
    evt = checkout_completed(user_id="ignored", item="pack_100")
    del evt["data"]["object"]["metadata"]["user_id"]
    evt["data"]["object"]["client_reference_id"] = None
    result = events.ingest(evt, raw_payload=encode(evt), **wiring())
    assert result.status == "needs_attention"
    return evt["id"]


def test_reprocess_flow_assigns_the_user_and_grants(database_url):
    add_operators(database_url)
    event_id = needs_attention_event(database_url)
    at = signed_in(ADMIN, "events")
    assert {m.label: m.value for m in at.metric}["Needs attention"] == "1"
    at.text_input(key=f"assign_{event_id}").input("rescued_user")
    next(b for b in at.button if b.label == "Assign and reprocess").click()
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any(escape_markdown(f"Reprocessed {event_id}: processed") in s.value for s in at.success)
    with db.read_session() as session:
        row = session.get(StripeEvent, event_id)
        assert (row.status, row.assigned_user_id, row.user_id) == ("processed", "rescued_user", "rescued_user")
        assert row.reprocessed_by == ADMIN[0]
        assert ledger.balance(session, "rescued_user") == 100


def test_support_cannot_reprocess(database_url):
    add_operators(database_url)
    event_id = needs_attention_event(database_url)
    at = signed_in(SUPPORT, "events")
    button = next(b for b in at.button if b.label == "Assign and reprocess")
    assert button.disabled
    with db.read_session() as session:
        assert session.get(StripeEvent, event_id).status == "needs_attention"


def test_events_page_shows_the_payload(database_url):
    add_operators(database_url)
    event_id = needs_attention_event(database_url)
    at = signed_in(ADMIN, "events")
    assert at.dataframe[-1].value["Event"].tolist() == [event_id]
    assert at.json[0].value and event_id in at.json[0].value
