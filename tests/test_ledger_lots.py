"""The constant-cost ledger of issue 10, on SQLite and PostgreSQL: lots and account totals kept with the entries.

* a property test: random sequences of grants, spends, time passing, refunds, disputes, adjustments,
  cancellations and past-due subscriptions keep every lot equal to its entries and every account's totals
  equal to its open lots, and balances, spendable balances and breakdowns equal a reference computed from
  the entries alone (the formulas of the ledger before lots, which summed the account's whole history);
* migration 0003 back-fills lots and totals from a database with history, leaving every balance and
  breakdown as it was, and `check-ledger` clean;
* `check-ledger` reports every kind of mismatch and repairs nothing;
* concurrent spends, grants, refunds and webhook events (pack purchases delivered twice) on one account keep
  the totals exact.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import create_engine, select, text, update

from billing_core import db, ledger
from billing_core.ledger_check import check_ledger
from concurrency import run_threads
from billing_core.models import Account, CreditLot, Payment, Subscription, utcnow

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
DAY = timedelta(days=1)
TIERS = ("starter", "professional", "business")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
THOROUGH = int(os.environ.get("PROPERTY_EXAMPLES", "0"))
_example = itertools.count(1)


# --- the reference: what the entries alone imply -----------------------------------------------

def _spend_order(lot: dict):
    return (lot["expires_at"] is None, lot["expires_at"] or lot["created_at"], lot["created_at"], lot["key"])


def reference(conn, user_id: str, now: datetime) -> dict:
    """Balance, spendable balance and breakdown from the account's entries, summed the way the ledger did
    before lots were kept: no credit_lot row and no account total is read."""
    entries = conn.execute(text(
        "SELECT credits, kind, source_key, lot_key, lot_source, expires_at, subscription_id, created_at "
        "FROM ledger_entry WHERE user_id = :u ORDER BY id"), {"u": user_id}).all()
    flagged = bool(conn.execute(text("SELECT flagged FROM account WHERE user_id = :u"), {"u": user_id}).scalar())
    frozen = set(conn.execute(text("SELECT id FROM subscription WHERE user_id = :u AND status IN ('past_due', 'unpaid')"),
                              {"u": user_id}).scalars())
    lots = {}
    for credits, kind, key, lot_key, lot_source, expires_at, sub_id, created_at in entries:
        if lot_source is not None:
            lots[key] = {"key": key, "source": lot_source, "granted": credits, "remaining": 0, "marks": 0,
                         "expires_at": _aware(expires_at), "subscription_id": sub_id, "created_at": _aware(created_at)}
    debt = 0
    for credits, kind, key, lot_key, *_ in entries:
        if lot_key is None:
            debt += credits
        else:
            lots[lot_key]["remaining"] += credits
            lots[lot_key]["marks"] += kind == "expire"

    def expired(lot):
        return lot["expires_at"] is not None and lot["expires_at"] <= now

    def closed(lot):
        return lot["marks"] > 0 or expired(lot)

    balance = debt + sum(lot["remaining"] for lot in lots.values() if not expired(lot))
    open_lots = sorted((lot for lot in lots.values() if not closed(lot)), key=_spend_order)
    spendable = 0 if flagged else max(0, debt + sum(
        lot["remaining"] for lot in open_lots
        if lot["remaining"] > 0 and not (lot["source"] == "subscription" and lot["subscription_id"] in frozen)))
    breakdown = [(lot["key"], lot["source"], lot["remaining"], lot["granted"],
                  lot["source"] == "subscription" and lot["subscription_id"] in frozen)
                 for lot in open_lots if lot["remaining"] != 0]
    if debt:
        breakdown.append((None, "debt", debt, 0, False))
    return {"balance": balance, "spendable": spendable, "breakdown": breakdown}


def _aware(value):
    if value is None:
        return None
    if isinstance(value, str):  # SQLite through a raw text() query
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def ledger_view(session, user_id: str, now: datetime) -> dict:
    summary = ledger.account_summary(session, user_id, now=now)
    assert summary.balance == ledger.balance(session, user_id, now=now)
    assert summary.spendable_balance == ledger.spendable_balance(session, user_id, now=now)
    return {"balance": summary.balance, "spendable": summary.spendable_balance,
            "breakdown": [(row["lot"], row["source"], row["credits"], row["granted"], row["frozen"])
                          for row in summary.breakdown]}


def assert_matches_entries(user_id: str, *, now: datetime) -> None:
    with db.read_session() as session:
        for when in (now, now + 45 * DAY, now + 400 * DAY):
            assert ledger_view(session, user_id, when) == reference(session.connection(), user_id, when), when


def assert_check_ledger_clean() -> None:
    with db.read_session() as session:
        assert check_ledger(session).mismatches == []


# --- the property ------------------------------------------------------------------------------

def epoch(dt: datetime) -> int:
    return int(dt.timestamp())


operations = st.lists(st.one_of(
    st.tuples(st.just("pack"), st.integers(1, 300), st.booleans()),
    st.tuples(st.just("period"), st.integers(0, 1), st.integers(0, 4), st.sampled_from(TIERS)),
    st.tuples(st.just("upgrade"), st.integers(0, 1), st.integers(0, 4), st.sampled_from(TIERS),
              st.sampled_from(TIERS), st.booleans()),
    st.tuples(st.just("spend"), st.integers(1, 400)),
    st.tuples(st.just("time"), st.integers(1, 45)),
    st.tuples(st.just("refund"), st.integers(0, 9), st.sampled_from((25, 50, 100))),
    st.tuples(st.just("dispute"), st.integers(0, 9)),
    st.tuples(st.just("release"), st.booleans()),
    st.tuples(st.just("adjust"), st.integers(-300, 300).filter(bool), st.booleans()),
    st.tuples(st.just("cancel"), st.integers(0, 1)),
    st.tuples(st.just("status"), st.integers(0, 1), st.sampled_from(("active", "past_due"))),
), min_size=1, max_size=25)


class Life:
    """One account's random life, played through the ledger's public functions like the handlers do."""

    def __init__(self, user_id: str):
        self.user_id = user_id
        self.now = T0
        self.payments: list[int] = []
        self.reversed: dict[int, int] = {}
        self.disputes: list[tuple[str, int]] = []
        self.count = itertools.count()

    def sub_id(self, k: int) -> str:
        return f"sub_{self.user_id}_{k}"

    def period_end(self, period: int) -> int:
        return epoch(T0 + 30 * (period + 1) * DAY)

    def payment(self, s, *, amount: int, kind: str) -> int:
        payment = Payment(user_id=self.user_id, source="checkout", checkout_session_id=f"cs_{self.user_id}_{next(self.count)}",
                          item="pack_100" if kind == "pack" else "starter", kind=kind, amount_cents=amount,
                          currency="usd", status="paid")
        s.add(payment)
        s.flush()
        self.payments.append(payment.id)
        return payment.id

    def subscription(self, s, k: int) -> str:
        sub_id = self.sub_id(k)
        if s.get(Subscription, sub_id) is None:
            s.add(Subscription(id=sub_id, user_id=self.user_id, tier="starter", status="active"))
            s.flush()
        return sub_id

    def play(self, op: tuple) -> None:
        kind, *args = op
        if kind == "time":
            self.now += args[0] * DAY
            return
        try:
            with db.write_session() as s:
                ledger.lock_account(s, user_id=self.user_id)
                getattr(self, f"do_{kind}")(s, *args)
        except ledger.LedgerError:
            pass  # a refused operation (insufficient, flagged, would go negative) writes nothing

    def do_pack(self, s, credits: int, paid: bool) -> None:
        payment_id = self.payment(s, amount=credits * 10, kind="pack") if paid else None
        ledger.grant_pack(s, user_id=self.user_id, credits=credits, source_key=f"pack:{self.user_id}:{next(self.count)}",
                          payment_id=payment_id, now=self.now)

    def do_period(self, s, k: int, period: int, tier: str) -> None:
        sub_id = self.subscription(s, k)
        payment_id = self.payment(s, amount=1000, kind="plan")
        ledger.grant_subscription_period(s, user_id=self.user_id, subscription_id=sub_id,
                                         period_end=self.period_end(period), tier=tier, payment_id=payment_id,
                                         source_key=f"invoice:{self.user_id}:{next(self.count)}", now=self.now)

    def do_upgrade(self, s, k: int, period: int, from_tier: str, to_tier: str, paid: bool) -> None:
        sub_id = self.subscription(s, k)
        event_key = f"upgrade:{sub_id}:{period}:{to_tier}"
        if paid:  # the proration invoice: claims the lot the subscription event may have granted first
            ledger.grant_upgrade_topup(s, user_id=self.user_id, subscription_id=sub_id,
                                       period_end=self.period_end(period), from_tier=from_tier, to_tier=to_tier,
                                       source_key=f"invoice:{self.user_id}:{next(self.count)}:upgrade",
                                       payment_id=self.payment(s, amount=800, kind="plan"), claims_lot=event_key,
                                       now=self.now)
        else:
            ledger.grant_upgrade_topup(s, user_id=self.user_id, subscription_id=sub_id,
                                       period_end=self.period_end(period), from_tier=from_tier, to_tier=to_tier,
                                       source_key=event_key, now=self.now)

    def do_spend(self, s, credits: int) -> None:
        ledger.consume(s, user_id=self.user_id, credits=credits, reference=f"job-{next(self.count)}", now=self.now)

    def do_refund(self, s, index: int, percent: int) -> None:
        if not self.payments:
            return
        payment = s.get(Payment, self.payments[index % len(self.payments)])
        cumulative = max(self.reversed.get(payment.id, 0), payment.amount_cents * percent // 100)
        ledger.clawback_for_payment(s, payment=payment, reversed_cents=cumulative, now=self.now)
        self.reversed[payment.id] = cumulative

    def do_dispute(self, s, index: int) -> None:
        if not self.payments:
            return
        payment = s.get(Payment, self.payments[index % len(self.payments)])
        dispute_id = f"dp_{self.user_id}_{next(self.count)}"
        account = ledger.lock_account(s, user_id=self.user_id)
        account.open_disputes += 1
        ledger.hold_for_dispute(s, dispute_id=dispute_id, payment=payment, now=self.now)
        ledger.refresh_flag(s, account, now=self.now)
        self.disputes.append((dispute_id, payment.id))

    def do_release(self, s, won: bool) -> None:
        if not self.disputes:
            return
        dispute_id, payment_id = self.disputes.pop(0)
        account = ledger.lock_account(s, user_id=self.user_id)
        account.open_disputes -= 1
        ledger.release_dispute_hold(s, dispute_id=dispute_id, user_id=self.user_id, now=self.now)
        if not won:  # lost: released, then taken back like a refund of the whole payment
            payment = s.get(Payment, payment_id)
            ledger.clawback_for_payment(s, payment=payment, reversed_cents=payment.amount_cents, now=self.now)
            self.reversed[payment_id] = payment.amount_cents
        ledger.refresh_flag(s, account, now=self.now)

    def do_adjust(self, s, credits: int, allow_negative: bool) -> None:
        ledger.adjust(s, user_id=self.user_id, credits=credits, reason="property test", operator="hypothesis",
                      allow_negative=allow_negative, now=self.now)

    def do_cancel(self, s, k: int) -> None:
        ledger.expire_subscription_credits(s, user_id=self.user_id, subscription_id=self.sub_id(k),
                                           reason="subscription canceled", now=self.now)

    def do_status(self, s, k: int, status: str) -> None:
        self.subscription(s, k)
        s.get(Subscription, self.sub_id(k)).status = status


@settings(max_examples=THOROUGH or 40, deadline=None, derandomize=not THOROUGH, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=operations)
def test_lots_and_totals_always_equal_what_the_entries_imply(database_url, ops):
    life = Life(f"life{next(_example)}x{uuid.uuid4().hex[:6]}")
    for op in ops:
        life.play(op)
        assert_matches_entries(life.user_id, now=life.now)
    assert_check_ledger_clean()


def test_a_lot_past_its_expiry_stops_counting_at_once_and_closes_on_the_next_write(database_url):
    end = T0 + 30 * DAY
    with db.write_session() as s:
        ledger.grant_subscription_period(s, user_id="u1", subscription_id="sub_1", period_end=epoch(end),
                                         tier="starter", source_key="invoice:1", now=T0)
        ledger.grant_pack(s, user_id="u1", credits=50, source_key="pack:1", now=T0)
    with db.read_session() as s:
        assert ledger.balance(s, "u1", now=end) == 50
        lot = s.execute(select(CreditLot).where(CreditLot.lot_key == "invoice:1")).scalar_one()
        assert lot.closed is False  # nothing has written since: reads leave it out
    with db.write_session() as s:
        ledger.consume(s, user_id="u1", credits=5, reference="r", now=end)
    with db.read_session() as s:
        lot = s.execute(select(CreditLot).where(CreditLot.lot_key == "invoice:1")).scalar_one()
        assert (lot.closed, lot.remaining) == (True, 100)  # remaining stays the sum of its entries
        assert s.get(Account, "u1").balance == 45
    assert_check_ledger_clean()


def test_a_spent_pack_closes_and_a_held_one_stays_open(database_url):
    with db.write_session() as s:
        ledger.lock_account(s, user_id="u1")
        payment = Payment(user_id="u1", source="checkout", checkout_session_id="cs_1", amount_cents=1000)
        s.add(payment)
        s.flush()
        ledger.grant_pack(s, user_id="u1", credits=10, source_key="pack:spent", now=T0)
        ledger.grant_pack(s, user_id="u1", credits=10, source_key="pack:held", payment_id=payment.id, now=T0)
        ledger.consume(s, user_id="u1", credits=10, reference="r", now=T0)
        ledger.hold_for_dispute(s, dispute_id="dp_1", payment=payment, now=T0)
    with db.read_session() as s:
        closed = dict(s.execute(select(CreditLot.lot_key, CreditLot.closed)).all())
        held = s.execute(select(CreditLot.held).where(CreditLot.lot_key == "pack:held")).scalar_one()
    assert closed == {"pack:spent": True, "pack:held": False} and held == 10
    with db.write_session() as s:
        assert ledger.release_dispute_hold(s, dispute_id="dp_1", user_id="u1", now=T0) == 10
    with db.read_session() as s:
        assert ledger.balance(s, "u1", now=T0) == 10
    assert_check_ledger_clean()


# --- check-ledger ------------------------------------------------------------------------------

def test_check_ledger_reports_every_mismatch_and_repairs_nothing(database_url):
    with db.write_session() as s:
        ledger.grant_pack(s, user_id="u1", credits=100, source_key="pack:1", now=T0)
        ledger.consume(s, user_id="u1", credits=30, reference="r1", now=T0)
        ledger.grant_pack(s, user_id="u2", credits=5, source_key="pack:2", now=T0)
    assert_check_ledger_clean()
    with db.write_session() as s:
        s.execute(update(CreditLot).where(CreditLot.lot_key == "pack:1").values(remaining=71, held=2))
        s.execute(update(Account).where(Account.user_id == "u2").values(balance=6, debt=-1))
    with db.read_session() as s:
        found = check_ledger(s).mismatches
    assert [(row["what"], row["user_id"]) for row in found] == [("lot", "u1"), ("account", "u1"), ("account", "u2")]
    assert "remaining 71 but its entries sum to 70" in found[0]["problem"]
    assert "held 2" in found[0]["problem"]
    result = subprocess.run([sys.executable, "-m", "billing_core", "check-ledger", "--json"], cwd=PROJECT_ROOT,
                            env={**os.environ, "DATABASE_URL": database_url}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 3, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is False and len(report["mismatches"]) == 3
    with db.read_session() as s:  # nothing repaired
        assert s.execute(select(CreditLot.remaining).where(CreditLot.lot_key == "pack:1")).scalar_one() == 71


def test_check_ledger_is_clean_and_exits_0_on_a_consistent_ledger(database_url):
    with db.write_session() as s:
        ledger.grant_pack(s, user_id="u1", credits=100, source_key="pack:1", now=T0)
    result = subprocess.run([sys.executable, "-m", "billing_core", "check-ledger"], cwd=PROJECT_ROOT,
                            env={**os.environ, "DATABASE_URL": database_url}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "match the entries" in result.stdout


# --- concurrency -------------------------------------------------------------------------------

def test_concurrent_spends_grants_and_refunds_on_one_account_keep_the_totals_exact(database_url):
    with db.write_session() as s:
        ledger.grant_pack(s, user_id="busy", credits=10_000, source_key="seed")
        payment = Payment(user_id="busy", source="checkout", checkout_session_id="cs_busy", amount_cents=1000)
        s.add(payment)
        s.flush()
        ledger.grant_pack(s, user_id="busy", credits=500, source_key="checkout:cs_busy", payment_id=payment.id)
        payment_id = payment.id

    def worker(n: int) -> None:
        for k in range(12):
            with db.write_session() as s:
                if k % 4 == 0:
                    ledger.grant_pack(s, user_id="busy", credits=7, source_key=f"pack:{n}:{k}")
                elif k == 5 and n < 2:  # two copies of one refund event: applied once
                    ledger.clawback_for_payment(s, payment=s.get(Payment, payment_id), reversed_cents=500)
                else:
                    ledger.consume(s, user_id="busy", credits=3, reference=f"job:{n}:{k}")

    assert run_threads(8, worker) == []
    spends = 8 * 12 - 8 * 3 - 2
    with db.read_session() as s:
        assert ledger.balance(s, "busy") == 10_000 + 500 + 8 * 3 * 7 - 3 * spends - 250
        assert s.get(Account, "busy").balance == ledger.balance(s, "busy")
    assert_check_ledger_clean()


# --- migration 0003 ----------------------------------------------------------------------------

@pytest.fixture
def url_at_0002(request, tmp_path, database_url):
    """An empty database of the same kind as `database_url`, at revision 0002."""
    from alembic import command

    if database_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'old.db'}"
        cleanup = None
    else:
        schema = f"mig_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        base = db.normalize_url(os.environ["TEST_DATABASE_URL"])
        admin = create_engine(base, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = f"{base}{'&' if '?' in base else '?'}options={quote(f'-csearch_path={schema}')}"

        def cleanup():
            with admin.connect() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            admin.dispose()
    engine = db.get_engine(url)
    cfg = db.alembic_config(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")
    yield url
    db._engines.pop(url, None)
    engine.dispose()
    if cleanup:
        cleanup()


def _old_history(conn, now: datetime) -> list[str]:
    """Entries as the ledger before lots wrote them, for accounts that cover every kind of lot."""
    def account(user, flagged=False):
        conn.execute(text("INSERT INTO account (user_id, flagged, open_disputes, created_at, updated_at) "
                          "VALUES (:u, :f, :d, :t, :t)"), {"u": user, "f": flagged, "d": int(flagged), "t": now})

    def payment(pid, user, amount):
        conn.execute(text("INSERT INTO payment (id, user_id, source, checkout_session_id, amount_cents, currency, "
                          "status, amount_refunded, amount_disputed_lost, credits_granted, created_at, updated_at) "
                          "VALUES (:id, :u, 'checkout', :cs, :a, 'usd', 'paid', 0, 0, 0, :t, :t)"),
                     {"id": pid, "u": user, "cs": f"cs_{pid}", "a": amount, "t": now})

    def entry(user, credits, kind, key, lot_key=None, lot_source=None, expires_at=None, sub=None, period_end=None,
              payment_id=None, reference=None, at=None, allowance=(None, None)):
        conn.execute(text(
            "INSERT INTO ledger_entry (user_id, credits, kind, source_key, lot_key, lot_source, expires_at, "
            "subscription_id, period_end, payment_id, reference, allowance_from, allowance_to, created_at) "
            "VALUES (:u, :c, :k, :key, :lot, :src, :exp, :sub, :pe, :pid, :ref, :af, :at2, :at)"),
            {"u": user, "c": credits, "k": kind, "key": key, "lot": lot_key, "src": lot_source,
             "exp": _naive_for(conn, expires_at), "sub": sub, "pe": period_end, "pid": payment_id, "ref": reference,
             "af": allowance[0], "at2": allowance[1], "at": _naive_for(conn, at or now - 60 * DAY)})

    def grant(user, credits, key, source, **extra):
        entry(user, credits, {"pack": "pack_grant", "subscription": "subscription_grant",
                              "adjustment": "adjustment"}[source], key, lot_key=key, lot_source=source, **extra)

    # a pack partly spent, an expired subscription period, a current one, and one closed by the next grant
    account("ann")
    payment(1, "ann", 1000)
    grant("ann", 250, "checkout:cs_1", "pack", payment_id=1)
    entry("ann", -40, "spend", "spend:a:0", lot_key="checkout:cs_1", reference="r1")
    grant("ann", 100, "invoice:old", "subscription", expires_at=now - 5 * DAY, sub="sub_ann",
          period_end=epoch(now - 5 * DAY), allowance=(0, 100))
    entry("ann", -30, "spend", "spend:a2:0", lot_key="invoice:old", reference="r2")
    grant("ann", 100, "invoice:older", "subscription", expires_at=now - 35 * DAY, sub="sub_ann",
          period_end=epoch(now - 35 * DAY), allowance=(0, 100))
    entry("ann", -100, "expire", "expire:invoice:older", lot_key="invoice:older", sub="sub_ann")
    grant("ann", 500, "invoice:now", "subscription", expires_at=now + 20 * DAY, sub="sub_ann",
          period_end=epoch(now + 20 * DAY), allowance=(0, 500))
    entry("ann", -70, "spend", "spend:a3:0", lot_key="invoice:now", reference="r3")
    conn.execute(text("INSERT INTO subscription (id, user_id, tier, status, cancel_at_period_end, state_at, "
                      "created_at, updated_at) VALUES ('sub_ann', 'ann', 'professional', 'past_due', false, 0, "
                      ":t, :t)"), {"t": now})
    # debt from a refund after spending, settled by the next grant; an adjustment; a spent pack
    account("bob")
    payment(2, "bob", 1000)
    grant("bob", 100, "checkout:cs_2", "pack", payment_id=2)
    entry("bob", -100, "spend", "spend:b:0", lot_key="checkout:cs_2", reference="r1")
    entry("bob", -100, "clawback", "clawback:2:100:debt", payment_id=2)
    grant("bob", 60, "adjust:1", "adjustment")
    entry("bob", -60, "debt_settlement", "adjust:1:settles-debt", lot_key="adjust:1")
    entry("bob", 60, "debt_settlement", "adjust:1:debt-settled")
    grant("bob", 25, "adjust:2", "adjustment")
    # a dispute holding a pack (flagged), and an upgrade lot claimed by its invoice
    account("cat", flagged=True)
    payment(3, "cat", 1000)
    payment(4, "cat", 1600)
    grant("cat", 500, "checkout:cs_3", "pack", payment_id=3)
    entry("cat", -120, "spend", "spend:c:0", lot_key="checkout:cs_3", reference="r1")
    entry("cat", -380, "dispute_hold", "dispute_hold:dp_1:checkout:cs_3", lot_key="checkout:cs_3", payment_id=3,
          reference="dp_1")
    grant("cat", 400, "upgrade:sub_cat:p:professional", "subscription", expires_at=now + 10 * DAY, sub="sub_cat",
          period_end=epoch(now + 10 * DAY), allowance=(100, 500))
    entry("cat", 0, "payment_link", "paid-by:upgrade:sub_cat:p:professional",
          lot_key="upgrade:sub_cat:p:professional", payment_id=4, sub="sub_cat", period_end=epoch(now + 10 * DAY))
    # debt still open
    account("dan")
    entry("dan", -15, "adjustment", "adjust:3:debt")
    account("eve")  # no history at all
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT setval(pg_get_serial_sequence('payment', 'id'), 10)"))
    return ["ann", "bob", "cat", "dan", "eve"]


def _naive_for(conn, value):
    """What SQLAlchemy's DateTime stores: UTC; SQLite without an offset."""
    if value is None:
        return None
    return value.astimezone(timezone.utc).replace(tzinfo=None) if conn.dialect.name == "sqlite" else value


