"""Issue 13, the dashboard side: operator lifecycle (CLI as real processes, audit trail), scrypt cost and rehash,
sign-in throttling shared by two processes on one database, a disabled operator signed out, the idle
timeout, and the support 24-hour cap with admin approval (maker-checker), on SQLite and PostgreSQL."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from billing_core import approvals, db, ledger, operators, signin
from billing_core.models import AdjustmentRequest, LedgerEntry, Operator, OperatorAudit, SignInAttempt
from billing_core.operators import (Identity, OperatorError, OverDailyCap, PermissionDenied, adjust_as, authenticate,
                                    create_operator)
from billing_core.settings import PROJECT_ROOT, load_settings, reset_settings_cache
from dashboard_helpers import ADMIN, SUPPORT, add_operators, open_app, sign_in, signed_in, texts
from dashboard_helpers import fresh_sign_in_throttle_and_caches, seeded_db, seeded_template  # noqa: F401

NOW = datetime(2026, 11, 29, 9, 0, tzinfo=timezone.utc)


def cli(database_url, *args, stdin=None, env=None):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("STRIPE_")}
    environment.update({"DATABASE_URL": database_url, "BILLING_ENV_FILE": "/nonexistent.env", **(env or {})})
    return subprocess.run([sys.executable, "-m", "billing_core", *args], capture_output=True, text=True,
                          env=environment, cwd=PROJECT_ROOT, input=stdin, timeout=120)


def audit_rows(url):
    with db.read_session(db.get_engine(url)) as session:
        return [(a.operator_name, a.action, a.detail, a.changed_by) for a in
                session.execute(select(OperatorAudit).order_by(OperatorAudit.id)).scalars()]


# --- lifecycle from the CLI -------------------------------------------------------------------

def test_operator_lifecycle_commands_record_who_made_each_change(database_url):
    assert cli(database_url, "add-operator", "root", "--role", "admin", "--operator", "ops-lead",
               stdin="root-password-1\n").returncode == 0
    assert cli(database_url, "add-operator", "sam", "--role", "support", stdin="sam-password-1\n",
               env={"USER": "ignored"}).returncode == 0
    listed = cli(database_url, "list-operators", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)["operators"]
    assert [(r["name"], r["role"], r["disabled"]) for r in rows] == [("root", "admin", False), ("sam", "support", False)]
    assert "password_hash" not in listed.stdout and "scrypt$" not in listed.stdout

    steps = [("disable-operator", "sam"), ("enable-operator", "sam"), ("set-role", "sam", "admin"),
             ("set-role", "sam", "support")]
    for step in steps:
        result = cli(database_url, *step, "--operator", "root")
        assert result.returncode == 0 and "(by root)" in result.stdout, result.stderr
    result = cli(database_url, "reset-password", "sam", "--password-stdin", "--operator", "root",
                 stdin="brand-new-password\n")
    assert result.returncode == 0, result.stderr
    with db.read_session() as session:
        assert authenticate(session, name="sam", password="brand-new-password") is not None
        assert authenticate(session, name="sam", password="sam-password-1") is None
    assert audit_rows(database_url)[0] == ("root", "created", "role admin", "ops-lead")
    assert audit_rows(database_url)[2:] == [
        ("sam", "disabled", None, "root"), ("sam", "enabled", None, "root"),
        ("sam", "role_changed", "support -> admin", "root"), ("sam", "role_changed", "admin -> support", "root"),
        ("sam", "password_reset", None, "root")]
    text_list = cli(database_url, "list-operators")
    assert "sam" in text_list.stdout and "support" in text_list.stdout


@pytest.mark.parametrize("args, message", [
    (["disable-operator", "ghost"], "no operator named 'ghost'"),
    (["disable-operator", "root"], "last enabled admin"),
    (["set-role", "root", "support"], "last enabled admin"),
    (["set-role", "root", "owner"], "invalid choice"),
    (["reset-password", "root", "--password-stdin"], "at least 8 characters"),
])
def test_lifecycle_refusals_are_one_line_and_change_nothing(sqlite_url, args, message):
    with db.write_session() as session:
        create_operator(session, name="root", role="admin", password="root-password-1")
    result = cli(sqlite_url, *args, stdin="short\n")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    with db.read_session() as session:
        root = session.execute(select(Operator)).scalars().one()
        assert (root.role, root.disabled) == ("admin", False)
        assert authenticate(session, name="root", password="root-password-1") is not None


# --- passwords --------------------------------------------------------------------------------

def test_new_hashes_use_scrypt_2_17_and_weaker_ones_are_replaced_at_the_next_sign_in(database_url, monkeypatch):
    assert operators.hash_password("pass-word-1").split("$")[1:4] == [str(2 ** 17), "8", "1"]
    monkeypatch.setattr(operators, "SCRYPT_N", 2 ** 14)  # an account made before the cost was raised
    with db.write_session() as session:
        create_operator(session, name="old", role="admin", password="old-password-1")
    monkeypatch.setattr(operators, "SCRYPT_N", 2 ** 17)
    with db.read_session() as session:
        old_hash = session.execute(select(Operator.password_hash)).scalar_one()
    assert old_hash.split("$")[1] == str(2 ** 14) and operators.needs_rehash(old_hash)

    assert signin.sign_in(name="old", password="wrong-password", client_address="198.51.100.1", now=NOW).identity is None
    with db.read_session() as session:
        assert session.execute(select(Operator.password_hash)).scalar_one() == old_hash  # not on a failure
    result = signin.sign_in(name="old", password="old-password-1", client_address="198.51.100.1", now=NOW)
    assert result.identity == Identity("old", "admin")
    with db.read_session() as session:
        new_hash = session.execute(select(Operator.password_hash)).scalar_one()
        assert new_hash.split("$")[1] == str(2 ** 17) and not operators.needs_rehash(new_hash)
        assert authenticate(session, name="old", password="old-password-1") is not None
    assert audit_rows(database_url)[-1] == ("old", "password_rehashed", f"scrypt N={2 ** 17}", "old")


# --- throttling across processes --------------------------------------------------------------

FAIL_IN_ANOTHER_PROCESS = textwrap.dedent("""
    import sys
    from datetime import datetime, timezone
    from billing_core import signin
    now = datetime.fromisoformat(sys.argv[1])
    for _ in range(int(sys.argv[2])):
        assert signin.sign_in(name=sys.argv[3], password="guess-guess", client_address=sys.argv[4], now=now
                              ).identity is None
