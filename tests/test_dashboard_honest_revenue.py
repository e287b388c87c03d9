"""Streamlit AppTest for honest revenue: money per currency on Home and Revenue & credits (a currency
control when there are several), MRR's last point equal to Home's, and the customer's full-ledger CSV."""
import csv
import io
import json
from datetime import timedelta

from sqlalchemy import select

from billing_core import db, ledger, reports
from billing_core.models import Account, Payment, Subscription, SubscriptionPeriod, utcnow
from dashboard_helpers import add_operators, fresh_sign_in_throttle_and_caches, signed_in  # noqa: F401
from dashboard_ui import data


def two_currencies(url: str) -> None:
    """A dollar and a euro subscriber, each billed this period, and a euro pack."""
    add_operators(url)
    now = utcnow()
    with db.write_session() as session:
        for user, currency, amount in (("usd_user", "usd", 2999), ("eur_user", "eur", 2500)):
            ledger.lock_account(session, user_id=user)
            session.add(Subscription(id=f"sub_{user}", user_id=user, tier="professional", status="active"))
            payment = Payment(user_id=user, source="invoice", kind="plan", item="professional", amount_cents=amount,
                              currency=currency, invoice_id=f"in_{user}", subscription_id=f"sub_{user}",
                              created_at=now - timedelta(days=3), updated_at=now - timedelta(days=3))
            session.add(payment)
            session.flush()
            ledger.grant_subscription_period(session, user_id=user, subscription_id=f"sub_{user}", tier="professional",
                                             period_end=int((now + timedelta(days=27)).timestamp()),
                                             payment_id=payment.id, source_key=f"invoice:in_{user}")
        session.add(Payment(user_id="eur_user", source="checkout", kind="pack", item="pack_1000", amount_cents=5500,
                            currency="eur", checkout_session_id="cs_eur", created_at=now - timedelta(days=1),
                            updated_at=now - timedelta(days=1)))


def test_home_never_adds_currencies(database_url):
    two_currencies(database_url)
    at = signed_in()
    assert not at.exception, [e.value for e in at.exception]
    labels = {m.label: m.value for m in at.metric}
    assert labels["MRR (USD)"] == "$29.99"
    assert labels["Cash, 30 days (EUR)"] == "€80.00"
    captions = [c.value for c in at.caption]
    assert "and €25.00" in captions and "and $29.99" in captions


def test_revenue_currency_control_switches_every_money_chart(database_url):
    two_currencies(database_url)
    at = signed_in(page="revenue")
    assert not at.exception, [e.value for e in at.exception]
    control = at.button_group(key="rev_currency")
    assert control.options == ["EUR", "USD"] and control.value == "eur"  # the larger one first
    charts = {json.loads(c.proto.spec)["layout"]["title"]["text"].split(" (")[0]: json.loads(c.proto.spec)
              for c in at.get("plotly_chart")}
    assert charts["MRR at month end"]["layout"]["yaxis"]["title"]["text"] == control.value.upper()
    control.set_value("usd").run()
    assert not at.exception
    spec = next(json.loads(c.proto.spec) for c in at.get("plotly_chart")
                if json.loads(c.proto.spec)["layout"]["title"]["text"].startswith("MRR at month end"))
    assert spec["layout"]["title"]["text"] == "MRR at month end (now $29.99)"
    assert spec["layout"]["yaxis"]["title"]["text"] == "USD"
    cash = next(json.loads(c.proto.spec) for c in at.get("plotly_chart")
                if json.loads(c.proto.spec)["layout"]["title"]["text"].startswith("Cash collected by month"))
    assert "net of refunds and lost disputes" in cash["layout"]["title"]["text"]


def test_one_currency_needs_no_control(database_url):
    add_operators(database_url)
    at = signed_in(page="revenue")
    assert not at.exception
    assert [b for b in at.button_group if b.key == "rev_currency"] == []


def test_mrr_last_point_equals_home(database_url):
    two_currencies(database_url)
    now = utcnow()
    with db.read_session() as session:
        home = reports.subscription_stats(session, now=now).mrr
        series = reports.mrr_series(session, since=now - timedelta(days=365), until=now, tz_name="Europe/Berlin")
    last = {r["currency"]: r["mrr_cents"] for r in series if r["state"] == "active"
            and r["period"] == max(s["period"] for s in series)}
    assert last == home == {"usd": 2999, "eur": 2500}


def test_customer_ledger_csv_button_and_content(database_url):
    add_operators(database_url)
    with db.write_session() as session:
        ledger.grant_pack(session, user_id="csv_user", credits=500, source_key="seed:csv")
        ledger.consume(session, user_id="csv_user", credits=20, reference="=HYPERLINK(\"http://x\")")
        ledger.adjust(session, user_id="csv_user", credits=-5, reason="+cmd|' /C calc'!A0", operator="alice")
    at = signed_in(page="customers")
    at.text_input(key="customer_query").input("csv_user").run()
    assert not at.exception, [e.value for e in at.exception]
    [button] = [b for b in at.get("download_button") if b.proto.label == "Download full ledger (CSV)"]
    text = data.customer_ledger_csv(database_url, "csv_user", "Europe/Berlin")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["kind"], r["credits"]) for r in rows] == [("pack_grant", "500"), ("spend", "-20"), ("adjustment", "-5")]
    assert rows[1]["reference"] == "'=HYPERLINK(\"http://x\")"  # defused for spreadsheets
    assert rows[2]["reason"].startswith("'+cmd")
    assert rows[0]["created_at"].endswith(("+01:00", "+02:00"))


def test_ledger_csv_streams_every_entry(database_url):
    with db.write_session() as session:
        ledger.grant_pack(session, user_id="many", credits=10_000, source_key="seed:many")
        for n in range(120):
            ledger.consume(session, user_id="many", credits=1, reference=f"run-{n}")
        count = len(session.execute(select(ledger.LedgerEntry).where(ledger.LedgerEntry.user_id == "many")).all())
    with db.read_session() as session:
        lines = list(reports.ledger_csv_lines(session, user_id="many", tz_name="UTC"))
    assert len(lines) == count + 1 and count >= 121


def test_customer_overview_keeps_currencies_apart(database_url):
    two_currencies(database_url)
    with db.read_session() as session:
        overview = reports.account_overview(session, user_id="eur_user")
    assert overview["net_paid"] == {"eur": 2500 + 5500} and overview["payments"] == 2
    assert Account and SubscriptionPeriod  # the models the fixture writes through
