"""billing_core.reports on SQLite and PostgreSQL: the numbers the dashboard shows, from known data."""
import csv
import io
from datetime import datetime, timedelta, timezone

import pytest

from billing_core import db, ledger, reports
from billing_core.formatting import age, money, when
from billing_core.models import (Account, CheckoutLink, Dispute, Payment, StripeEvent, Subscription, SubscriptionPeriod,
                                 utcnow)
from billing_core.settings import load_settings

NOW = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)


def add_payment(session, *, user_id, item, kind, amount, days_ago, status="paid", refunded=0, lost=0, hour=12):
    created = (NOW - timedelta(days=days_ago)).replace(hour=hour)
    payment = Payment(user_id=user_id, source="checkout" if kind == "pack" else "invoice", item=item, kind=kind,
                      amount_cents=amount, status=status, amount_refunded=refunded, amount_disputed_lost=lost,
                      created_at=created, updated_at=created)
    session.add(payment)
    session.flush()
    return payment


@pytest.fixture
def data(database_url):
    with db.write_session() as session:
        for user in ("ann", "bob", "cat", "dan"):
            ledger.lock_account(session, user_id=user, email=f"{user}@example.com", stripe_customer_id=f"cus_{user}")
        session.add(Subscription(id="sub_ann", user_id="ann", tier="starter", status="active"))
        session.add(Subscription(id="sub_bob", user_id="bob", tier="business", status="past_due"))
        session.add(Subscription(id="sub_cat", user_id="cat", tier="business", status="canceled"))
        session.add(Subscription(id="sub_dan", user_id="dan", tier="professional", status="trialing"))
        add_payment(session, user_id="ann", item="starter", kind="plan", amount=999, days_ago=1)
        add_payment(session, user_id="bob", item="business", kind="plan", amount=9999, days_ago=40)
        pack = add_payment(session, user_id="cat", item="pack_500", kind="pack", amount=3500, days_ago=2,
                           status="partially_refunded", refunded=1750)
        add_payment(session, user_id="dan", item="pack_100", kind="pack", amount=1000, days_ago=3, status="failed")
        ledger.grant_pack(session, user_id="ann", credits=300, source_key="g:ann", payment_id=None, now=NOW)
        ledger.grant_pack(session, user_id="cat", credits=500, source_key="g:cat", payment_id=pack.id, now=NOW)
        ledger.grant_subscription_period(session, user_id="bob", subscription_id="sub_bob", tier="business",
                                         period_end=int((NOW - timedelta(days=5)).timestamp()),
                                         source_key="g:bob", now=NOW - timedelta(days=35))
        ledger.consume(session, user_id="ann", credits=50, reference="r1", now=NOW)
        # billed spans (kept by triggers from paid grants; written directly here): ann active, bob past due
        session.add(SubscriptionPeriod(subscription_id="sub_ann", user_id="ann", state="active", source="test",
                                       starts_at=NOW - timedelta(days=1), ends_at=NOW + timedelta(days=29),
                                       amount_cents=999, currency="usd", is_new=True))
        session.add(SubscriptionPeriod(subscription_id="sub_bob", user_id="bob", state="past_due", source="test",
                                       starts_at=NOW - timedelta(days=10), ends_at=NOW + timedelta(days=3650),
                                       amount_cents=9999, currency="usd"))
        ledger.adjust(session, user_id="dan", credits=7, reason="test", operator="alice", now=NOW)
        session.add(Dispute(id="dp_1", user_id="cat", payment_id=pack.id, amount_cents=1750, status="open",
                            created_at=NOW))
        session.add(CheckoutLink(session_id="cs_x", idempotency_key="k", user_id="ann", item="pack_100",
                                 url="https://checkout.example/x", operator="alice", created_at=NOW,
                                 expires_at=NOW + timedelta(hours=24)))
        for n, status in enumerate(("processed", "needs_attention", "failed", "processed")):
            session.add(StripeEvent(id=f"evt_{n}", type="invoice.paid" if n % 2 else "charge.refunded",
                                    payload='{"id": "evt_%d"}' % n, status=status,
                                    received_at=NOW - timedelta(hours=30 - n), user_id="ann" if n == 1 else None))
        session.flush()
        account = session.get(ledger.Account, "cat")
        account.open_disputes = 1
        ledger.refresh_flag(session, account, now=NOW)
    return database_url