def test_migration_0003_backfills_lots_and_totals_and_keeps_every_balance(url_at_0002):
    now = utcnow()
    engine = db.get_engine(url_at_0002)
    with engine.begin() as conn:
        users = _old_history(conn, now)
    times = (now, now + 15 * DAY, now + 400 * DAY)
    with engine.connect() as conn:
        before = {(user, when): reference(conn, user, when) for user in users for when in times}
    db.migrate(url_at_0002)
    with db.read_session(engine) as session:
        for (user, when), expected in before.items():
            assert ledger_view(session, user, when) == expected, (user, when)
        assert check_ledger(session).mismatches == []
        lots = {lot.lot_key: lot for lot in session.execute(select(CreditLot)).scalars()}
        totals = {a.user_id: (a.balance, a.debt) for a in session.execute(select(Account)).scalars()}
    assert lots["invoice:old"].closed and lots["invoice:older"].closed and not lots["invoice:now"].closed
    assert lots["checkout:cs_2"].closed  # spent and refunded: nothing can come back
    assert (lots["checkout:cs_3"].held, lots["checkout:cs_3"].closed) == (380, False)
    assert lots["upgrade:sub_cat:p:professional"].payment_id == 4  # claimed by its invoice
    assert totals == {"ann": (210 + 430, 0), "bob": (25 - 40, -40), "cat": (400, 0), "dan": (-15, -15), "eve": (0, 0)}
    # the ledger goes on from the back-filled state
    with db.write_session(engine) as session:
        result = ledger.consume(session, user_id="ann", credits=200, reference="after-migration", now=now)
    assert (result.balance, result.spendable_balance) == (440, 10)  # past due: only the pack is spendable
    with db.read_session(engine) as session:
        assert check_ledger(session).mismatches == []


