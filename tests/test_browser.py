"""The dashboard in a real headless Chromium: `streamlit run Home.py` on a seeded database with Stripe
pointed at the local Stripe double; sign in, visit every page, make a link and an adjustment, and save
a screenshot of each page (artifacts/screenshots/; `UPDATE_DOCS_SCREENSHOTS=1` refreshes the README's
docs/screenshots/)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import select

from billing_core import db
from billing_core.models import CheckoutLink, LedgerEntry
from dashboard_helpers import ADMIN, ROOT, seeded_db, seeded_template  # noqa: F401

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "artifacts" / "screenshots"
DOCS = ROOT / "docs" / "screenshots"
TIMEOUT_MS = 30_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium "
                                                      "(apt-get install -y chromium; .ci/run does this)"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def dashboard(seeded_db, stripe_server, stripe_prices, tmp_path):
    """`streamlit run Home.py` as a real process on the seeded database; yields its URL."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": seeded_db, "BILLING_ENV_FILE": str(tmp_path / "none.env"),
           "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "streamlit.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "Home.py", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"streamlit did not start:\n{(tmp_path / 'streamlit.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@contextmanager
def chromium_page(*, width: int, height: int):
    """A page of Debian's headless Chromium (driven by Playwright) with a viewport of this size."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-extensions", "--no-first-run"])
        context = browser.new_context(viewport={"width": width, "height": height})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        try:
            yield page
        finally:
            context.close()
            browser.close()


@pytest.fixture
def browser_page():
    with chromium_page(width=1440, height=1400) as page:
        yield page


def sign_in_as_admin(page) -> None:
    """Fill in the sign-in form as the seeded admin and wait for Home."""
    page.get_by_label("User name").fill(ADMIN[0])
    page.get_by_label("Password", exact=True).fill(ADMIN[1])
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="Billing console").wait_for()


def open_customer(page, user_id: str) -> None:
    """Sign in, then find the account on Customers."""
    sign_in_as_admin(page)
    settle(page)
    visit(page, "Customers", "Customers")
    search = page.get_by_label("Search by user id, email or Stripe customer id")
    search.fill(user_id)
    search.press("Enter")


def settle(page) -> None:
    """Wait until Streamlit has finished the current run."""
    page.wait_for_timeout(300)
    page.wait_for_selector('[data-testid="stStatusWidget"]', state="detached", timeout=TIMEOUT_MS)
    page.wait_for_timeout(200)


def screenshot(page, name: str) -> None:
    """Into artifacts/screenshots/; into docs/screenshots/ (the README's) when missing there or when
    UPDATE_DOCS_SCREENSHOTS=1, so a test run doesn't leave changed images in the working tree."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    docs = DOCS / f"{name}.png"
    if os.environ.get("UPDATE_DOCS_SCREENSHOTS") == "1" or not docs.exists():
        DOCS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, docs)


def visit(page, link_text: str, heading: str) -> None:
    page.get_by_test_id("stSidebarNav").get_by_role("link", name=link_text).click()
    page.get_by_role("heading", name=heading).first.wait_for()
    settle(page)