def test_home_numbers(data):
    settings = load_settings({"STRIPE_SECRET_KEY": "sk_test_x" + "0" * 20, "BILLING_ENV_FILE": "/nonexistent"})
    with db.read_session() as session:
        overview = reports.overview(session, settings=settings, now=NOW)
        outstanding = reports.credits_outstanding(session, now=NOW)
    assert overview.subscriptions.mrr == {"usd": 999}  # trialing and canceled don't bill
    assert overview.subscriptions.past_due_mrr == {"usd": 9999}  # counted apart
    assert overview.subscriptions.active_by_tier == {"starter": 1, "professional": 1, "business": 0}
    assert overview.subscriptions.past_due == 1
    # 30 days: starter 9.99 + pack 35.00 - 17.50 refunded; the failed payment and the 40-day-old one don't count
    [revenue] = overview.revenue_30d
    assert (revenue.currency, revenue.net_cents, revenue.payments) == ("usd", 999 + 3500 - 1750, 2)
    # bob's subscription lot expired five days ago; ann 250, cat 500, dan 7
    assert outstanding == 250 + 500 + 7
    assert reports.credits_worth_cents(outstanding) == 757 * 6
    assert overview.flagged_accounts == 1 and overview.accounts == 4
    assert overview.events == {"received": 0, "processed": 2, "ignored": 0, "needs_attention": 1, "failed": 1}
    assert overview.webhook.last_received_at == NOW - timedelta(hours=27)
    assert "no webhook event for 27 hours" in overview.webhook.warning


def test_webhook_warning_only_when_stripe_is_configured(data):
    with db.read_session() as session:
        quiet = reports.webhook_health(session, settings=load_settings({"BILLING_ENV_FILE": "/x"}), now=NOW)
        recent = reports.webhook_health(session, now=NOW - timedelta(hours=20),
                                        settings=load_settings({"STRIPE_SECRET_KEY": "sk_test_" + "1" * 20,
                                                                "BILLING_ENV_FILE": "/x"}))
    assert quiet.warning is None and recent.warning is None


def test_search_accounts(data):
    with db.read_session() as session:
        assert [a["user_id"] for a in reports.search_accounts(session, "cus_bob")] == ["bob"]
        assert [a["user_id"] for a in reports.search_accounts(session, "CAT@example.com")] == ["cat"]
        assert [a["user_id"] for a in reports.search_accounts(session, "da")] == ["dan"]
        assert reports.search_accounts(session, "zzz") == [] and reports.search_accounts(session, "  ") == []


def test_customer_timeline_explains_the_balance(data):
    with db.read_session() as session:
        rows = reports.customer_timeline(session, user_id="cat", limit=50)
        assert reports.timeline_length(session, user_id="cat") == len(rows)
        first_page = reports.customer_timeline(session, user_id="ann", limit=2)
        second_page = reports.customer_timeline(session, user_id="ann", limit=2, offset=2)
    categories = sorted((r["category"], r["kind"]) for r in rows)
    assert categories == [("dispute", "open"), ("ledger", "pack_grant"), ("payment", "partially_refunded"),
                          ("refund", "partially_refunded")]
    refund = next(r for r in rows if r["category"] == "refund")
    assert refund["amount_cents"] == 1750
    ann = first_page + second_page
    assert {(r["category"], r["kind"]) for r in ann} == {("ledger", "pack_grant"), ("ledger", "spend"),
                                                         ("payment", "paid"), ("link", "open")}
    assert [r["at"] for r in ann] == sorted((r["at"] for r in ann), reverse=True)


def test_payments_filters_totals_and_csv(data):
    with db.read_session() as session:
        everything = reports.PaymentFilter()
        assert [t.count for t in reports.payments_totals(session, filters=everything)] == [4]
        packs = reports.PaymentFilter(item="pack")
        [totals] = reports.payments_totals(session, filters=packs)
        assert totals.currency == "usd"
        assert (totals.count, totals.amount_cents, totals.refunded_cents, totals.net_cents) == (2, 3500, 1750, 1750)
        recent = reports.PaymentFilter(start=NOW - timedelta(days=30), end=NOW, status="paid")
        assert [p["item"] for p in reports.payments_page(session, filters=recent)] == ["starter"]
        by_user = reports.PaymentFilter(user_id="bob", item="business")
        assert [p["amount_cents"] for p in reports.payments_page(session, filters=by_user)] == [9999]
        page = reports.payments_page(session, filters=everything, limit=2, offset=2)
        assert [p["item"] for p in page] == ["pack_100", "business"]  # newest first
        text = reports.payments_csv(session, filters=packs, tz_name="Europe/Berlin")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["item"] for r in rows] == ["pack_500", "pack_100"]
    assert rows[0]["amount_refunded"] == "1750" and rows[0]["created_at"].endswith("+02:00")


