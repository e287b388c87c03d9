"""Streamlit AppTest: every page renders after sign-in, nothing renders before it, sign-in itself."""
import json
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from billing_core.formatting import escape_markdown
from billing_core import db, settings as settings_module, signin
from demo_data import DEMO_OPERATOR, fill_demo_database
from billing_core.models import Account
from billing_core.operators import create_operator
from billing_core.settings import reset_settings_cache
from dashboard_helpers import (ADMIN, fresh_sign_in_throttle_and_caches, PAGES, SUPPORT, open_app, seeded_db, seeded_template,  # noqa: F401
                               sign_in, signed_in, texts)

PAGE_TITLES = {"links": "Checkout links", "customers": "Customers", "payments": "Payments",
               "revenue": "Revenue & credits", "events": "Webhook events", "settings": "Settings",
               "operators": "Operators", "expiring": "Expiring credits"}


@pytest.fixture
def demo_db(seeded_db):
    return seeded_db


def some_demo_user(url) -> Account:
    with db.read_session(db.get_engine(url)) as session:
        return session.execute(select(Account).order_by(Account.user_id).limit(1)).scalars().one()


def assert_sign_in_page_only(at):
    assert not at.exception, [e.value for e in at.exception]
    assert [t.value for t in at.title] == ["Sign in"]
    assert [b.label for b in at.button] == ["Sign in"]
    assert [t.label for t in at.text_input] == ["User name", "Password"]
    assert len(at.metric) == 0 and len(at.dataframe) == 0 and len(at.code) == 0
    shown = texts(at)
    assert "$" not in shown and "demo_user" not in shown


@pytest.mark.parametrize("page", [None, *PAGES])
def test_nothing_renders_before_sign_in(demo_db, page):
    at = open_app().run()
    if page:
        at.switch_page(PAGES[page]).run()
    assert_sign_in_page_only(at)


def test_wrong_password_is_refused(demo_db):
    at = sign_in(open_app(), ADMIN[0], "not-the-password")
    assert "Wrong user name or password." in [e.value for e in at.error]
    assert_sign_in_page_only_but_error(at)
    at = sign_in(open_app(), "nobody", ADMIN[1])
    assert "Wrong user name or password." in [e.value for e in at.error]


def test_repeated_failures_are_throttled(demo_db):
    at = open_app().run()
    for _ in range(5):
        at.text_input(key="sign_in_name").input(ADMIN[0])
        at.text_input(key="sign_in_password").input("guess")
        next(b for b in at.button if b.label == "Sign in").click()
        at.run()
        assert at.error[0].value == "Wrong user name or password."
    at.text_input(key="sign_in_password").input(ADMIN[1])  # right, but too late for this session
    next(b for b in at.button if b.label == "Sign in").click()
    at.run()
    assert "Too many failed sign-ins" in at.error[0].value
    assert_sign_in_page_only_but_error(at)


class Client:
    """Where sign-ins come from (Streamlit's client address) and when (the throttle's clock)."""

    def __init__(self, monkeypatch):
        from dashboard_ui import auth

        self.address = "203.0.113.1"
        self.now = datetime(2026, 11, 29, 9, 0, tzinfo=timezone.utc)
        monkeypatch.setattr(auth, "client_address", lambda settings: self.address)
        monkeypatch.setattr(auth, "_now", lambda: self.now)

    def sign_in(self, name, password, address=None):
        self.address = address or self.address
        return sign_in(open_app(), name, password)  # a fresh session each time, as after a reload


THROTTLED = "Too many failed sign-ins"


def test_failures_back_off_per_name_but_never_stop_a_client_without_failures(demo_db, monkeypatch):
    client = Client(monkeypatch)
    for _ in range(5):
        at = client.sign_in(ADMIN[0].upper(), "guess", address="203.0.113.1")
        assert [e.value for e in at.error] == ["Wrong user name or password."]
    at = client.sign_in(ADMIN[0], ADMIN[1])
    assert THROTTLED in at.error[0].value and "30 seconds" in at.error[0].value
    assert_sign_in_page_only_but_error(at)
    # another address that guessed once meets the name's back-off too
    assert client.sign_in(ADMIN[0], "guess", address="198.51.100.7").error[0].value == "Wrong user name or password."
    assert THROTTLED in client.sign_in(ADMIN[0], ADMIN[1]).error[0].value
    # the operator, from an address without failures, is let in with the right password
    assert client.sign_in(ADMIN[0], ADMIN[1], address="192.0.2.10").title[0].value == "Billing console"


def test_back_off_doubles_with_each_further_failure(demo_db, monkeypatch):
    client = Client(monkeypatch)
    for _ in range(5):
        client.sign_in("nobody", "guess")
    assert THROTTLED in client.sign_in("Nobody", "guess").error[0].value  # unknown names are counted too
    client.now += timedelta(seconds=31)
    assert client.sign_in("nobody", "guess").error[0].value == "Wrong user name or password."  # the 6th failure
    client.now += timedelta(seconds=59)
    assert "1 seconds" in client.sign_in("nobody", "guess").error[0].value  # 60 s after the 6th
    client.now += timedelta(seconds=2)
    assert client.sign_in("nobody", "guess").error[0].value == "Wrong user name or password."


