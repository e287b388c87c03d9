"""The large demo data set follows the ledger's model: a small slice of it checked against the ledger."""
import pytest
from sqlalchemy import func, select, text

from billing_core import db, ledger, reports
from billing_core.ledger_check import check_ledger
from demo_data import large as demo_large
from billing_core.catalog import CATALOG
from billing_core.models import (Account, CheckoutLink, Consumption, LedgerEntry, Payment, StripeEvent, Subscription,
                                 from_epoch, utcnow)


def test_large_demo_slice_is_consistent(database_url):
    summary = demo_large.fill_large(database_url, seed=11, accounts=150)
    assert "150 accounts, 300 payments, 1,500 ledger entries" in summary
    engine = db.get_engine(database_url)
    with engine.connect() as conn:
        overdrawn = conn.execute(text(
            "SELECT COUNT(*) FROM (SELECT lot_key FROM ledger_entry WHERE lot_key IS NOT NULL "
            "GROUP BY lot_key HAVING SUM(credits) < 0) AS lots")).scalar_one()
        orphans = conn.execute(text(
            "SELECT COUNT(*) FROM ledger_entry e WHERE e.lot_key IS NOT NULL AND NOT EXISTS "
            "(SELECT 1 FROM ledger_entry g WHERE g.source_key = e.lot_key AND g.lot_source IS NOT NULL "
            "AND g.user_id = e.user_id)")).scalar_one()
        late = conn.execute(text(
            "SELECT COUNT(*) FROM ledger_entry e JOIN ledger_entry x ON x.lot_key = e.lot_key AND x.kind = 'expire' "
            "WHERE e.created_at > x.created_at")).scalar_one()
    assert overdrawn == 0  # nothing takes more than its lot holds
    assert orphans == 0  # every lot key names a grant of the same account
    assert late == 0  # nothing is added to or drawn from a lot after it was closed
    with db.read_session(engine) as session:
        spends = session.execute(select(func.count()).select_from(LedgerEntry)
                                 .where(LedgerEntry.kind == "spend")).scalar_one()
        assert session.execute(select(func.count()).select_from(Consumption)).scalar_one() == spends
        total = 0
        for (user_id,) in session.execute(select(Account.user_id)).all():
            summary = ledger.account_summary(session, user_id)
            assert summary.balance >= 0
            assert summary.balance == sum(row["credits"] for row in summary.breakdown)
            total += summary.balance
        assert reports.credits_outstanding(session) == total
        flagged = session.execute(select(Account.user_id).where(Account.flagged.is_(True))).scalars().all()
        for user_id in flagged:
            assert session.get(Account, user_id).open_disputes == 1
        granted = session.execute(select(func.sum(Payment.credits_granted))).scalar_one()
        grants = session.execute(select(func.sum(LedgerEntry.credits)).where(
            LedgerEntry.kind.in_(("pack_grant", "subscription_grant")))).scalar_one()
        assert granted == grants
        assert check_ledger(session).mismatches == []  # lots and account totals filled as the ledger keeps them
        # the Webhook events and Checkout links pages have rows at scale too
        assert session.execute(select(func.count()).select_from(StripeEvent)).scalar_one() == 450
        assert session.execute(select(func.count()).select_from(CheckoutLink)).scalar_one() == 75
        # MRR as the triggers keep it agrees with the subscriptions' state: active ones in MRR, past due apart
        now = utcnow()
        stats = reports.subscription_stats(session, now=now)
        billed = {status: sum(CATALOG[sub.tier].amount_cents for sub in session.execute(
            select(Subscription).where(Subscription.status == status)).scalars()
            if status == "past_due" or reports.hour_key(from_epoch(sub.current_period_end)) > reports.hour_key(now))
            for status in ("active", "past_due")}
        assert stats.mrr.get("usd", 0) == billed["active"] > 0
        assert stats.past_due_mrr.get("usd", 0) == billed["past_due"]


def test_large_demo_refuses_a_second_fill(sqlite_url):
    demo_large.fill_large(sqlite_url, seed=1, accounts=10)
    with pytest.raises(demo_large.LargeDemoExists, match="already in this database"):
        demo_large.fill_large(sqlite_url, seed=1, accounts=10)
