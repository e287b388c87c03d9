"""The ledger rules of issue 2, on SQLite and PostgreSQL."""
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select, text

from billing_core import db, ledger
from billing_core.models import Account, LedgerEntry, Payment, Subscription
from concurrency import run_threads

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
DAY = 86400


def epoch(dt: datetime) -> int:
    return int(dt.timestamp())


P1_END = epoch(T0 + timedelta(days=30))
P2_END = epoch(T0 + timedelta(days=60))


def summary(user="u1", now=T0):
    with db.read_session() as s:
        return ledger.account_summary(s, user, now=now)


def bal(user="u1", now=T0):
    with db.read_session() as s:
        return ledger.balance(s, user, now=now)


def spendable(user="u1", now=T0):
    with db.read_session() as s:
        return ledger.spendable_balance(s, user, now=now)


def pack(user="u1", credits=100, key="pack:1", payment_id=None):
    with db.write_session() as s:
        return ledger.grant_pack(s, user_id=user, credits=credits, source_key=key, payment_id=payment_id, now=T0)


def sub_grant(user="u1", sub="sub_1", period_end=P1_END, tier="starter", key=None, payment_id=None, now=T0,
              rollover=False):
    with db.write_session() as s:
        return ledger.grant_subscription_period(s, user_id=user, subscription_id=sub, period_end=period_end, tier=tier,
                                                source_key=key or f"grant:{sub}:{period_end}:{tier}",
                                                payment_id=payment_id, rollover=rollover, now=now)


def topup(from_tier, to_tier, key, user="u1", sub="sub_1", period_end=P1_END, payment_id=None, claims_lot=None):
    with db.write_session() as s:
        return ledger.grant_upgrade_topup(s, user_id=user, subscription_id=sub, period_end=period_end,
                                          from_tier=from_tier, to_tier=to_tier, source_key=key, payment_id=payment_id,
                                          claims_lot=claims_lot, now=T0)


def spend(credits, reference, user="u1", now=T0):
    with db.write_session() as s:
        return ledger.consume(s, user_id=user, credits=credits, reference=reference, now=now)


def set_subscription(user="u1", sub="sub_1", status="active", tier="starter", period_end=P1_END):
    with db.write_session() as s:
        ledger.lock_account(s, user_id=user)
        row = s.get(Subscription, sub) or Subscription(id=sub, user_id=user)
        row.status, row.tier, row.current_period_end = status, tier, period_end
        s.add(row)


def make_payment(user="u1", amount=1000, item="pack_100", kind="pack", key="cs_1"):
    with db.write_session() as s:
        ledger.lock_account(s, user_id=user)
        payment = Payment(user_id=user, source="checkout", checkout_session_id=key, item=item, kind=kind,
                          amount_cents=amount, currency="usd", status="paid")
        s.add(payment)
        s.flush()
        return payment.id


def load_payment(payment_id):
    with db.read_session() as s:
        return s.get(Payment, payment_id)


def entries(user="u1"):
    with db.read_session() as s:
        return list(s.exec(select(LedgerEntry).where(LedgerEntry.user_id == user).order_by(LedgerEntry.id)).scalars())


# --- grants and expiry --------------------------------------------------------------------

def test_pack_credits_never_expire(database_url):
    pack(credits=250)
    assert bal(now=T0 + timedelta(days=3650)) == 250


def test_same_source_key_applies_once(database_url):
    assert pack(key="pack:dup") is not None
    assert pack(key="pack:dup") is None
    assert bal() == 100


def test_subscription_credits_expire_exactly_at_period_end(database_url):
    sub_grant(period_end=P1_END)
    end = datetime.fromtimestamp(P1_END, timezone.utc)
    assert bal(now=end - timedelta(seconds=1)) == 100
    assert bal(now=end) == 0
    assert summary(now=end).breakdown == []


def test_grant_is_spendable_before_its_period_starts(database_url):
    sub_grant(period_end=P2_END)  # renewal paid early: period 2 starts at P1_END
    assert spendable() == 100


def test_next_period_grant_expires_the_previous_period_at_once(database_url):
    sub_grant(period_end=P1_END)
    spend(30, "r1")
    sub_grant(period_end=P2_END, now=T0 + timedelta(days=29))
    now = T0 + timedelta(days=29)
    assert bal(now=now) == 100
    expired = [e for e in entries() if e.kind == "expire"]
    assert [e.credits for e in expired] == [-70]


