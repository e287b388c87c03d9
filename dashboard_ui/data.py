"""Reads for the pages. Every aggregate comes from rollups and account totals the database keeps with
each write, so even a first load on a cold cache is quick; the caches (five minutes for credit totals,
cleared after the dashboard's own writes; a minute for revenue series) keep reruns from repeating it."""
from __future__ import annotations

from datetime import datetime, timedelta

import streamlit as st

from billing_core import db, reports
from billing_core.models import utcnow

LEDGER_AGGREGATE_TTL = 300
SERIES_TTL = 60


def read(url: str):
    return db.read_session(db.get_engine(url))


@st.cache_data(ttl=LEDGER_AGGREGATE_TTL, show_spinner=False)
def credits_outstanding(url: str) -> tuple[int, datetime]:
    now = utcnow()
    with read(url) as session:
        return reports.credits_outstanding(session, now=now), now


@st.cache_data(ttl=LEDGER_AGGREGATE_TTL, show_spinner=False)
def balance_distribution(url: str) -> list[dict]:
    with read(url) as session:
        return reports.balance_distribution(session)


@st.cache_data(ttl=LEDGER_AGGREGATE_TTL, show_spinner=False)
def credit_flows(url: str, since: datetime, tz_name: str) -> list[dict]:
    with read(url) as session:
        return reports.credit_flows(session, since=since, now=utcnow(), tz_name=tz_name)


@st.cache_data(ttl=SERIES_TTL, show_spinner=False)
def revenue(url: str, days: int, tz_name: str, until: datetime) -> dict:
    """Cash collected by day for `days` and by month for a year, MRR by month for a year and subscribers
    by tier, as of `until` (whole minutes, so reruns within a minute hit the cache)."""
    year_ago = until - timedelta(days=365)
    with read(url) as session:
        return {"daily": reports.revenue_series(session, since=until - timedelta(days=days), until=until,
                                                tz_name=tz_name),
                "monthly": reports.revenue_series(session, since=year_ago, until=until, tz_name=tz_name,
                                                  granularity="month"),
                "mrr": reports.mrr_series(session, since=year_ago, until=until, tz_name=tz_name),
                "subscriptions": reports.subscription_stats(session, now=until)}


def customer_ledger_csv(url: str, user_id: str, tz_name: str) -> str:
    """Built when the operator clicks download (a callable for st.download_button), not on each page run."""
    with read(url) as session:
        return reports.ledger_csv(session, user_id=user_id, tz_name=tz_name)


def expiring_csv(url: str, days: int, tz_name: str) -> str:
    """Every account with credits expiring in the window, built when the operator clicks download."""
    from billing_core import expiring

    with read(url) as session:
        report = expiring.expiring_credits(session, days=days, tz_name=tz_name)
    return expiring.expiring_csv(report, tz_name=tz_name)


def this_minute() -> datetime:
    return utcnow().replace(second=0, microsecond=0)


def clear_cached_aggregates() -> None:
    """After a write that changes balances, so the operator sees the new totals at once."""
    credits_outstanding.clear()
    balance_distribution.clear()
    credit_flows.clear()
    revenue.clear()