def test_dashboard_in_chromium(dashboard, browser_page, seeded_db, stripe_server):
    page = browser_page
    page.goto(dashboard)
    page.get_by_role("heading", name="Sign in").wait_for()
    assert page.get_by_text("$").count() == 0  # nothing with amounts before sign-in
    screenshot(page, "sign-in")

    sign_in_as_admin(page)
    page.get_by_text("MRR").first.wait_for()
    settle(page)
    assert page.get_by_text("TEST MODE").count() >= 1
    screenshot(page, "home")

    visit(page, "Checkout links", "Checkout links")
    page.get_by_label("User id or email").fill("browser_user_1")
    page.get_by_label("User id or email").press("Enter")
    settle(page)
    page.get_by_text("100 credits · $10.00 once").click()
    settle(page)
    page.get_by_role("button", name="Generate link").click()
    page.get_by_text("Checkout link for").wait_for()
    settle(page)
    screenshot(page, "checkout-links")
    with db.read_session(db.get_engine(seeded_db)) as session:
        link = session.execute(select(CheckoutLink).where(CheckoutLink.user_id == "browser_user_1")).scalars().one()
    assert (link.item, link.operator) == ("pack_100", "alice")
    page.get_by_text(link.url).first.wait_for()  # the code box renders after the success message
    assert page.get_by_text(link.url).count() >= 1
    assert stripe_server.state.requests_to("POST", "/v1/checkout/sessions")

    visit(page, "Customers", "Customers")
    page.get_by_label("Search by user id, email or Stripe customer id").fill("demo_user_0003")
    page.get_by_label("Search by user id, email or Stripe customer id").press("Enter")
    page.get_by_text("Manual adjustment").wait_for()
    settle(page)
    page.get_by_label("Credits").fill("42")
    page.get_by_label("Reason", exact=True).fill("browser test goodwill")
    page.get_by_text("I confirm this adjustment").click()
    page.get_by_role("button", name="Apply adjustment").click()
    page.get_by_text("Adjusted demo_user_0003 by +42 credits").wait_for()
    settle(page)
    screenshot(page, "customers")
    with db.read_session(db.get_engine(seeded_db)) as session:
        entry = session.execute(select(LedgerEntry).where(LedgerEntry.reason == "browser test goodwill")
                                ).scalars().one()
    assert (entry.user_id, entry.credits, entry.operator) == ("demo_user_0003", 42, "alice")

    visit(page, "Payments", "Payments")
    page.get_by_text("Download CSV").wait_for()
    screenshot(page, "payments")

    visit(page, "Revenue and credits", "Revenue & credits")
    page.locator(".js-plotly-plot").first.wait_for()
    page.wait_for_timeout(1000)  # let the charts draw
    screenshot(page, "revenue-and-credits")

    visit(page, "Webhook events", "Webhook events")
    screenshot(page, "webhook-events")

    visit(page, "Settings", "Settings")
    page.get_by_text("stripe listen --forward-to").first.wait_for()
    assert page.get_by_text("sk_test_…a1b2").count() >= 1  # masked, never whole
    screenshot(page, "settings")

    for name in ("sign-in", "home", "checkout-links", "customers", "payments", "revenue-and-credits",
                 "webhook-events", "settings"):
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 10_000


class PixelServer:
    """A local HTTP server standing in for an attacker's image host; counts every request it gets."""

    def __init__(self):
        import http.server
        import threading

        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_markdown_in_untrusted_text_is_shown_as_text_and_fetches_nothing(dashboard, browser_page, seeded_db):
    """A user id, an email and an event error holding Markdown images: each shown as the literal text, and the
    browser sends no request for any of the images."""
    from billing_core.models import Account, StripeEvent

    pixel = PixelServer()
    user_id = f"![u]({pixel.url}/user.png)"
    email = f"![e]({pixel.url}/email.png)"
    error = f"can't tell the user ![x]({pixel.url}/error.png) <img src='{pixel.url}/html.png'>"
    with db.write_session(db.get_engine(seeded_db)) as session:
        session.add(Account(user_id=user_id, email=email))
        session.add(StripeEvent(id="evt_markdown_1", type="checkout.session.completed", payload="{}",
                                status="needs_attention", error=error))
    page = browser_page
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    try:
        page.goto(dashboard)
        open_customer(page, user_id)
        page.get_by_role("heading", name=user_id).wait_for()  # the literal text, as a heading
        page.get_by_text(f"Email {email}").wait_for()
        settle(page)
        assert page.locator("img[src*='127.0.0.1:%d']" % int(pixel.url.rsplit(":", 1)[1])).count() == 0

        visit(page, "Webhook events", "Webhook events")
        page.get_by_text("evt_markdown_1").first.click()
        page.get_by_test_id("stText").get_by_text(error).wait_for()
        settle(page)
        page.wait_for_timeout(1000)  # time for any image request to leave
    finally:
        pixel.close()
    assert [url for url in requested if url.startswith(pixel.url)] == []
    assert pixel.hits == []
