"""Reads for the pages. The whole-ledger aggregates are cached for five minutes per database (and
cleared after the dashboard's own writes), revenue series for a minute, so a rerun (every widget
change) doesn't rescan a million ledger entries."""
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
    """Daily revenue for `days`, monthly for a year and subscribers by tier, as of `until` (whole minutes,
    so reruns within a minute hit the cache)."""
    with read(url) as session:
        return {"daily": reports.revenue_series(session, since=until - timedelta(days=days), until=until,
                                                tz_name=tz_name),
                "monthly": reports.revenue_series(session, since=until - timedelta(days=365), until=until,
                                                  tz_name=tz_name, granularity="month"),
                "subscriptions": reports.subscription_stats(session)}


def this_minute() -> datetime:
    return utcnow().replace(second=0, microsecond=0)


def clear_cached_aggregates() -> None:
    """After a write that changes balances, so the operator sees the new totals at once."""
    credits_outstanding.clear()
    balance_distribution.clear()
    credit_flows.clear()
    revenue.clear()