def test_a_period_grant_under_a_used_source_key_grants_nothing_and_closes_no_earlier_period(database_url):
    assert sub_grant(period_end=P2_END, key="invoice:in_2") is not None
    assert sub_grant(period_end=P1_END, key="invoice:in_1") is not None  # an earlier period, granted late
    assert bal() == 200
    # the same source key again, now for more than the period holds: still nothing, and the earlier lot stays
    assert sub_grant(period_end=P2_END, key="invoice:in_2", tier="professional") is None
    assert bal() == 200 and [e.kind for e in entries()] == ["subscription_grant", "subscription_grant"]


def test_rollover_keeps_unused_subscription_credits(database_url):
    sub_grant(period_end=P1_END, rollover=True)  # SUBSCRIPTION_CREDITS_ROLLOVER=true: the handlers pass it
    sub_grant(period_end=P2_END, rollover=True)
    assert bal(now=T0 + timedelta(days=45)) == 200
    assert bal(now=T0 + timedelta(days=400)) == 200


def test_spending_takes_soonest_expiring_first_then_packs(database_url):
    pack(credits=100)
    sub_grant(sub="sub_b", period_end=P2_END, tier="starter")
    sub_grant(sub="sub_a", period_end=P1_END, tier="starter")
    spend(150, "r1")
    rows = {row["lot"]: row["credits"] for row in summary().breakdown}
    assert rows == {f"grant:sub_b:{P2_END}:starter": 50, "pack:1": 100}


# --- upgrades, downgrades, cancellation, past due ------------------------------------------

def test_upgrade_tops_up_the_difference_once_per_period(database_url):
    sub_grant(tier="starter")
    topup("starter", "professional", "upgrade:sub_1:p1:professional")
    topup("starter", "professional", "invoice:in_9:upgrade")  # the proration invoice reports it too
    assert bal() == 500
    topup("professional", "business", "upgrade:sub_1:p1:business")
    assert bal() == 2000


def test_upgrade_before_base_grant_still_ends_at_the_higher_allowance(database_url):
    topup("starter", "professional", "upgrade:first")
    sub_grant(tier="starter", key="invoice:create")
    assert bal() == 500
    assert [(r["credits"], r["lot"]) for r in summary().breakdown] == [(400, "upgrade:first"), (100, "invoice:create")] \
        or sorted(r["credits"] for r in summary().breakdown) == [100, 400]


def test_downgrade_takes_nothing_back_and_next_period_gets_the_lower_allowance(database_url):
    sub_grant(tier="business")
    topup("business", "starter", "downgrade")
    topup("starter", "business", "back-up-again")  # moving back up within the period adds nothing
    assert bal() == 2000
    sub_grant(tier="starter", period_end=P2_END)
    assert bal(now=T0 + timedelta(days=31)) == 100


def test_a_paying_invoice_claims_the_top_up_a_subscription_event_granted(database_url):
    topup("starter", "professional", "upgrade:sub_1:p1:professional")
    pid = make_payment(amount=1600, item="professional", kind="plan", key="cs_upgrade")
    topup("starter", "professional", "invoice:in_up:upgrade", payment_id=pid,
          claims_lot="upgrade:sub_1:p1:professional")
    with db.write_session() as s:
        payment = s.get(Payment, pid)
        assert ledger.credits_paid_by(s, payment) == 400
        assert ledger.clawback_for_payment(s, payment=payment, reversed_cents=800, now=T0) == 200
    assert bal() == 200


def test_cancellation_expires_subscription_credits_but_keeps_packs(database_url):
    pack(credits=250)
    sub_grant(tier="professional")
    with db.write_session() as s:
        ledger.expire_subscription_credits(s, user_id="u1", subscription_id="sub_1", reason="canceled", now=T0)
    assert bal() == 250
    assert [r["source"] for r in summary().breakdown] == ["pack"]


def test_past_due_freezes_subscription_credits_but_not_packs(database_url):
    pack(credits=40)
    sub_grant(tier="starter")
    set_subscription(status="past_due")
    assert bal() == 140 and spendable() == 40
    with pytest.raises(ledger.InsufficientCredits):
        spend(41, "too-much")
    spend(40, "ok")
    assert bal() == 100
    assert summary().breakdown[0]["frozen"] is True
    set_subscription(status="active")
    assert spendable() == 100


# --- refunds and disputes -----------------------------------------------------------------

def test_refund_takes_back_credits_in_proportion_and_is_idempotent_on_the_cumulative_amount(database_url):
    pid = make_payment(amount=2000)
    pack(credits=250, key="checkout:cs_1", payment_id=pid)
    with db.write_session() as s:
        assert ledger.clawback_for_payment(s, payment=load_payment(pid), reversed_cents=1000, now=T0) == 125
    assert bal() == 125
    with db.write_session() as s:  # the same refund reported again, then a late event with less
        assert ledger.clawback_for_payment(s, payment=load_payment(pid), reversed_cents=1000, now=T0) == 0
        assert ledger.clawback_for_payment(s, payment=load_payment(pid), reversed_cents=500, now=T0) == 0
    with db.write_session() as s:
        assert ledger.clawback_for_payment(s, payment=load_payment(pid), reversed_cents=2000, now=T0) == 125
    assert bal() == 0