def test_spraying_across_names_backs_off_the_address(demo_db, monkeypatch):
    client = Client(monkeypatch)
    for name in ("ann", "bob", "cyd", "dee", "eve"):
        client.sign_in(name, "Winter2026!")
    assert THROTTLED in client.sign_in(SUPPORT[0], SUPPORT[1]).error[0].value  # this address is held back
    assert client.sign_in(SUPPORT[0], SUPPORT[1], address="192.0.2.10").title[0].value == "Billing console"


def test_sign_ins_are_recorded_for_admins(demo_db, monkeypatch):
    client = Client(monkeypatch)
    client.sign_in(SUPPORT[0], "guess")
    client.sign_in(SUPPORT[0], SUPPORT[1])
    at = signed_in(ADMIN, "operators")
    attempts = at.dataframe[1].value  # operators, sign-in attempts, changes
    rows = [tuple(r) for r in attempts[["User name", "Client address", "Result"]].itertuples(index=False)]
    assert rows[:3] == [("alice", "203.0.113.1", "signed in"), (SUPPORT[0], "203.0.113.1", "signed in"),
                        (SUPPORT[0], "203.0.113.1", "failed")]


def assert_sign_in_page_only_but_error(at):
    assert [t.value for t in at.title] == ["Sign in"]
    assert len(at.metric) == 0 and len(at.dataframe) == 0


@pytest.mark.parametrize("credentials", [ADMIN, SUPPORT])
@pytest.mark.parametrize("page", [None, *PAGES])
def test_every_page_renders_after_sign_in(demo_db, credentials, page):
    at = signed_in(credentials, page)
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == PAGE_TITLES.get(page, "Billing console")
    assert f"Signed in as **{credentials[0]}**" in texts(at)


def test_home_shows_the_metrics(demo_db):
    at = signed_in()
    labels = {m.label: m.value for m in at.metric}
    for label in ("MRR", "Past-due MRR", "Cash, 30 days", "Credits outstanding", "Credits worth",
                  "Flagged accounts", "Events to look at", "Failed events", "Starter", "Professional",
                  "Business", "Past due"):
        assert label in labels
    assert labels["MRR"].startswith("$") and labels["Accounts"] == "40"


def test_customers_page_shows_summary_breakdown_and_timeline(demo_db):
    user = some_demo_user(demo_db)
    at = signed_in(page="customers")
    at.text_input(key="customer_query").input(user.email).run()
    assert not at.exception
    labels = {m.label: m.value for m in at.metric}
    assert {"Balance (credits)", "Spendable now", "Tier"} <= set(labels)
    assert at.subheader[0].value == escape_markdown(user.user_id)
    timeline = at.dataframe[-1].value
    assert len(timeline) > 0 and {"When", "What", "Credits", "Amount"} <= set(timeline.columns)


def test_customers_search_without_match(demo_db):
    at = signed_in(page="customers")
    at.text_input(key="customer_query").input("no-such-user").run()
    assert not at.exception
    assert f"No account matches {escape_markdown(repr('no-such-user'))}." in [w.value for w in at.warning]


def test_payments_page_filters(demo_db):
    at = signed_in(page="payments")
    everything = {m.label: m.value for m in at.metric}["Payments"]
    at.selectbox(key="pay_item").set_value("pack").run()
    packs = {m.label: m.value for m in at.metric}["Payments"]
    assert int(packs.replace(",", "")) < int(everything.replace(",", ""))
    frame = at.dataframe[0].value
    assert set(frame["Item"]) <= {"100 credits", "250 credits", "500 credits", "1000 credits"}
    assert not at.exception


def test_revenue_page_draws_charts(demo_db):
    at = signed_in(page="revenue")
    assert not at.exception
    titles = [json.loads(chart.proto.spec)["layout"]["title"]["text"] for chart in at.get("plotly_chart")]
    assert [t.split(" (")[0].split(",")[0] for t in titles] == [
        "MRR at month end", "New and churned MRR by month", "Cash collected by day", "Cash collected by month",
        "Subscribers by tier", "Credits granted", "Accounts by balance", "Outstanding credit liability at month end"]


def plotted(values):
    """A trace's values as plotly sends them: a list, or a typed array in base64."""
    if isinstance(values, dict):
        import base64

        import numpy as np
        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"]).tolist()
    return list(values)


def test_liability_chart_runs_back_from_todays_outstanding_credits(database_url):
    from datetime import timedelta

    from billing_core import ledger
    from billing_core.models import utcnow
    from dashboard_helpers import add_operators

    add_operators(database_url)
    with db.write_session() as session:
        with ledger.recorded_at(utcnow() - timedelta(days=40)):
            ledger.grant_pack(session, user_id="cust_1", credits=1000, source_key="seed:cust_1")
        ledger.consume(session, user_id="cust_1", credits=300, reference="run-1")
    at = signed_in(page="revenue")
    liability = next(json.loads(c.proto.spec) for c in at.get("plotly_chart")
                     if json.loads(c.proto.spec)["layout"]["title"]["text"].startswith("Outstanding"))
    trace = liability["data"][0]
    assert plotted(trace["y"]) == [60.0, 42.0]  # 1,000 then 700 credits at $0.06


