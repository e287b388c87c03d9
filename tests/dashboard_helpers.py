"""Shared by the dashboard tests: seeded operators and a signed-in AppTest."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from billing_core import db
from demo_data import fill_demo_database
from billing_core.operators import create_operator
from db_copies import configured_sqlite_copy

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / "Home.py"
PAGES = {
    "links": "pages/1_Checkout_links.py",
    "customers": "pages/2_Customers.py",
    "payments": "pages/3_Payments.py",
    "revenue": "pages/4_Revenue_and_credits.py",
    "events": "pages/5_Webhook_events.py",
    "settings": "pages/6_Settings.py",
    "operators": "pages/7_Operators.py",
}
ADMIN = ("alice", "correct-horse-battery")
SUPPORT = ("sam", "support-password-1")


def add_operators(url: str) -> None:
    with db.write_session(db.get_engine(url)) as session:
        create_operator(session, name=ADMIN[0], role="admin", password=ADMIN[1])
        create_operator(session, name=SUPPORT[0], role="support", password=SUPPORT[1])


def open_app(timeout: float = 30) -> AppTest:
    return AppTest.from_file(str(HOME), default_timeout=timeout)


def sign_in(at: AppTest, name: str, password: str) -> AppTest:
    at.run()
    at.text_input(key="sign_in_name").input(name)
    at.text_input(key="sign_in_password").input(password)
    next(b for b in at.button if b.label == "Sign in").click()
    return at.run()


def signed_in(credentials=ADMIN, page: str | None = None) -> AppTest:
    at = sign_in(open_app(), *credentials)
    assert not at.exception, [e.value for e in at.exception]
    if page:
        at.switch_page(PAGES[page]).run()
    return at


def texts(at: AppTest) -> str:
    """Everything the page shows as text, for `in` checks."""
    parts = []
    for kind in ("title", "header", "subheader", "markdown", "caption", "text", "info", "warning", "error",
                 "success", "metric", "code"):
        for element in getattr(at, kind):
            parts.append(str(getattr(element, "value", "")))
            parts.append(str(getattr(element, "label", "")))
    return "\n".join(parts)


@pytest.fixture(autouse=True)
def fresh_sign_in_throttle_and_caches():
    """The cached aggregates live process-wide, keyed by database URL, and the PostgreSQL URL is the same for
    every test of a run; each test starts with none. (Sign-in failures live in each test's own database.)"""
    from dashboard_ui import data

    data.clear_cached_aggregates()
    yield
    data.clear_cached_aggregates()


@pytest.fixture(scope="session")
def seeded_template(tmp_path_factory, sqlite_template) -> Path:
    """A migrated SQLite database with the small demo data set and two operators, built once."""
    path = tmp_path_factory.mktemp("dashboard") / "seeded.db"
    shutil.copy(sqlite_template, path)
    url = f"sqlite:///{path}"
    fill_demo_database(database_url=url)
    add_operators(url)
    db._engines.pop(url).dispose()
    return path


@pytest.fixture
def seeded_db(seeded_template, tmp_path, monkeypatch) -> str:
    """A fresh copy of the seeded database, configured as DATABASE_URL."""
    with configured_sqlite_copy(seeded_template, tmp_path / "seeded.db", monkeypatch) as url:
        yield url