""")


def fail_in_another_process(url, *, times, name, address, now):
    """A second dashboard process: same code path, own engine and memory, the same database."""
    env = {**os.environ, "DATABASE_URL": url, "BILLING_ENV_FILE": "/nonexistent.env", "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run([sys.executable, "-c", FAIL_IN_ANOTHER_PROCESS, now.isoformat(), str(times), name, address],
                            capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr


def test_failures_in_one_process_throttle_the_dashboard_in_another(database_url, monkeypatch):
    """The dashboard here (AppTest) and another process on the same database count the same failures."""
    from dashboard_ui import auth

    add_operators(database_url)
    address = {"value": "203.0.113.5"}
    monkeypatch.setattr(auth, "client_address", lambda settings: address["value"])
    monkeypatch.setattr(auth, "_now", lambda: NOW)
    fail_in_another_process(database_url, times=5, name=ADMIN[0], address="203.0.113.5", now=NOW)
    at = sign_in(open_app(), ADMIN[0], ADMIN[1])
    assert "Too many failed sign-ins" in at.error[0].value  # the right password, from the address that guessed
    address["value"] = "192.0.2.44"  # the operator at their own desk: no failures from there
    assert sign_in(open_app(), ADMIN[0], ADMIN[1]).title[0].value == "Billing console"
    with db.read_session() as session:
        rows = session.execute(select(SignInAttempt.client_address, SignInAttempt.success)).all()
    assert sorted(rows) == sorted([("203.0.113.5", False)] * 5 + [("192.0.2.44", True)])


@pytest.mark.parametrize("peer, forwarded, proxies, expected", [
    ("10.0.0.2", None, 0, "10.0.0.2"),
    ("10.0.0.2", "198.51.100.9", 0, "10.0.0.2"),  # no proxy configured: the header is anybody's
    ("10.0.0.2", "198.51.100.9", 1, "198.51.100.9"),
    ("10.0.0.2", "1.2.3.4, 198.51.100.9", 1, "198.51.100.9"),  # the client's own prefix is ignored
    ("10.0.0.3", "1.2.3.4, 198.51.100.9, 10.0.0.2", 2, "198.51.100.9"),
    ("10.0.0.2", "", 1, "10.0.0.2"),
    ("10.0.0.2", "198.51.100.9", 2, "10.0.0.2"),
])
def test_client_address_behind_trusted_proxies(peer, forwarded, proxies, expected):
    assert signin.client_address_from(peer, forwarded, proxies) == expected


def test_throttle_survives_a_restart_and_backs_off(database_url):
    """Nothing is kept in memory: a fresh query of the table gives the same answer after a restart."""
    for _ in range(5):
        signin.sign_in(name="x", password="guess-guess", client_address="a", now=NOW)
    assert signin.sign_in(name="x", password="guess-guess", client_address="a", now=NOW).throttled
    sixth = NOW + timedelta(seconds=31)
    assert not signin.sign_in(name="x", password="guess-guess", client_address="a", now=sixth).throttled
    db.dispose_engines()
    with db.read_session() as session:
        wait = signin.throttled_for(session, name="x", client_address="a", now=sixth + timedelta(seconds=10))
        assert wait == timedelta(seconds=50)  # the 6th failure waits 60 s
        assert signin.throttled_for(session, name="x", client_address="clean", now=NOW) is None
    assert signin.backoff(4) is None and signin.backoff(5) == timedelta(seconds=30)
    assert signin.backoff(50) == signin.MAX_DELAY


# --- sessions ---------------------------------------------------------------------------------

def test_a_disabled_operator_is_signed_out_on_the_next_rerun(seeded_db):
    at = signed_in(SUPPORT, "customers")
    assert at.title[0].value == "Customers"
    with db.write_session() as session:
        operators.set_disabled(session, name=SUPPORT[0], disabled=True, changed_by=ADMIN[0])
    at.run()
    assert [t.value for t in at.title] == ["Sign in"] and len(at.metric) == 0
    assert "Wrong user name or password." in [e.value for e in sign_in(open_app(), *SUPPORT).error]


def test_an_admin_disables_an_operator_on_the_operators_page(seeded_db):
    support = signed_in(SUPPORT)
    admin = signed_in(ADMIN, "operators")
    admin.selectbox(key="op_pick").select(SUPPORT[0]).run()
    next(b for b in admin.button if b.label.startswith("Disable")).click()
    admin.run()
    assert not admin.exception and "is disabled" in admin.success[0].value
    assert admin.dataframe[0].value.set_index("Name").loc[SUPPORT[0], "Status"] == "disabled"
    assert ("sam", "disabled", None, "alice") in audit_rows(seeded_db)
    support.run()
    assert [t.value for t in support.title] == ["Sign in"]


def test_support_sees_no_operator_management(seeded_db):
    at = signed_in(SUPPORT, "operators")
    assert "Only an admin" in at.info[0].value and len(at.dataframe) == 0


class Clock:
    def __init__(self):
        self.now = 5000.0

    def monotonic(self):
        return self.now


def test_idle_sessions_are_signed_out(seeded_db, monkeypatch):
    from dashboard_ui import auth

    clock = Clock()
    monkeypatch.setattr(auth, "time", clock)
    at = signed_in(ADMIN)
    clock.now += 29 * 60
    assert at.run().title[0].value == "Billing console"  # activity within 30 minutes keeps it
    clock.now += 30 * 60 + 1
    at.run()
    assert [t.value for t in at.title] == ["Sign in"]
    assert "signed out after 30 minutes without activity" in at.info[0].value


# --- support cap and maker-checker ------------------------------------------------------------

def cap_settings(**extra):
    return load_settings({"BILLING_ENV_FILE": "/nonexistent", "SUPPORT_ADJUSTMENT_LIMIT": "500",
                          "SUPPORT_DAILY_ADJUSTMENT_CAP": "600", **extra})


def test_the_daily_cap_counts_support_adjustments_of_the_last_24_hours(database_url):
    settings, support = cap_settings(), Identity("sam", "support")
    with db.write_session() as session:
        create_operator(session, name="sam", role="support", password="sam-password-1")
        adjust_as(session, identity=support, user_id="u1", credits=400, reason="goodwill", settings=settings)
        adjust_as(session, identity=support, user_id="u1", credits=-150, reason="correction", settings=settings)
    with pytest.raises(OverDailyCap, match="550 credits in the last 24 hours"):
        with db.write_session() as session:
            adjust_as(session, identity=support, user_id="u1", credits=51, reason="again", settings=settings)
    with db.write_session() as session:
        adjust_as(session, identity=support, user_id="u1", credits=50, reason="last", settings=settings)
        adjust_as(session, identity=Identity("alice", "admin"), user_id="u1", credits=5000, reason="admin",
                  settings=settings)
        assert operators.adjusted_in_last_day(session, operator="sam") == 600
        assert operators.adjusted_in_last_day(session, operator="sam",
                                              now=ledger.utcnow() + timedelta(hours=24, seconds=1)) == 0


def test_maker_checker_rules(database_url):
    settings, support, admin = cap_settings(), Identity("sam", "support"), Identity("alice", "admin")
    with db.write_session() as session:
        ledger.adjust(session, user_id="u1", credits=1, reason="open", operator="seed")
        adjust_as(session, identity=support, user_id="u1", credits=500, reason="goodwill", settings=settings)
        first = approvals.adjust_or_request(session, identity=support, user_id="u1", credits=300, reason="more",
                                            settings=settings, source_key="form-1")
        again = approvals.adjust_or_request(session, identity=support, user_id="u1", credits=300, reason="more",
                                            settings=settings, source_key="form-1")  # the form sent twice
    assert first.entries == [] and first.request.status == "pending" and again.request.id == first.request.id
    for identity, approve, reason, message in [(support, True, "ok", "only an admin"),
                                               (admin, True, " ", "a reason is required"),
                                               (Identity("sam", "admin"), True, "mine", "their own request")]:
        with pytest.raises(OperatorError, match=message):
            with db.write_session() as session:
                approvals.decide(session, identity=identity, request_id=first.request.id, approve=approve,
                                 reason=reason)
    with db.write_session() as session:
        outcome = approvals.decide(session, identity=admin, request_id=first.request.id, approve=True,
                                   reason="ticket 42 checked")
    assert len(outcome.entries) == 1
    with pytest.raises(OperatorError, match="already approved by alice"):
        with db.write_session() as session:
            approvals.decide(session, identity=admin, request_id=first.request.id, approve=True, reason="twice")
    with db.read_session() as session:
        assert ledger.balance(session, "u1") == 801
        entry = session.execute(select(LedgerEntry).where(LedgerEntry.source_key == "adjust:request:1")).scalars().one()
        assert (entry.credits, entry.operator) == (300, "alice") and "request #1 by sam: more" == entry.reason


def test_maker_checker_end_to_end_in_the_dashboard(seeded_db, monkeypatch):
    monkeypatch.setenv("SUPPORT_DAILY_ADJUSTMENT_CAP", "600")
    reset_settings_cache()
    user_id = "demo_user_0003"
    with db.read_session() as session:
        before = ledger.balance(session, user_id)

    def adjust(at, credits, reason):
        at.text_input(key="customer_query").input(user_id).run()
        at.number_input(key="adjust_credits").set_value(credits)
        at.text_input(key="adjust_reason").input(reason)
        at.checkbox(key="adjust_confirm").check()
        next(b for b in at.button if b.label == "Apply adjustment").click()
        return at.run()

    support = signed_in(SUPPORT, "customers")
    adjust(support, 400, "outage goodwill")
    assert "Adjusted" in support.success[0].value
    adjust(support, 300, "second outage")  # 700 in 24 hours: over the cap of 600
    assert not support.exception and "waits for an admin" in support.success[0].value
    assert support.dataframe[0].value["Reason"].tolist() == ["second outage"]  # their pending requests

    admin = signed_in(ADMIN, "customers")
    pending = admin.dataframe[0].value
    assert pending[["By", "User", "Credits"]].values.tolist() == [["sam", user_id, "+300"]]
    admin.text_input(key="decide_reason").input("verified in ticket 77")
    next(b for b in admin.button if b.label == "Approve and apply").click()
    admin.run()
    assert not admin.exception and not admin.error, [e.value for e in admin.error]
    assert "approved" in admin.success[0].value
    with db.read_session() as session:
        assert ledger.balance(session, user_id) == before + 700
        request = session.execute(select(AdjustmentRequest)).scalars().one()
        assert (request.requested_by, request.status, request.decided_by, request.decision_reason) == (
            "sam", "approved", "alice", "verified in ticket 77")
        assert request.requested_at <= request.decided_at

    adjust(support, 250, "third")  # 400 + 250 of sam's own (approved ones are the admin's): another request
    assert "waits for an admin" in support.success[0].value
    admin = signed_in(ADMIN, "customers")
    admin.text_input(key="decide_reason").input("not justified")
    next(b for b in admin.button if b.label == "Reject").click()
    admin.run()
    assert "rejected" in admin.success[0].value
    with db.read_session() as session:
        assert ledger.balance(session, user_id) == before + 700
        statuses = session.execute(select(AdjustmentRequest.status).order_by(AdjustmentRequest.id)).scalars().all()
    assert statuses == ["approved", "rejected"]