def test_copies_of_one_spend_sent_at_once_spend_once_and_answer_alike(database_url):
    with db.write_session() as s:
        ledger.grant_pack(s, user_id="agent", credits=100, source_key="seed")
    start = threading.Barrier(8)
    answers = []

    def retry(n: int) -> None:
        start.wait(10)
        with db.write_session() as s:
            answers.append(ledger.consume(s, user_id="agent", credits=7, reference="job-1").as_dict())

    assert run_threads(8, retry, timeout=60) == []
    assert len(answers) == 8 and all(answer == answers[0] for answer in answers)
    with db.read_session() as s:
        assert ledger.balance(s, "agent") == 93
    assert_check_ledger_clean()


def test_concurrent_spends_and_pack_events_on_one_account_keep_the_totals_exact(database_url, monkeypatch):
    """Webhook events (pack purchases, each delivered twice) and spends of one account, all at once."""
    import random

    from billing_core import events
    from billing_core.settings import get_settings
    from stripe_events import checkout_completed, configure_webhooks, encode

    configure_webhooks(monkeypatch)
    settings, engine = get_settings(), db.get_engine(database_url)
    with db.write_session() as s:
        ledger.grant_pack(s, user_id="agent", credits=1000, source_key="seed")
    purchases = [checkout_completed(session_id=f"cs_test_busy{n}", user_id="agent", item="pack_100",
                                    customer="cus_agent") for n in range(12)]
    tasks = [("event", evt) for evt in purchases * 2] + [("spend", n) for n in range(40)]
    random.Random(5).shuffle(tasks)

    def work(n: int) -> None:
        for kind, what in tasks[n::8]:
            if kind == "event":
                result = events.ingest(what, raw_payload=encode(what), engine=engine, settings=settings)
                assert result.status in ("processed", "duplicate"), result
            else:
                with db.write_session() as s:
                    ledger.consume(s, user_id="agent", credits=5, reference=f"job-{what}")

    assert run_threads(8, work) == []
    with db.read_session() as s:
        assert ledger.balance(s, "agent") == 1000 + 12 * 100 - 40 * 5
        assert s.get(Account, "agent").balance == 1000 + 12 * 100 - 40 * 5
    assert_check_ledger_clean()