def test_refund_after_spending_leaves_a_negative_flagged_balance(database_url):
    pid = make_payment(amount=1000)
    pack(credits=100, key="checkout:cs_1", payment_id=pid)
    spend(80, "r1")
    with db.write_session() as s:
        ledger.clawback_for_payment(s, payment=load_payment(pid), reversed_cents=1000, now=T0)
    s = summary()
    assert s.balance == -80 and s.flagged and "negative balance" in s.flag_reason
    assert s.spendable_balance == 0
    with pytest.raises(ledger.AccountFlagged):
        spend(1, "r2")


def test_debt_is_settled_by_the_next_grant_and_does_not_return_when_it_expires(database_url):
    pid = make_payment(amount=1000)
    pack(credits=100, key="checkout:cs_1", payment_id=pid)
    spend(100, "r1")
    with db.write_session() as s:
        ledger.clawback_for_payment(s, payment=load_payment(pid), reversed_cents=1000, now=T0)
    assert bal() == -100
    sub_grant(tier="professional")
    assert bal() == 400 and not summary().flagged
    end = datetime.fromtimestamp(P1_END, timezone.utc)
    assert bal(now=end) == 0


def test_dispute_holds_then_releases_when_won(database_url):
    pid = make_payment(amount=1000)
    pack(credits=100, key="checkout:cs_1", payment_id=pid)
    pack(credits=50, key="other")
    spend(30, "r1")  # from the first lot (same expiry: oldest first)
    with db.write_session() as s:
        account = ledger.lock_account(s, user_id="u1")
        account.open_disputes += 1
        assert ledger.hold_for_dispute(s, dispute_id="dp_1", payment=load_payment(pid), now=T0) == 70
        ledger.refresh_flag(s, account, now=T0)
    held = summary()
    assert held.balance == 50 and held.flagged and held.flag_reason == "open dispute"
    with db.write_session() as s:
        account = ledger.lock_account(s, user_id="u1")
        account.open_disputes -= 1
        assert ledger.release_dispute_hold(s, dispute_id="dp_1", user_id="u1", now=T0) == 70
        assert ledger.release_dispute_hold(s, dispute_id="dp_1", user_id="u1", now=T0) == 0
        ledger.refresh_flag(s, account, now=T0)
    released = summary()
    assert released.balance == 120 and not released.flagged


# --- adjustments --------------------------------------------------------------------------

def test_adjustment_records_operator_and_reason(database_url):
    with db.write_session() as s:
        ledger.adjust(s, user_id="new-user", credits=25, reason="goodwill", operator="alice")
    (entry,) = entries("new-user")
    assert (entry.credits, entry.kind, entry.operator, entry.reason) == (25, "adjustment", "alice", "goodwill")
    assert bal("new-user", now=T0 + timedelta(days=5000)) == 25


@pytest.mark.parametrize("kwargs,message", [
    ({"credits": 5, "reason": " ", "operator": "a"}, "reason is required"),
    ({"credits": 5, "reason": "x", "operator": ""}, "operator"),
    ({"credits": 0, "reason": "x", "operator": "a"}, "must not be zero"),
    ({"credits": 1.5, "reason": "x", "operator": "a"}, "whole number"),
    ({"credits": True, "reason": "x", "operator": "a"}, "whole number"),
])
def test_bad_adjustments_are_refused_and_write_nothing(database_url, kwargs, message):
    with pytest.raises(ledger.LedgerError, match=message):
        with db.write_session() as s:
            ledger.adjust(s, user_id="u1", **kwargs)
    with db.read_session() as s:
        assert s.get(Account, "u1") is None
    assert entries() == []


def test_negative_adjustment_may_not_go_below_zero_unless_allowed(database_url):
    pack(credits=10)
    with pytest.raises(ledger.WouldGoNegative):
        with db.write_session() as s:
            ledger.adjust(s, user_id="u1", credits=-11, reason="fix", operator="a")
    assert bal() == 10
    with db.write_session() as s:
        ledger.adjust(s, user_id="u1", credits=-11, reason="fix", operator="a", allow_negative=True)
    assert bal() == -1 and summary().flagged


# --- spending -----------------------------------------------------------------------------

