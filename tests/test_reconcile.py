"""reconcile against the Stripe double's HTTP server on 127.0.0.1, on SQLite and PostgreSQL.

The fake Stripe account holds events the sidecar received and events it missed; reconcile must store and
apply exactly the missing ones, report what doesn't add up, and change nothing when run again.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from starlette.testclient import TestClient

from billing_core import cli, db, ledger
from billing_core.models import LedgerEntry, Payment, StripeEvent
from billing_core.reconcile import ReconcileError, check_since, parse_duration, reconcile
from billing_core.reconcile_cli import ProgressBar
from billing_core.settings import reset_settings_cache
from live_server import running_server
from wiring import wiring

import billing_core.events as events_module  # noqa: E402
import stripe_events  # noqa: E402
from billing_core.webapp import create_app  # noqa: E402
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DAY = 86400


# --- events, built with the webhook tests' builders (tests/stripe_events.py) -------------------

def pack_session(*, session_id: str, user_id: str | None, item: str = "pack_100") -> dict:
    return stripe_events.checkout_session(session_id=session_id, user_id=user_id, item=item,
                                          created=int(time.time()) - 600)


def starter_invoice(*, invoice_id: str, user_id: str, subscription_id: str, prices: dict, period_end: int) -> dict:
    return stripe_events.subscription_invoice(
        invoice_id=invoice_id, customer=f"cus_{user_id}", subscription_id=subscription_id, user_id=user_id,
        price=prices["starter"], period_start=period_end - 30 * DAY, period_end=period_end, amount=999,
        billing_reason="subscription_create", created=period_end - 30 * DAY)


def deliver_to_sidecar(events: list[dict]) -> None:
    """What the sidecar did receive: real signed deliveries to the webhook endpoint."""
    with TestClient(create_app()) as sidecar:
        for event in events:
            assert stripe_events.deliver(sidecar, event).status_code == 200


def ledger_size() -> int:
    with db.read_session() as session:
        return session.execute(select(func.count()).select_from(LedgerEntry)).scalar_one()


def stored_events() -> dict[str, StripeEvent]:
    with db.read_session() as session:
        return {row.id: row for row in session.exec(select(StripeEvent)).scalars()}


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["reconcile", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def stripe_account(database_url, stripe_server, stripe_prices, stripe_state, monkeypatch):
    """A Stripe account with a few days of history: some events the sidecar got, some it missed."""
    stripe_events.configure_webhooks(monkeypatch, prices=stripe_prices)
    now = int(time.time())
    state = stripe_state
    period_end = now + 20 * DAY
    carol_invoice = starter_invoice(invoice_id="in_carol1", user_id="carol", subscription_id="sub_carol",
                                    prices=stripe_prices, period_end=period_end)
    carol_subscription = stripe_events.subscription_object(
        subscription_id="sub_carol", customer="cus_carol", price=stripe_prices["starter"], user_id="carol",
        period_start=period_end - 30 * DAY, period_end=period_end)

    received = [
        state.add_event("checkout.session.completed", pack_session(session_id="cs_test_alice1", user_id="alice"),
                        created=now - 2 * DAY),
        state.add_event("customer.created", {"id": "cus_alice", "object": "customer"}, created=now - 2 * DAY),
    ]
    missed = [
        state.add_event("checkout.session.completed",
                        pack_session(session_id="cs_test_bob1", user_id="bob", item="pack_250"), created=now - DAY),
        state.add_event("customer.subscription.created", carol_subscription, created=now - 3600),
        state.add_event("invoice.paid", carol_invoice, created=now - 3600),
        # the same payment under its second type: applied once
        state.add_event("invoice.payment_succeeded", carol_invoice, created=now - 3600),
    ]
    # enough other events that the list needs more than one page of 100
    filler = [state.add_event("customer.updated", {"id": f"cus_f{n}", "object": "customer"}, created=now - 7200 - n)
              for n in range(109)]
    too_old = state.add_event("checkout.session.completed", pack_session(session_id="cs_test_old", user_id="dave"),
                              created=now - 5 * DAY)
    deliver_to_sidecar(received)
    return {"state": state, "received": received, "missed": missed, "filler": filler, "too_old": too_old,
            "prices": stripe_prices}


def tiers_and_balances() -> dict:
    with db.read_session() as session:
        return {user: (ledger.account_summary(session, user).tier, ledger.balance(session, user))
                for user in ("alice", "bob", "carol", "dave")}


EXPECTED = {"alice": ("none", 100), "bob": ("none", 250), "carol": ("starter", 100), "dave": ("none", 0)}


# --- durations --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [("30m", timedelta(minutes=30)), ("12h", timedelta(hours=12)),
                                            ("3d", timedelta(days=3)), (" 30D ", timedelta(days=30))])
def test_durations(text, expected):
    assert parse_duration(text) == expected
    assert check_since(text) == expected


@pytest.mark.parametrize("text, message", [("31d", "beyond the 30 days"), ("721h", "beyond the 30 days"),
                                           ("0h", "is zero"), ("3", "cannot read"), ("3w", "cannot read"),
                                           ("-1d", "cannot read"), ("", "cannot read"), ("1.5d", "cannot read")])
def test_bad_durations_are_refused(text, message):
    with pytest.raises(ReconcileError, match=message):
        check_since(text)


def test_cli_refuses_since_beyond_30_days_in_one_line(database_url, capsys):
    code, out, err = run_cli(capsys, "--since", "45d")
    assert code == 1 and out == ""
    assert err == "error: --since 45d reaches beyond the 30 days for which Stripe keeps events; use at most 30d\n"


# --- recovery ---------------------------------------------------------------------------------

def test_recovers_exactly_the_missed_events_and_the_second_run_changes_nothing(stripe_account, capsys):
    state = stripe_account["state"]
    missed_ids = {e["id"] for e in stripe_account["missed"]} | {e["id"] for e in stripe_account["filler"]}

    code, out, err = run_cli(capsys, "--since", "3d", "--json")
    report = json.loads(out)
    assert err == ""  # no progress bar when stderr is not a terminal
    assert code == 0, report
    assert report["events"] == {"seen": 115, "already_stored": 2, "recovered": 113, "arrived_meanwhile": 0,
                                "failed": 0}
    assert {row["id"] for row in report["recovered"]} == missed_ids
    assert report["ok"] is True and report["problems"] == 0

    stored = stored_events()
    assert stripe_account["too_old"]["id"] not in stored
    assert {eid for eid, row in stored.items() if row.source == "reconcile"} == missed_ids
    assert all(stored[e["id"]].source == "webhook" for e in stripe_account["received"])
    assert tiers_and_balances() == EXPECTED

    # Stripe's paging: created[gte] for the window, 100 a page, then starting_after the last one seen
    pages = state.requests_to("GET", "/v1/events")
    assert len(pages) == 2
    assert pages[0].params["limit"] == "100" and "gte" in pages[0].params["created"]
    window = [e for e in state.objects["events"].values() if e["created"] >= int(pages[0].params["created"]["gte"])]
    hundredth = sorted(window, key=lambda e: (e["created"], e["_seq"]), reverse=True)[99]
    assert pages[1].params["starting_after"] == hundredth["id"]
    assert pages[1].params["created"] == pages[0].params["created"]

    entries_before = ledger_size()
    code, out, _ = run_cli(capsys, "--since", "3d", "--json")
    again = json.loads(out)
    assert code == 0
    assert again["events"] == {"seen": 115, "already_stored": 115, "recovered": 0, "arrived_meanwhile": 0,
                               "failed": 0}
    assert ledger_size() == entries_before
    assert tiers_and_balances() == EXPECTED


def test_recovered_invoice_records_its_payment_once(stripe_account):
    reconcile(**wiring(), since=timedelta(days=3))
    with db.read_session() as session:
        payment = session.exec(select(Payment).where(Payment.invoice_id == "in_carol1")).scalars().one()
        grants = session.execute(select(func.count()).select_from(LedgerEntry).where(
            LedgerEntry.payment_id == payment.id)).scalar_one()
    assert payment.status == "paid" and payment.credits_granted == 100 and grants == 1


def test_safe_while_the_sidecar_receives_the_same_events(stripe_account):
    """Stripe redelivers the missed events to the running sidecar while reconcile recovers them:
    each is stored and applied once."""
    late_deliveries = list(stripe_account["missed"]) + list(stripe_account["filler"][:20])
    start = threading.Barrier(3)
    answers: list[int] = []

    def stripe_retrying(base_url: str, events: list[dict]) -> None:
        with httpx.Client(base_url=base_url, timeout=60) as http:
            start.wait()
            for event in events:
                body = stripe_events.encode(event)
                answers.append(http.post("/api/stripe/webhook", content=body,
                                         headers=stripe_events.signed_headers(body)).status_code)

    with running_server(create_app()) as base_url:
        threads = [threading.Thread(target=stripe_retrying, args=(base_url, late_deliveries)),
                   threading.Thread(target=stripe_retrying, args=(base_url, list(reversed(late_deliveries))))]
        for thread in threads:
            thread.start()
        start.wait()
        report = reconcile(**wiring(), since=timedelta(days=3))
        for thread in threads:
            thread.join()

    assert answers == [200] * (2 * len(late_deliveries))
    counts = report.as_dict()["events"]
    assert counts["failed"] == 0
    assert counts["already_stored"] + counts["recovered"] + counts["arrived_meanwhile"] == counts["seen"] == 115
    assert len(stored_events()) == 115
    assert tiers_and_balances() == EXPECTED
    with db.read_session() as session:
        assert session.execute(select(func.count()).select_from(Payment)).scalar_one() == 3
    assert reconcile(**wiring(), since=timedelta(days=3)).as_dict()["events"]["recovered"] == 0


def test_narrow_window_leaves_older_missed_events_alone(stripe_account):
    report = reconcile(**wiring(), since=timedelta(minutes=90))
    assert {row["id"] for row in report.recovered} == {e["id"] for e in stripe_account["missed"][1:]}
    assert tiers_and_balances() == EXPECTED | {"bob": ("none", 0)}


# --- the report -------------------------------------------------------------------------------

def test_reports_paid_session_without_grant_and_the_event_needing_attention(stripe_account, capsys):
    orphan = stripe_account["state"].add_event(
        "checkout.session.completed", pack_session(session_id="cs_test_nouser", user_id=None),
        created=int(time.time()) - 60)
    code, out, _ = run_cli(capsys, "--since", "3d", "--json")
    report = json.loads(out)
    assert code == 3
    assert [row["session_id"] for row in report["paid_sessions_without_grant"]] == ["cs_test_nouser"]
    assert report["paid_sessions_without_grant"][0]["event_id"] == orphan["id"]
    assert [row["id"] for row in report["stored_needing_attention"]] == [orphan["id"]]
    assert report["stored_needing_attention"][0]["status"] == "needs_attention"
    assert report["paid_invoices_without_grant"] == []
    assert report["problems"] == 2 and report["ok"] is False


def test_reports_paid_invoice_without_grant(stripe_account):
    """An invoice for a price that isn't configured can't be granted: it needs attention, and is reported."""
    invoice = starter_invoice(invoice_id="in_erin1", user_id="erin", subscription_id="sub_erin",
                              prices={"starter": "price_not_configured"}, period_end=int(time.time()) + 9 * DAY)
    event = stripe_account["state"].add_event("invoice.paid", invoice, created=int(time.time()) - 60)
    deliver_to_sidecar([event])
    report = reconcile(**wiring(), since=timedelta(days=3))
    assert [row["invoice_id"] for row in report.paid_invoices_without_grant] == ["in_erin1"]
    row = report.paid_invoices_without_grant[0]
    assert (row["user_id"], row["subscription_id"], row["event_id"]) == ("erin", "sub_erin", event["id"])
    assert [row["id"] for row in report.stored_needing_attention] == [event["id"]]
    assert report.paid_sessions_without_grant == [] and report.applied_twice == []


def test_reports_grants_without_payment_and_double_grants(stripe_account):
    reconcile(**wiring(), since=timedelta(days=3))
    with db.write_session() as session:
        ledger.grant_pack(session, user_id="mallory", credits=500, source_key="mystery-grant")
        payment = session.exec(select(Payment).where(Payment.checkout_session_id == "cs_test_bob1")).scalars().one()
        ledger.grant_pack(session, user_id="bob", credits=250, source_key="checkout:cs_test_bob1:again",
                          payment_id=payment.id)
        payment_id = payment.id
    report = reconcile(**wiring(), since=timedelta(days=3))
    assert report.recovered == []
    assert [(row["user_id"], row["source_key"]) for row in report.grants_without_payment] == [
        ("mallory", "mystery-grant")]
    assert [(row["what"], row["payment_id"], row["grants"], row["credits"]) for row in report.applied_twice] == [
        ("pack granted more than once for one payment", payment_id, 2, 500)]


def test_reports_credit_lots_that_dont_match_their_entries(stripe_account, capsys):
    from sqlalchemy import update

    from billing_core.models import CreditLot

    reconcile(**wiring(), since=timedelta(days=3))
    assert reconcile(**wiring(), since=timedelta(days=3)).ledger_mismatches == []
    with db.write_session() as session:
        session.execute(update(CreditLot).where(CreditLot.lot_key == "checkout:cs_test_bob1").values(remaining=1))
    report = reconcile(**wiring(), since=timedelta(days=3))
    # the lot, and bob's balance that no longer equals his open lots
    assert [(row["what"], row["user_id"], row.get("lot_key")) for row in report.ledger_mismatches] == [
        ("lot", "bob", "checkout:cs_test_bob1"), ("account", "bob", None)]
    assert report.problems == 2
    code, out, _err = run_cli(capsys, "--since", "3d")
    assert code == 3 and "credit lots and account totals that don't match their entries (`check-ledger`): 2" in out


def test_text_report(stripe_account, capsys):
    code, out, err = run_cli(capsys, "--since", "3d")
    assert code == 0 and err == ""
    assert out.splitlines()[0].endswith("115 seen, 2 already stored, 113 recovered")
    assert "paid Checkout Sessions without their grant: 0" in out
    assert out.rstrip().endswith("nothing needs attention")


def test_stripe_unreachable_is_one_line_error(database_url, monkeypatch, capsys):
    monkeypatch.setenv("STRIPE_SECRET_KEY", "sk_test_51UnreachableKey0000000000zz99")
    monkeypatch.setenv("STRIPE_API_BASE", "http://127.0.0.1:9")
    reset_settings_cache()
    code, out, err = run_cli(capsys, "--since", "1h", "--json")
    assert code == 1 and out == ""
    assert err.startswith("error: listing Stripe events failed: Stripe is unreachable") and err.count("\n") == 1
    assert "zz99" not in err.replace("…zz99", "")  # the key shows only masked, if at all


def test_stripe_not_configured_is_refused(database_url, capsys):
    code, out, err = run_cli(capsys, "--json")
    assert code == 1 and out == "" and "STRIPE_SECRET_KEY" in err


# --- progress and the real command ------------------------------------------------------------

class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_only_on_a_terminal():
    pipe = io.StringIO()
    bar = ProgressBar(pipe)
    bar("fetching", 100, None)
    bar.finish()
    assert pipe.getvalue() == ""

    terminal = FakeTerminal()
    bar = ProgressBar(terminal)
    bar("fetching", 100, None)
    bar("processing", 5, 10)
    bar.finish()
    drawn = terminal.getvalue()
    assert "fetching events from Stripe: 100" in drawn
    assert "processing events [" + "#" * 15 + "." * 15 + "] 5/10" in drawn
    assert drawn.endswith("\r")


def test_module_command_prints_exactly_one_json_object(stripe_account, database_url):
    environ = {**os.environ, "DATABASE_URL": database_url}
    result = subprocess.run([sys.executable, "-m", "billing_core", "reconcile", "--since", "3d", "--json"],
                            cwd=PROJECT_ROOT, env=environ, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.count("\n") == 1
    report = json.loads(result.stdout)
    assert report["events"]["recovered"] == 113
    assert set(report) == {"since", "until", "events", "recovered", "recovery_errors", "stored_needing_attention",
                           "paid_sessions_without_grant", "paid_invoices_without_grant", "grants_without_payment",
                           "applied_twice", "ledger_mismatches", "problems", "ok"}


def test_an_event_stored_but_never_processed_is_reported_once_it_is_no_longer_in_flight(stripe_account):
    from billing_core.models import utcnow

    now = int(time.time())
    with db.write_session() as session:
        for event_id, age in (("evt_stuck_old", timedelta(minutes=30)), ("evt_in_flight", timedelta(seconds=5))):
            session.add(StripeEvent(id=event_id, type="invoice.paid", created=now - 60, payload="{}",
                                    status="received", received_at=utcnow() - age, source="webhook"))
    report = reconcile(**wiring(), since=timedelta(days=3))
    assert [(row["id"], row["status"]) for row in report.stored_needing_attention] == [("evt_stuck_old", "received")]
