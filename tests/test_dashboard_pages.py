"""Streamlit AppTest: every page renders after sign-in, nothing renders before it, sign-in itself."""
import json

import pytest
from sqlalchemy import select

from billing_core import db, settings as settings_module
from demo_data import DEMO_OPERATOR, fill_demo_database
from billing_core.models import Account
from billing_core.operators import create_operator
from billing_core.settings import reset_settings_cache
from dashboard_helpers import (ADMIN, fresh_sign_in_throttle_and_caches, PAGES, SUPPORT, open_app, seeded_db, seeded_template,  # noqa: F401
                               sign_in, signed_in, texts)

PAGE_TITLES = {"links": "Checkout links", "customers": "Customers", "payments": "Payments",
               "revenue": "Revenue & credits", "events": "Webhook events", "settings": "Settings"}


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


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now


def test_failures_count_across_sessions_per_name(demo_db, monkeypatch):
    """A page reload is a new session; the count of failures for a name must survive it."""
    from dashboard_ui import auth

    clock = FakeClock()
    monkeypatch.setattr(auth, "time", clock)
    for _ in range(5):
        at = sign_in(open_app(), ADMIN[0].upper(), "guess")  # each a fresh session, as after a reload
        assert [e.value for e in at.error] == ["Wrong user name or password."]
    at = sign_in(open_app(), ADMIN[0], ADMIN[1])
    assert "Too many failed sign-ins" in at.error[0].value
    assert_sign_in_page_only_but_error(at)
    assert signed_in(SUPPORT).title[0].value == "Billing console"  # other names are not locked
    clock.now += auth.FAILURE_WINDOW_SECONDS - 1
    assert "Too many failed sign-ins" in sign_in(open_app(), ADMIN[0], ADMIN[1]).error[0].value
    clock.now += 2
    assert signed_in(ADMIN).title[0].value == "Billing console"


def test_unknown_names_are_throttled_too(demo_db):
    for _ in range(5):
        sign_in(open_app(), "nobody", "guess")
    assert "Too many failed sign-ins" in sign_in(open_app(), "Nobody", "guess").error[0].value


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
    assert at.subheader[0].value == user.user_id
    timeline = at.dataframe[-1].value
    assert len(timeline) > 0 and {"When", "What", "Credits", "Amount"} <= set(timeline.columns)


def test_customers_search_without_match(demo_db):
    at = signed_in(page="customers")
    at.text_input(key="customer_query").input("no-such-user").run()
    assert not at.exception
    assert "No account matches 'no-such-user'." in [w.value for w in at.warning]


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
    at = app({"is_logged_in": True, "email": "stranger@example.com"})
    assert at.title[0].value == "No access" and len(at.metric) == 0
    at = app({"is_logged_in": True, "email": "Help@Example.com"})
    assert "Signed in as **help@example.com** (support)" in texts(at) and len(at.metric) > 0
    at = app({"is_logged_in": True, "email": "boss@example.com"})
    assert "Signed in as **boss@example.com** (admin)" in texts(at)


def test_sign_out(demo_db):
    at = signed_in()
    next(b for b in at.button if b.label == "Sign out").click()
    at.run()
    assert_sign_in_page_only(at)
