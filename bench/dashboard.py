"""Dashboard speed at scale: each page's first load (cold caches) and rerun times on `demo-data --scale large` (100,000 accounts,
200,000 payments, 1,000,000 ledger entries), the report queries each page runs, and the
balance-with-breakdown query (ledger.account_summary) for one account among 100,000.

    .venv/bin/python bench/dashboard.py [--database-url sqlite:///data/bench_large.db] [--reruns 5]

The database is filled on first use (about two minutes) and reused afterwards. Pages run in Streamlit's
AppTest after signing in, as an operator's browser session would: the first load of a page with
Streamlit's data caches cleared, and then `--reruns` reruns, each timed around `at.run()`. A page is
`under_1s` only when its first load and every rerun are under a second. One JSON line per figure.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import ROOT, emit, machine, note  # noqa: E402

DEFAULT_URL = f"sqlite:///{ROOT / 'data' / 'bench_large.db'}"
OPERATOR = ("bench_admin", "bench-admin-password")
PAGES = {
    "home": None,
    "checkout_links": "pages/1_Checkout_links.py",
    "customers": "pages/2_Customers.py",
    "payments": "pages/3_Payments.py",
    "revenue_and_credits": "pages/4_Revenue_and_credits.py",
    "webhook_events": "pages/5_Webhook_events.py",
    "settings": "pages/6_Settings.py",
    "expiring_credits": "pages/7_Expiring_credits.py",
    "operators": "pages/8_Operators.py",
}


def missing_indexes(url: str) -> list[str]:
    """Indexes the models define that the database lacks (a database built before migration 0001 was
    regenerated reports itself current, yet measures the old schema)."""
    from sqlalchemy import inspect
    from sqlmodel import SQLModel

    from billing_core import db, models  # noqa: F401  (registers the tables)

    inspector = inspect(db.get_engine(url))
    missing = []
    for table in SQLModel.metadata.sorted_tables:
        present = {index["name"] for index in inspector.get_indexes(table.name)}
        missing += [f"{table.name}.{index.name}" for index in table.indexes if index.name not in present]
    return missing


def ensure_large_database(url: str) -> str:
    from sqlalchemy import func, select

    from billing_core import db
    from demo_data import fill_demo_database
    from billing_core.models import Account, LedgerEntry

    db.migrate(url)
    missing = missing_indexes(url)
    if missing and url == DEFAULT_URL:
        note(f"{url} predates the current schema (missing {', '.join(missing)}): building it again")
        db.dispose_engines()
        for suffix in ("", "-wal", "-shm"):
            Path(url.removeprefix("sqlite:///") + suffix).unlink(missing_ok=True)
        db.migrate(url)
    elif missing:
        raise SystemExit(f"error: {url} lacks indexes of the current schema: {', '.join(missing)}")
    with db.read_session(db.get_engine(url)) as session:
        accounts = session.execute(select(func.count()).select_from(Account)).scalar_one()
    if accounts < 100_000:
        note(f"filling {url} with demo-data --scale large (a few minutes)...")
        fill_demo_database(database_url=url, scale="large")
    with db.read_session(db.get_engine(url)) as session:
        accounts = session.execute(select(func.count()).select_from(Account)).scalar_one()
        entries = session.execute(select(func.count()).select_from(LedgerEntry)).scalar_one()
        sample = session.execute(select(Account.user_id).order_by(Account.user_id).offset(accounts // 2)
                                 .limit(1)).scalar_one()
    emit({"benchmark": "dashboard", "figure": "dataset", "accounts": accounts, "ledger_entries": entries,
          "machine": machine()})
    return sample


def ensure_operator(url: str) -> None:
    from billing_core import db
    from billing_core.operators import OperatorExists, create_operator

    try:
        with db.write_session(db.get_engine(url)) as session:
            create_operator(session, name=OPERATOR[0], role="admin", password=OPERATOR[1])
    except OperatorExists:
        pass


def timed(function, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def bench_queries(url: str, user_id: str, *, repeat: int) -> None:
    from billing_core import db, ledger, reports
    from billing_core.models import utcnow
    from billing_core.settings import get_settings

    settings = get_settings()
    engine = db.get_engine(url)
    now = utcnow()
    queries = {
        "ledger.account_summary (one account of 100,000)": lambda s: ledger.account_summary(s, user_id),
        "reports.overview (Home)": lambda s: reports.overview(s, settings=settings),
        "reports.credits_outstanding (Home, Revenue)": lambda s: reports.credits_outstanding(s),
        "reports.search_accounts (Customers, Checkout links)": lambda s: reports.search_accounts(s, user_id),
        "reports.account_overview (Customers)": lambda s: reports.account_overview(s, user_id=user_id),
        "reports.customer_timeline (Customers)": lambda s: reports.customer_timeline(s, user_id=user_id),
        "reports.ledger_csv (Customers, on click)": lambda s: reports.ledger_csv(s, user_id=user_id, tz_name="UTC"),
        "reports.payments_page (Payments)": lambda s: reports.payments_page(s, filters=reports.PaymentFilter()),
        "reports.payments_totals (Payments)": lambda s: reports.payments_totals(s, filters=reports.PaymentFilter()),
        "reports.payments_totals status=paid (Payments)": lambda s: reports.payments_totals(
            s, filters=reports.PaymentFilter(status="paid")),
        "reports.revenue_series 90 days (Revenue)": lambda s: reports.revenue_series(
            s, since=now - timedelta(days=90), until=now, tz_name="UTC"),
        "reports.revenue_series 12 months (Revenue)": lambda s: reports.revenue_series(
            s, since=now - timedelta(days=365), until=now, tz_name="UTC", granularity="month"),
        "reports.mrr_series 12 months (Revenue)": lambda s: reports.mrr_series(
            s, since=now - timedelta(days=365), until=now, tz_name="UTC"),
        "reports.credit_flows 12 months (Revenue)": lambda s: reports.credit_flows(
            s, since=now - timedelta(days=365), now=now, tz_name="UTC"),
        "reports.balance_distribution (Revenue)": lambda s: reports.balance_distribution(s),
        "reports.events_page (Webhook events)": lambda s: reports.events_page(s, filters=reports.EventFilter()),
        "reports.events_count (Webhook events)": lambda s: reports.events_count(s, filters=reports.EventFilter()),
        "reports.event_types (Webhook events)": lambda s: reports.event_types(s),
        "reports.recent_links (Checkout links)": lambda s: reports.recent_links(s),
    }
    for name, query in queries.items():
        def run(query=query):
            with db.read_session(engine) as session:
                query(session)
        try:
            times = timed(run, repeat)
        except Exception as exc:  # a report whose signature changed: say so, measure the rest
            emit({"benchmark": "dashboard", "query": name, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        emit({"benchmark": "dashboard", "query": name, "runs": repeat, "p50_ms": ms(statistics.median(times)),
              "max_ms": ms(max(times))})


def warm_up_imports() -> None:
    """Module imports and plotly's first figure are paid once per server process, not per page load:
    measured apart, so a page's first load is the cold-cache cost every operator meets."""
    started = time.perf_counter()
    import pandas  # noqa: F401
    import plotly.graph_objects as go

    go.Figure(go.Bar(x=[1], y=[1])).to_json()
    emit({"benchmark": "dashboard", "figure": "process_warm_up", "imports_and_first_figure_ms":
          ms(time.perf_counter() - started)})