def test_consume_is_idempotent_per_reference(database_url):
    pack(credits=100)
    first = spend(30, "job-1")
    again = spend(30, "job-1")
    assert (first.balance, again.balance, again.replayed) == (70, 70, True)
    assert bal() == 70
    with pytest.raises(ledger.ReferenceConflict):
        spend(31, "job-1")


def test_consume_refuses_insufficient_credits_and_unknown_accounts(database_url):
    pack(credits=5)
    with pytest.raises(ledger.InsufficientCredits, match="insufficient credits"):
        spend(6, "big")
    with pytest.raises(ledger.UnknownAccount, match="insufficient credits"):
        spend(1, "x", user="nobody")
    with db.read_session() as s:
        assert s.get(Account, "nobody") is None
    assert bal() == 5


@pytest.mark.parametrize("credits,reference", [(0, "r"), (-1, "r"), (2.0, "r"), (1, ""), (1, "x" * 201)])
def test_consume_checks_its_input(database_url, credits, reference):
    pack(credits=5)
    with pytest.raises(ledger.LedgerError):
        spend(credits, reference)
    assert bal() == 5


def test_ledger_is_append_only_in_the_database(database_url):
    pack(credits=5)
    with pytest.raises(Exception):
        with db.write_session() as s:
            s.execute(text("UPDATE ledger_entry SET credits = 500"))
    with pytest.raises(Exception):
        with db.write_session() as s:
            s.execute(text("DELETE FROM ledger_entry"))
    assert bal() == 5


# --- concurrency --------------------------------------------------------------------------

def test_concurrent_spends_never_overspend_or_lose_a_spend(database_url):
    pack(credits=100)
    successes = []

    def one_spend(n):
        try:
            spend(3, f"job-{n}")
            successes.append(n)
        except ledger.InsufficientCredits:
            pass

    errors = run_threads(40, one_spend)
    assert errors == []
    assert len(successes) == 33
    assert bal() == 100 - 3 * 33 == 1


def test_concurrent_mixed_writers_keep_the_balance_exact(database_url):
    def work(n):
        for k in range(5):
            if n % 2 == 0:
                pack(credits=10, key=f"pack:{n}:{k}")
                pack(credits=10, key=f"pack:{n}:{k}")  # duplicate delivery
            else:
                with db.write_session() as s:
                    ledger.adjust(s, user_id="u1", credits=7, reason="load", operator="t",
                                  source_key=f"adj:{n}:{k}")
            spend(2, f"s:{n}:{k}")
            spend(2, f"s:{n}:{k}")  # retried spend

    pack(credits=1000, key="seed")
    errors = run_threads(8, work)
    assert errors == []
    assert bal() == 1000 + 4 * 5 * 10 + 4 * 5 * 7 - 8 * 5 * 2


@pytest.mark.parametrize("user_id", ["a\x7fb", "a\u200bb", "a\u2028b", "bidi\u202e", "tab\there", "x" * 201])
def test_user_ids_with_invisible_characters_or_too_long_are_refused(database_url, user_id):
    with pytest.raises(ledger.LedgerError, match="user id"):
        with db.write_session() as s:
            ledger.adjust(s, user_id=user_id, credits=5, reason="r", operator="o")
    with db.read_session() as s:
        assert s.execute(select(Account)).first() is None


@pytest.mark.parametrize("field,value,message", [
    ("reason", "x" * 501, "longer than 500"),
    ("operator", "o" * 201, "longer than 200"),
    ("operator", "al\x00ice", "control or invisible"),
    ("reason", "refund\x1b[31m", "control or invisible"),
])
def test_adjustment_text_is_bounded_and_printable_on_both_databases(database_url, field, value, message):
    kwargs = {"credits": 5, "reason": "fine", "operator": "alice", field: value}
    with pytest.raises(ledger.LedgerError, match=message):
        with db.write_session() as s:
            ledger.adjust(s, user_id="u1", **kwargs)
    assert entries() == []


def test_multi_line_reasons_are_kept(database_url):
    with db.write_session() as s:
        ledger.adjust(s, user_id="u1", credits=5, reason="line one\nline two", operator="alice")
    assert entries()[0].reason == "line one\nline two"


def test_spend_reference_with_control_characters_is_refused(database_url):
    pack(credits=5)
    with pytest.raises(ledger.LedgerError, match="reference"):
        spend(1, "job\x00-1")
    assert bal() == 5


@pytest.mark.parametrize("text", ["２", "²", "1e3", "0x10", "", "+", "--5"])
def test_typed_credits_must_be_ascii_whole_numbers(text):
    with pytest.raises(ledger.LedgerError, match="whole number"):
        ledger.parse_credits(text, allow_negative=True)
    assert ledger.parse_credits(" -1_000 ", allow_negative=True) == -1000