@pytest.mark.parametrize("user_id", ["=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx"])
def test_payments_csv_defuses_formulas(database_url, user_id):
    with db.write_session() as session:
        session.add_all([Account(user_id=user_id), Account(user_id="plain-user")])  # "=..." passes check_user_id; tab/CR ids only by direct insert
        session.flush()
        add_payment(session, user_id=user_id, item="pack_100", kind="pack", amount=1000, days_ago=1)
        add_payment(session, user_id="plain-user", item="pack_100", kind="pack", amount=1000, days_ago=2,
                    refunded=1000)
    with db.read_session() as session:
        text = reports.payments_csv(session, filters=reports.PaymentFilter(), tz_name="UTC")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["user_id"] for r in rows] == ["'" + user_id, "plain-user"]
    assert rows[1]["amount_cents"] == "1000" and rows[1]["amount_refunded"] == "1000"


def test_events_filters_and_detail(data):
    with db.read_session() as session:
        assert reports.events_count(session, filters=reports.EventFilter()) == 4
        attention = reports.events_page(session, filters=reports.EventFilter(status="needs_attention"))
        assert [e["id"] for e in attention] == ["evt_1"]
        assert "payload" not in attention[0]
        assert reports.events_count(session, filters=reports.EventFilter(type="invoice.")) == 2
        assert reports.events_count(session, filters=reports.EventFilter(type="charge.refunded")) == 2
        assert reports.events_count(session, filters=reports.EventFilter(user_id="ann")) == 1
        assert reports.event_types(session) == ["charge.refunded", "invoice.paid"]
        assert reports.event_detail(session, "evt_2")["payload"] == '{"id": "evt_2"}'
        assert reports.event_detail(session, "evt_nope") is None


def test_series_and_distribution(data):
    with db.read_session() as session:
        daily = reports.revenue_series(session, since=NOW - timedelta(days=60), until=NOW, tz_name="UTC")
        monthly = reports.revenue_series(session, since=NOW - timedelta(days=365), until=NOW, tz_name="UTC",
                                         granularity="month")
        mrr = reports.mrr_series(session, since=NOW - timedelta(days=365), until=NOW, tz_name="UTC")
        # ledger entries are dated when written (now), lots expire at their period's end
        flows = reports.credit_flows(session, since=NOW - timedelta(days=365), now=utcnow(), tz_name="UTC")
        distribution = reports.balance_distribution(session, now=NOW)
    assert {"period": "2026-06-14", "kind": "plan", "currency": "usd", "net_cents": 999} in daily
    assert {"period": "2026-06-13", "kind": "pack", "currency": "usd", "net_cents": 1750} in daily
    assert {"period": "2026-05-06", "kind": "plan", "currency": "usd", "net_cents": 9999} in daily
    assert {"period": "2026-06", "kind": "plan", "currency": "usd", "net_cents": 999} in monthly
    assert mrr == [
        {"period": "2026-06", "currency": "usd", "state": "active", "mrr_cents": 999, "new_cents": 999,
         "churned_cents": 0},
        {"period": "2026-06", "currency": "usd", "state": "past_due", "mrr_cents": 9999, "new_cents": 0,
         "churned_cents": 0}]
    flow = {(f["period"], f["flow"]): f["credits"] for f in flows}
    this_month = utcnow().strftime("%Y-%m")
    assert flow[(this_month, "spent")] == 50
    assert flow[(this_month, "granted")] == 2000 + 300 + 500 + 7
    assert flow[("2026-06", "expired")] == 2000  # bob's period ended on June 10 unspent
    buckets = {b["bucket"]: b["accounts"] for b in distribution}
    assert buckets["0"] == 1 and buckets["1–99"] == 1 and buckets["100–499"] == 1 and buckets["500–999"] == 1


def test_days_follow_the_operator_timezone(data):
    with db.read_session() as session:
        tokyo = reports.revenue_series(session, since=NOW - timedelta(days=60), until=NOW, tz_name="Asia/Tokyo")
    # 12:00 UTC is 21:00 in Tokyo: same day; a payment at 20:00 UTC would be the next day
    assert {"period": "2026-06-14", "kind": "plan", "currency": "usd", "net_cents": 999} in tokyo


def test_formatting():
    assert money(123450) == "$1,234.50" and money(-5) == "-$0.05" and money(100, "eur") == "€1.00"
    assert money(500, "jpy") == "¥500" and money(1234, "kwd") == "KWD1.234" and money(None) == "—"
    assert when(datetime(2026, 1, 1, 23, 30, tzinfo=timezone.utc), "Europe/Berlin") == "2026-01-02 00:30 CET"
    assert when(0, "UTC") == "1970-01-01 00:00 UTC" and when(None, "UTC") == "—"
    assert age(NOW - timedelta(hours=3), now=NOW) == "3 h ago" and age(None, now=NOW) == "never"