def test_demo_mode_shows_the_demo_operator(sqlite_url, monkeypatch):
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.setattr(settings_module, "DEMO_DATABASE_URL", sqlite_url)
    reset_settings_cache()
    fill_demo_database(database_url=sqlite_url)
    at = open_app().run()
    assert any("demo-password" in i.value and "DEMO MODE" not in i.value for i in at.info)
    assert "DEMO MODE" in texts(at)
    at = sign_in(open_app(), *DEMO_OPERATOR)
    assert at.title[0].value == "Billing console" and not at.exception


def test_demo_operator_is_not_shown_outside_demo_mode(demo_db):
    at = open_app().run()
    assert "demo-password" not in texts(at)


def test_demo_operator_cannot_sign_in_outside_demo_mode(demo_db):
    # a database filled before demo-data kept the demo operator to the demo database may still hold one
    with db.write_session(db.get_engine(demo_db)) as session:
        create_operator(session, name=DEMO_OPERATOR[0], role="admin", password=DEMO_OPERATOR[1])
    at = sign_in(open_app(), *DEMO_OPERATOR)
    assert [e.value for e in at.error] == ["Wrong user name or password."]
    assert_sign_in_page_only_but_error(at)


def test_out_of_date_schema_refuses_to_start(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    reset_settings_cache()
    at = open_app().run()
    assert any("python -m billing_core init-db" in e.value for e in at.error)
    assert len(at.text_input) == 0 and len(at.metric) == 0


def test_unreachable_database_is_not_described_to_visitors(tmp_path, monkeypatch, caplog):
    from billing_core.operators import Identity

    monkeypatch.setenv("DATABASE_URL", "postgresql://billing:hunter2-secret@127.0.0.1:9/billing")  # port 9: refused
    reset_settings_cache()
    with caplog.at_level("ERROR", logger="dashboard_ui.common"):
        at = open_app().run()
    assert [e.value for e in at.error] == ["The dashboard can't reach its database; see the server log."]
    assert "127.0.0.1" not in texts(at) and len(at.text_input) == 0
    assert "postgresql://billing:***@127.0.0.1:9/billing" in caplog.text and "hunter2" not in caplog.text
    at = open_app()
    at.session_state["operator_identity"] = Identity(name="alice", role="admin")
    at.run()
    assert "can't reach the database postgresql://billing:***@127.0.0.1:9/billing" in at.error[0].value
    assert "hunter2" not in texts(at)


def test_oidc_maps_emails_to_roles(demo_db, monkeypatch):
    monkeypatch.setenv("ADMIN_EMAILS", "boss@example.com")
    monkeypatch.setenv("SUPPORT_EMAILS", "help@example.com")
    reset_settings_cache()
    auth = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "x" * 32,
            "client_id": "id", "client_secret": "secret",
            "server_metadata_url": "https://accounts.example.com/.well-known/openid-configuration"}

    def app(user):
        at = open_app()
        at.secrets["auth"] = auth
        at.user = user
        return at.run()

    at = app({"is_logged_in": False})
    assert [b.label for b in at.button] == ["Sign in"] and len(at.metric) == 0 and len(at.text_input) == 0
    at = app({"is_logged_in": True, "email": "stranger@example.com", "email_verified": True})
    assert at.title[0].value == "No access" and len(at.metric) == 0
    at = app({"is_logged_in": True, "email": "Help@Example.com", "email_verified": True})
    assert f"Signed in as **{escape_markdown('help@example.com')}** (support)" in texts(at) and len(at.metric) > 0
    at = app({"is_logged_in": True, "email": "boss@example.com", "email_verified": True})
    assert f"Signed in as **{escape_markdown('boss@example.com')}** (admin)" in texts(at)
    at.run()  # a rerun of the signed-in session is not another sign-in
    for unverified in ({"email_verified": False}, {}, {"email_verified": "true"}):  # only a real True counts
        at = app({"is_logged_in": True, "email": "boss@example.com", **unverified})
        assert at.title[0].value == "No access" and len(at.metric) == 0
        assert "has not verified this account's email address" in at.error[0].value
    with db.read_session() as session:  # the sign-in log shows the identity provider's sign-ins, newest first
        logged = [(a["name"], a["result"]) for a in signin.recent_attempts(session)]
    assert logged == [("boss@example.com", "failed")] * 3 + [
        ("boss@example.com", "signed in"), ("help@example.com", "signed in"), ("stranger@example.com", "failed")]


def test_sign_out(demo_db):
    at = signed_in()
    next(b for b in at.button if b.label == "Sign out").click()
    at.run()
    assert_sign_in_page_only(at)