def bench_pages(user_id: str, *, reruns: int) -> None:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    warm_up_imports()
    for name, path in PAGES.items():
        at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=120)
        at.run()
        at.text_input(key="sign_in_name").input(OPERATOR[0])
        at.text_input(key="sign_in_password").input(OPERATOR[1])
        next(b for b in at.button if b.label == "Sign in").click()
        at.run()  # signs in (a deliberately slow password hash) and shows Home: not part of any page's load
        st.cache_data.clear()  # every page's first load starts from cold caches, as after a restart
        started = time.perf_counter()
        if path:
            at.switch_page(path)
        at.run()
        if name == "customers":
            at.text_input(key="customer_query").input(user_id)
            at.run()
        first = time.perf_counter() - started
        errors = [str(e.value)[:200] for e in at.exception]
        times = timed(at.run, reruns)
        errors += [str(e.value)[:200] for e in at.exception]
        emit({"benchmark": "dashboard", "page": name, "first_load_ms": ms(first), "reruns": reruns,
              "rerun_p50_ms": ms(statistics.median(times)), "rerun_max_ms": ms(max(times)),
              "first_load_under_1s": first < 1.0, "reruns_under_1s": max(times) < 1.0,
              "under_1s": first < 1.0 and max(times) < 1.0, "exceptions": errors})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=DEFAULT_URL,
                        help="a database holding `demo-data --scale large` (filled when it holds fewer accounts)")
    parser.add_argument("--reruns", type=int, default=5)
    parser.add_argument("--skip-pages", action="store_true", help="only the queries")
    args = parser.parse_args(argv)

    for name in ("STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET", "STRIPE_API_BASE"):
        os.environ.pop(name, None)
    os.environ["BILLING_ENV_FILE"] = "/nonexistent/bench.env"
    os.environ["DATABASE_URL"] = args.database_url
    from billing_core.settings import reset_settings_cache

    reset_settings_cache()
    user_id = ensure_large_database(args.database_url)
    ensure_operator(args.database_url)
    bench_queries(args.database_url, user_id, repeat=max(3, args.reruns))
    if not args.skip_pages:
        bench_pages(user_id, reruns=args.reruns)
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