# --- closing lapsed lots of idle accounts ---------------------------------------------------------

def test_close_lapsed_closes_expired_lots_of_idle_accounts_without_changing_any_balance(database_url):
    now = utcnow()
    with db.write_session() as s:
        ledger.grant_pack(s, user_id="idle", credits=40, source_key="pack:idle", now=T0)
        ledger.grant_subscription_period(s, user_id="idle", subscription_id="sub_idle", tier="starter",
                                         period_end=int((now - 2 * DAY).timestamp()), source_key="period:idle", now=T0)
        ledger.grant_subscription_period(s, user_id="active", subscription_id="sub_active", tier="starter",
                                         period_end=int((now + 10 * DAY).timestamp()), source_key="period:active",
                                         now=T0)
    with db.read_session() as s:
        before = {user: ledger.account_summary(s, user).as_dict() for user in ("idle", "active")}
        assert ledger.users_with_lapsed_lots(s) == ["idle"]
        assert s.get(Account, "idle").balance == 140  # the stored total still counts the lapsed lot

    def close_lapsed() -> dict:
        result = subprocess.run([sys.executable, "-m", "billing_core", "close-lapsed", "--json"], cwd=PROJECT_ROOT,
                                env={**os.environ, "DATABASE_URL": database_url}, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)

    assert close_lapsed() == {"accounts": 1, "lots_closed": 1, "credits_lapsed": 100}
    with db.read_session() as s:
        assert {user: ledger.account_summary(s, user).as_dict() for user in ("idle", "active")} == before
        open_lots = s.execute(select(CreditLot.lot_key).where(CreditLot.closed.is_(False))
                              .order_by(CreditLot.lot_key)).scalars().all()
        assert open_lots == ["pack:idle", "period:active"]
        assert s.get(Account, "idle").balance == 40
        assert check_ledger(s).ok
    assert close_lapsed() == {"accounts": 0, "lots_closed": 0, "credits_lapsed": 0}
