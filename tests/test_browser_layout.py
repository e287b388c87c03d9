"""Header figures are never cut short at 1,280 px: in a real headless Chromium, every st.metric's label and
value on Home, Customers, Payments and Revenue & credits is shown whole (no element of it is wider than its box,
which is where Streamlit puts its ellipsis), with figures as wide as a large account's."""
from __future__ import annotations

from datetime import timedelta

import pytest

from billing_core import db, ledger
from billing_core.models import Payment, SubscriptionPeriod, utcnow
from dashboard_helpers import seeded_db, seeded_template  # noqa: F401  (fixtures)
from test_browser import (ARTIFACTS, CHROMIUM, chromium_page, dashboard, settle, sign_in_as_admin,  # noqa: F401  (a fixture)
                          visit)

SHOTS = ARTIFACTS.parent / "layout-1280"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium"),
]

CUT_SHORT = """() => Array.from(document.querySelectorAll(
    '[data-testid="stMetricValue"], [data-testid="stMetricLabel"]')).map(el => ({
        text: el.innerText,
        cut: [el, ...el.querySelectorAll('*')].some(n => n.scrollWidth > n.clientWidth + 1),
    }))"""
BIG_CUSTOMER = "demo_user_0003"


@pytest.fixture
def large_figures(seeded_db):
    """MRR of $1,272,020.09 (the large demo data's), $999,999.99 cash in 30 days, a 1,234,567-credit balance."""
    now = utcnow()
    with db.write_session(db.get_engine(seeded_db)) as session:
        session.add(SubscriptionPeriod(subscription_id="sub_big", user_id=BIG_CUSTOMER, state="active", source="test",
                                       starts_at=now - timedelta(days=2), ends_at=now + timedelta(days=28),
                                       amount_cents=127_202_009, currency="usd", is_new=True))
        session.add(Payment(user_id=BIG_CUSTOMER, source="checkout", kind="pack", item="pack_1000",
                            amount_cents=99_999_999, checkout_session_id="cs_big", created_at=now - timedelta(days=1),
                            updated_at=now - timedelta(days=1)))
        ledger.adjust(session, user_id=BIG_CUSTOMER, credits=1_234_567, reason="layout test", operator="alice")
    return seeded_db


@pytest.fixture
def page_1280():
    with chromium_page(width=1280, height=900) as page:
        yield page


@pytest.fixture(autouse=True)
def _shots_dir():
    SHOTS.mkdir(parents=True, exist_ok=True)


def metrics_cut_short(page) -> list[str]:
    shown = page.evaluate(CUT_SHORT)
    assert shown, "no metric on the page"
    return [m["text"] for m in shown if m["cut"]]


def test_metrics_are_shown_whole_at_1280px(large_figures, dashboard, page_1280):
    page = page_1280
    page.goto(dashboard)
    sign_in_as_admin(page)
    page.get_by_text("Past-due MRR").first.wait_for()
    settle(page)
    page.get_by_text("$1,27").first.wait_for()  # MRR in the millions
    page.screenshot(path=str(SHOTS / "home-1280.png"), full_page=True)
    assert metrics_cut_short(page) == []

    visit(page, "Customers", "Customers")
    page.get_by_label("Search by user id, email or Stripe customer id").fill(BIG_CUSTOMER)
    page.get_by_label("Search by user id, email or Stripe customer id").press("Enter")
    page.get_by_role("button", name="Download full ledger (CSV)").wait_for()
    settle(page)
    balance = page.get_by_test_id("stMetricValue").first  # the balance metric, a seven-digit figure
    balance.wait_for()
    assert balance.inner_text().startswith("1,23"), balance.inner_text()
    page.screenshot(path=str(SHOTS / "customers-1280.png"), full_page=True)
    assert metrics_cut_short(page) == []

    visit(page, "Payments", "Payments")
    page.get_by_text("Download CSV").wait_for()
    settle(page)
    assert metrics_cut_short(page) == []

    visit(page, "Revenue and credits", "Revenue & credits")
    page.locator(".js-plotly-plot").first.wait_for()
    settle(page)
    page.screenshot(path=str(SHOTS / "revenue-1280.png"), full_page=True)
    assert metrics_cut_short(page) == []
