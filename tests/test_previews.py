"""Dry-run replay (`replay EVENT_ID --dry-run`): the diff an event would make, computed by the real handler
in a transaction that is rolled back; the database is byte-for-byte unchanged (SQLite: iterdump(); PostgreSQL:
every row of every table). Expiring credits and API-version drift too."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

import stripe

from billing_core import db, expiring, ledger, previews
from billing_core.api_versions import check_webhook_endpoints, recent_event_versions
from billing_core.handlers import EVENT_TYPES
from billing_core.models import StripeEvent, utcnow
from billing_core.settings import PROJECT_ROOT, get_settings
from db_dump import database_dump
from wiring import wiring
from stripe_events import (send, DEFAULT_PRICES, charge_refunded, checkout_completed, event, invoice_paid,
                           subscription_invoice)


def preview_event(event_id, **kw):
    return previews.preview_event(event_id, **kw, **wiring())


def cli(*args):
    return subprocess.run([sys.executable, "-m", "billing_core", *args], capture_output=True, text=True,
                          env=dict(os.environ), cwd=PROJECT_ROOT, timeout=120)


def unassigned_pack(tag="x") -> dict:
    """A paid pack whose session names no user: kept as needs-attention."""
    evt = checkout_completed(user_id="", item="pack_500", session_id=f"cs_test_{tag}", payment_intent=f"pi_{tag}",
                             customer=f"cus_{tag}")
    evt["data"]["object"]["client_reference_id"] = None
    evt["data"]["object"]["metadata"] = {"item": "pack_500"}
    return evt


def test_preview_with_an_assigned_user_shows_the_grant_and_changes_nothing(sidecar, database_url):
    evt = unassigned_pack()
    assert send(sidecar, evt)["status"] == "needs_attention"
    before = database_dump(database_url)
    preview = preview_event(evt["id"], assigned_user_id="u9")
    assert database_dump(database_url) == before
    data = preview.as_dict()
    assert (data["event_id"], data["status_before"], data["status_after"]) == (evt["id"], "needs_attention",
                                                                              "processed")
    [account] = data["accounts"]
    assert (account["user_id"], account["balance_before"], account["balance_after"]) == ("u9", 0, 500)
    assert (account["tier_before"], account["tier_after"]) == ("none", "none")
    assert [(e["credits"], e["kind"]) for e in account["entries"]] == [(500, "pack_grant")]
    assert {(c["table"], c["field"], c["after"]) for c in data["changes"]} >= {("payment", "status", "paid"),
                                                                               ("payment", "credits_granted", 500)}


def test_preview_without_a_user_says_it_would_still_need_attention(sidecar):
    evt = unassigned_pack("y")
    send(sidecar, evt)
    preview = preview_event(evt["id"])
    assert preview.status_after == "needs_attention" and "can't tell which user" in preview.reason_after
    assert preview.accounts == [] and not preview.changes_anything


def test_preview_of_a_refund_and_of_an_already_applied_event(sidecar, database_url):
    send(sidecar, checkout_completed(user_id="u1", item="pack_500", session_id="cs_test_p", payment_intent="pi_p"))
    refund = charge_refunded(charge_id="ch_p", payment_intent="pi_p", amount=3500, amount_refunded=3500)
    with db.write_session() as session:  # stored, not yet processed (as if the process died mid-way)
        session.add(StripeEvent(id=refund["id"], type=refund["type"], api_version=refund["api_version"],
                                created=refund["created"], payload=json.dumps(refund), status="received"))
    before = database_dump(database_url)
    data = preview_event(refund["id"]).as_dict()
    assert database_dump(database_url) == before
    [account] = data["accounts"]
    assert (account["balance_before"], account["balance_after"], account["flagged_after"]) == (500, 0, False)
    assert [(e["credits"], e["kind"]) for e in account["entries"]] == [(-500, "clawback")]
    assert ("payment", "status", "refunded") in {(c["table"], c["field"], c["after"]) for c in data["changes"]}
    send(sidecar, refund)
    again = preview_event(refund["id"])
    assert again.status_after == "processed" and not again.changes_anything


def test_preview_of_a_first_invoice_shows_the_tier(sidecar, database_url):
    now = int(utcnow().timestamp())
    lines = subscription_invoice(invoice_id="in_t", customer="cus_t", subscription_id="sub_t", user_id="u2",
                                 price=DEFAULT_PRICES["starter"], period_start=now - 10, period_end=now + 86400 * 30,
                                 amount=999, billing_reason="subscription_create")["lines"]["data"]
    evt = invoice_paid(invoice_id="in_t", customer="cus_t", subscription_id="sub_t", user_id="u2",
                       billing_reason="subscription_create", lines=lines)
    with db.write_session() as session:
        session.add(StripeEvent(id=evt["id"], type=evt["type"], api_version=evt["api_version"],
                                created=evt["created"], payload=json.dumps(evt), status="failed"))
    before = database_dump(database_url)
    [account] = preview_event(evt["id"]).accounts
    assert database_dump(database_url) == before
    assert (account.tier_before, account.tier_after) == ("none", "starter")
    assert account.balance_after > 0 and account.entries[0]["kind"] == "subscription_grant"


def test_replay_dry_run_cli_prints_the_diff_and_commits_nothing(sidecar, database_url):
    evt = unassigned_pack("z")
    send(sidecar, evt)
    before = database_dump(database_url)
    result = cli("replay", evt["id"], "--user", "u7", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["event_id"] == evt["id"] and data["status_after"] == "processed"
    assert data["accounts"][0]["user_id"] == "u7" and data["accounts"][0]["entries"][0]["credits"] == 500
    text = cli("replay", evt["id"], "--user", "u7", "--dry-run")
    assert text.returncode == 0 and "needs_attention -> processed" in text.stdout and "+500 pack_grant" in text.stdout
    assert database_dump(database_url) == before
    unknown = cli("replay", "evt_nope", "--dry-run")
    assert unknown.returncode == 1 and unknown.stderr.strip() == "error: no stored event evt_nope"


# --- expiring credits -------------------------------------------------------------------------

def grant_period(user: str, *, ends_in_days: float, tier: str = "starter", sub: str | None = None) -> int:
    period_end = int((utcnow() + timedelta(days=ends_in_days)).timestamp())
    with db.write_session() as session:
        entry = ledger.grant_subscription_period(session, user_id=user, subscription_id=sub or f"sub_{user}",
                                                 period_end=period_end, tier=tier, payment_id=None,
                                                 source_key=f"test:{user}:{period_end}")
    return entry.credits


def test_expiring_credits_by_account_and_by_day(database_url):
    a = grant_period("a", ends_in_days=2.5)
    b = grant_period("b", ends_in_days=5.5, tier="professional")
    grant_period("c", ends_in_days=12)
    with db.write_session() as session:
        ledger.consume(session, user_id="a", credits=40, reference="job")
        ledger.grant_pack(session, user_id="a", credits=100, source_key="pack:a", payment_id=None)
    with db.read_session() as session:
        week = expiring.expiring_credits(session, days=7)
        month = expiring.expiring_credits(session, days=30)
    assert week.total == a - 40 + b and [r["user_id"] for r in week.accounts] == ["b", "a"]
    assert week.as_dict()["accounts"][1]["credits"] == a - 40
    assert week.as_dict()["accounts"][0]["expires_at"].endswith("Z")
    assert sum(d["credits"] for d in week.by_day) == week.total and len(week.by_day) == 8
    assert month.total > week.total and len(month.accounts) == 3
    csv_text = expiring.expiring_csv(week)
    assert csv_text.splitlines()[0].startswith("user_id,credits_expiring") and ",b," not in csv_text
    assert csv_text.splitlines()[1].startswith(f"b,{b},")


def test_expiring_credits_limit_and_half_hour_zone(database_url):
    a = grant_period("a", ends_in_days=2.5)
    b = grant_period("b", ends_in_days=5.5, tier="professional")
    with db.read_session() as session:
        top = expiring.expiring_credits(session, days=7, limit=1)
        kolkata = expiring.expiring_credits(session, days=7, tz_name="Asia/Kolkata")
    assert (top.total, top.account_count, [r["user_id"] for r in top.accounts]) == (a + b, 2, ["b"])
    assert kolkata.total == a + b and sum(d["credits"] for d in kolkata.by_day) == a + b
    assert [r["user_id"] for r in kolkata.accounts] == ["b", "a"]


def test_expiring_cli_json(database_url):
    grant_period("a", ends_in_days=3)
    result = cli("expiring", "--days", "7", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["days"] == 7 and data["total"] == data["accounts"][0]["credits"] > 0
    assert data["accounts"][0]["user_id"] == "a" and data["accounts"][0]["expires_at"].endswith("Z")
    bad = cli("expiring", "--days", "0")
    assert bad.returncode == 2 and "days must be a whole number from 1 to 366" in bad.stderr


# --- API-version drift --------------------------------------------------------------------------

def test_recent_event_versions_against_the_pinned_one(sidecar):
    send(sidecar, event("customer.created", {"id": "cus_v1", "object": "customer"}))
    send(sidecar, event("customer.created", {"id": "cus_v2", "object": "customer"}, api_version="2024-06-20"))
    with db.read_session() as session:
        rows = recent_event_versions(session)
    assert rows[0]["api_version"] == stripe.api_version and rows[0]["pinned"]
    assert {(r["api_version"], r["events"], r["pinned"]) for r in rows[1:]} == {("2024-06-20", 1, False)}


def test_webhook_endpoint_check_lists_versions_and_warns(fake_stripe):
    state = fake_stripe.state
    assert [p.message for p in check_webhook_endpoints(get_settings()).problems][0].startswith(
        "no enabled webhook endpoint")
    state.add_webhook_endpoint(url="https://billing.example.com/api/stripe/webhook", enabled_events=list(EVENT_TYPES),
                               api_version=stripe.api_version, id="we_good")
    check = check_webhook_endpoints(get_settings())
    assert check.problems == [] and "we_good" in "\n".join(check.lines())
    state.add_webhook_endpoint(url="https://old.example.com/hook", enabled_events=["charge.refunded"],
                               api_version="2023-10-16", id="we_old")
    state.objects["webhook_endpoints"]["we_good"]["enabled_events"] = ["invoice.paid"]
    check = check_webhook_endpoints(get_settings())
    messages = [str(p) for p in check.problems]
    assert any("we_old" in m and "2023-10-16" in m and stripe.api_version in m for m in messages)
    assert any("no enabled endpoint sends checkout.session.completed" in m for m in messages)
    assert all(p.level == "warning" for p in check.problems)
    assert "API version 2023-10-16; events: charge.refunded" in "\n".join(check.lines())


def test_check_config_stripe_lists_endpoints(stripe_server, monkeypatch):
    stripe_server.state.add_webhook_endpoint(url="https://x.example.com/api/stripe/webhook", enabled_events=["*"],
                                             api_version="2025-01-27.acacia", id="we_x")
    result = subprocess.run([sys.executable, "-m", "billing_core", "check-config", "--stripe"], capture_output=True,
                            text=True, env=dict(os.environ), cwd=PROJECT_ROOT, timeout=120)
    assert "we_x https://x.example.com/api/stripe/webhook [enabled] API version 2025-01-27.acacia" in result.stdout
    assert "WARNING: webhook endpoints: we_x" in result.stdout and "not the pinned" in result.stdout
