"""Reads for the pages. The whole-ledger aggregates are cached for a minute per database, so a
rerun (every widget change) doesn't rescan a million ledger entries."""
from __future__ import annotations

from datetime import datetime

import streamlit as st

from billing_core import db, reports
from billing_core.models import utcnow

LEDGER_AGGREGATE_TTL = 60


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


def clear_cached_aggregates() -> None:
    """After a write that changes balances, so the operator sees the new totals at once."""
    credits_outstanding.clear()
    balance_distribution.clear()
    credit_flows.clear()
