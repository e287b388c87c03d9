"""The dashboard's rollups (migration 0007), on SQLite and PostgreSQL: the totals the triggers keep equal a
direct aggregate of the rows; MRR follows renewals, discounts, upgrades, past-due and cancelation; the
migration's back-fill of an existing database gives the same figures as the triggers."""
from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import pytest
from alembic import command
from sqlalchemy import create_engine, func, select, text

from billing_core import db, ledger, reports
from billing_core.models import LedgerEntry, Payment, Subscription
from billing_core.rollups import LedgerHourly, PaymentHourly, SubscriptionPeriod
from conftest import PG_URL

UTC = timezone.utc
T0 = datetime(2026, 3, 1, tzinfo=UTC)


def at(month: int, day: int, hour: int = 0) -> datetime:
    return datetime(2026, month, day, hour, tzinfo=UTC)


def pay(session, *, user, sub=None, kind="plan", item="starter", amount, created, currency="usd",
        status="paid") -> Payment:
    payment = Payment(user_id=user, source="invoice" if kind == "plan" else "checkout", subscription_id=sub,
                      kind=kind, item=item, amount_cents=amount, currency=currency, status=status,
                      invoice_id=f"in_{uuid.uuid4().hex[:10]}" if kind == "plan" else None,
                      created_at=created, updated_at=created)
    session.add(payment)
    session.flush()
    return payment


def period(session, *, user, sub, tier, payment, start, end, upgrade_from=None) -> None:
    with ledger.recorded_at(start + timedelta(seconds=5)):
        if upgrade_from:
            ledger.grant_upgrade_topup(session, user_id=user, subscription_id=sub, period_end=int(end.timestamp()),
                                       from_tier=upgrade_from, to_tier=tier, payment_id=payment.id,
                                       source_key=f"invoice:{payment.invoice_id}:upgrade", now=start)
        else:
            ledger.grant_subscription_period(session, user_id=user, subscription_id=sub, tier=tier,
                                             period_end=int(end.timestamp()), payment_id=payment.id,
                                             source_key=f"invoice:{payment.invoice_id}:period", now=start)


def set_status(session, sub_id: str, status: str, when: datetime) -> None:
    row = session.get(Subscription, sub_id)
    row.status, row.updated_at = status, when
    session.add(row)
    session.flush()


def write_history(engine, *, stop_before_late_payment: bool = False) -> None:
    """Subscriptions and packs from March to May 2026, written as the handlers write them."""
    with db.write_session(engine) as session:
        for user, sub, tier in (("a", "sub_a", "starter"), ("b", "sub_b", "professional"), ("c", "sub_c", "starter"),
                                ("d", "sub_d", "starter")):
            ledger.lock_account(session, user_id=user)
            session.add(Subscription(id=sub, user_id=user, tier=tier, status="active", created_at=T0, updated_at=T0))
        session.flush()
        # a: starter from March 1, renewed April 1, canceled April 15
        p = pay(session, user="a", sub="sub_a", amount=999, created=at(3, 1))
        period(session, user="a", sub="sub_a", tier="starter", payment=p, start=at(3, 1), end=at(4, 1))
        p = pay(session, user="a", sub="sub_a", amount=999, created=at(4, 1))
        period(session, user="a", sub="sub_a", tier="starter", payment=p, start=at(4, 1), end=at(5, 1))
        with ledger.recorded_at(at(4, 3)):
            ledger.consume(session, user_id="a", credits=30, reference="run-a", now=at(4, 3))
        set_status(session, "sub_a", "canceled", at(4, 15))
        # b: professional at half price from March 6; upgraded to business on March 21 (proration at half price)
        p = pay(session, user="b", sub="sub_b", item="professional", amount=1500, created=at(3, 6))
        period(session, user="b", sub="sub_b", tier="professional", payment=p, start=at(3, 6), end=at(4, 6))
        proration = round((9999 - 2999) * 0.5 * 16 / 31)
        p = pay(session, user="b", sub="sub_b", item="business", amount=proration, created=at(3, 21))
        period(session, user="b", sub="sub_b", tier="business", payment=p, start=at(3, 21), end=at(4, 6),
               upgrade_from="professional")
        p = pay(session, user="b", sub="sub_b", item="business", amount=5000, created=at(4, 6))
        period(session, user="b", sub="sub_b", tier="business", payment=p, start=at(4, 6), end=at(5, 6))
        p = pay(session, user="b", sub="sub_b", item="business", amount=5000, created=at(5, 6))
        period(session, user="b", sub="sub_b", tier="business", payment=p, start=at(5, 6), end=at(6, 6))
        # c: starter from March 10; the April renewal fails, the subscription goes past due, then it is paid
        p = pay(session, user="c", sub="sub_c", amount=999, created=at(3, 10))
        period(session, user="c", sub="sub_c", tier="starter", payment=p, start=at(3, 10), end=at(4, 10))
        late = pay(session, user="c", sub="sub_c", amount=999, created=at(4, 10), status="failed")
        set_status(session, "sub_c", "past_due", at(4, 10, 1))
        # d: in euros
        p = pay(session, user="d", sub="sub_d", amount=900, created=at(3, 2), currency="eur")
        period(session, user="d", sub="sub_d", tier="starter", payment=p, start=at(3, 2), end=at(4, 2))
        p = pay(session, user="d", sub="sub_d", amount=900, created=at(4, 2), currency="eur")
        period(session, user="d", sub="sub_d", tier="starter", payment=p, start=at(4, 2), end=at(5, 2))
        p = pay(session, user="d", sub="sub_d", amount=900, created=at(5, 2), currency="eur")
        period(session, user="d", sub="sub_d", tier="starter", payment=p, start=at(5, 2), end=at(6, 2))
        # packs: one refunded in part, one lost in a dispute, one failed
        packs = [pay(session, user=u, kind="pack", item="pack_500", amount=3500, created=at(3, 15 + n, 9))
                 for n, u in enumerate(("a", "b", "c"))]
        for pack in packs:
            with ledger.recorded_at(pack.created_at + timedelta(seconds=2)):
                ledger.grant_pack(session, user_id=pack.user_id, credits=500, source_key=f"checkout:{pack.id}",
                                  payment_id=pack.id)
        packs[0].status, packs[0].amount_refunded = "partially_refunded", 1750
        packs[1].status, packs[1].amount_disputed_lost = "disputed", 3500
        packs[2].status = "failed"
        session.add_all(packs)
        session.flush()
        if stop_before_late_payment:
            return
        late.status, late.updated_at = "paid", at(4, 13)
        session.add(late)
        set_status(session, "sub_c", "active", at(4, 13))
        period(session, user="c", sub="sub_c", tier="starter", payment=late, start=at(4, 13), end=at(5, 10))


def hourly_from_rows(session) -> tuple[dict, dict]:
    hour = reports._hour_key(session, LedgerEntry.created_at)
    ledger_rows = {(h, k): (int(c), int(n)) for h, k, c, n in session.execute(
        select(hour, LedgerEntry.kind, func.sum(LedgerEntry.credits), func.count())
        .group_by(hour, LedgerEntry.kind)).all()}
    hour = reports._hour_key(session, Payment.created_at)
    collected = Payment.status.not_in(("unpaid", "failed"))
    payment_rows = {(h, k or "other", c, bool(ok)): tuple(int(v) for v in values) for h, k, c, ok, *values in
                    session.execute(select(hour, Payment.kind, Payment.currency, collected, func.count(),
                                           func.sum(Payment.amount_cents), func.sum(Payment.amount_refunded),
                                           func.sum(Payment.amount_disputed_lost), func.sum(Payment.credits_granted))
                                    .group_by(hour, Payment.kind, Payment.currency, collected)).all()}
    return ledger_rows, payment_rows


def hourly_from_rollups(session) -> tuple[dict, dict]:
    ledger_rows = defaultdict(lambda: (0, 0))
    for h, k, c, n in session.execute(select(LedgerHourly.hour, LedgerHourly.kind, LedgerHourly.credits,
                                             LedgerHourly.entries)).all():
        old = ledger_rows[(h, k)]
        ledger_rows[(h, k)] = (old[0] + int(c), old[1] + int(n))
    payment_rows = defaultdict(lambda: (0, 0, 0, 0, 0))
    for row in session.execute(select(PaymentHourly)).scalars():
        key = (row.hour, row.kind, row.currency, bool(row.collected))
        values = (row.payments, row.amount_cents, row.refunded_cents, row.disputed_lost_cents, row.credits_granted)
        payment_rows[key] = tuple(a + int(b) for a, b in zip(payment_rows[key], values))
    drop_zero = lambda rows: {k: v for k, v in rows.items() if any(v)}  # noqa: E731  (rows moved away)
    return drop_zero(ledger_rows), drop_zero(payment_rows)


def test_trigger_totals_equal_direct_aggregates(engine):
    write_history(engine)
    with db.read_session(engine) as session:
        assert hourly_from_rollups(session) == hourly_from_rows(session)


SAMPLES = [at(2, 28), at(3, 1, 12), at(3, 15), at(3, 25), at(4, 5), at(4, 11), at(4, 14), at(4, 20), at(5, 3),
           at(5, 20), at(6, 10)]


def mrr_figures(engine) -> dict:
    with db.read_session(engine) as session:
        points = {moment: reports.mrr_at(session, at=moment) for moment in SAMPLES}
        series = reports.mrr_series(session, since=at(3, 1), until=at(6, 10), tz_name="UTC")
    return {"points": points, "series": series}


def test_mrr_follows_renewals_discounts_upgrades_past_due_and_cancelation(engine):
    write_history(engine, stop_before_late_payment=True)
    with db.read_session(engine) as session:
        # c's renewal failed on April 10: counted apart as past due, not in MRR
        point = reports.mrr_at(session, at=at(4, 11))
        assert point["active"] == {"usd": 999 + 5000, "eur": 900} and point["past_due"] == {"usd": 999}
    with db.write_session(engine) as session:  # paid on April 13: billed from the invoice, past due no more
        late = session.execute(select(Payment).where(Payment.user_id == "c", Payment.kind == "plan", Payment.status == "failed")).scalar_one()
        late.status, late.updated_at = "paid", at(4, 13)
        session.add(late)
        set_status(session, "sub_c", "active", at(4, 13))
        period(session, user="c", sub="sub_c", tier="starter", payment=late, start=at(4, 13), end=at(5, 10))
    figures = mrr_figures(engine)
    points = figures["points"]
    active = lambda moment: points[moment].get("active", {})  # noqa: E731
    assert points[at(2, 28)] == {}
    assert active(at(3, 1, 12)) == {"usd": 999}
    assert active(at(3, 15)) == {"usd": 999 + 1500 + 999, "eur": 900}  # b at half price (a discount)
    upgraded = 1500 + round(round((9999 - 2999) * 0.5 * 16 / 31) * 31 / 16)
    assert abs(upgraded - 5000) <= 2
    assert active(at(3, 25)) == {"usd": 999 + upgraded + 999, "eur": 900}  # b upgraded mid-period
    assert active(at(4, 5)) == {"usd": 999 + upgraded + 999, "eur": 900}
    assert active(at(4, 11)) == {"usd": 999 + 5000 + 999, "eur": 900}
    assert points[at(4, 11)].get("past_due", {}) == {}
    assert active(at(4, 20)) == {"usd": 5000 + 999, "eur": 900}  # a canceled on April 15
    assert active(at(5, 20)) == {"usd": 5000, "eur": 900}  # c not renewed on May 10
    assert active(at(6, 10)) == {}
    series = {(r["period"], r["currency"], r["state"]): r for r in figures["series"]}
    assert series[("2026-03", "usd", "active")]["mrr_cents"] == 999 + upgraded + 999
    assert series[("2026-03", "usd", "active")]["new_cents"] == 999 + 1500 + 999
    assert series[("2026-03", "eur", "active")]["new_cents"] == 900
    assert series[("2026-04", "usd", "active")]["churned_cents"] == 999  # a
    assert series[("2026-04", "usd", "active")]["new_cents"] == 0  # c's late payment is no new MRR
    assert series[("2026-05", "usd", "active")]["churned_cents"] == 999  # c
    assert series[("2026-06", "usd", "active")]["churned_cents"] == 5000  # b's last period ran out June 6
    with db.read_session(engine) as session:  # Home's MRR is the series' last point
        stats = reports.subscription_stats(session, now=at(6, 10))
        assert stats.mrr == {} and series[("2026-06", "eur", "active")]["mrr_cents"] == 0


def revision_before_rollups(url: str) -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(db.alembic_config(url)).get_revision("0007").down_revision


def database_before_rollups(request, tmp_path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/backfill.db"
    else:
        schema = f"backfill_{uuid.uuid4().hex[:8]}"
        admin = create_engine(db.normalize_url(PG_URL), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        request.addfinalizer(lambda: _drop_schema(admin, schema))
        base = db.normalize_url(PG_URL)
        url = f"{base}{'&' if '?' in base else '?'}options={quote(f'-csearch_path={schema}')}"
    cfg = db.alembic_config(url)
    with db.get_engine(url).begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision_before_rollups(url))
    return url


def _drop_schema(admin, schema: str) -> None:
    db.dispose_engines()
    with admin.connect() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(params=["sqlite"] + (["postgresql"] if PG_URL else []))
def old_database(request, tmp_path):
    return database_before_rollups(request, tmp_path)


def test_migration_backfills_the_rollups_as_the_triggers_keep_them(old_database, engine):
    """The same history written before 0007 (then upgraded) and after it (kept by the triggers)."""
    write_history(db.get_engine(old_database))
    db.migrate(old_database)
    write_history(engine)
    upgraded = db.get_engine(old_database)
    assert mrr_figures(upgraded) == mrr_figures(engine)
    with db.read_session(upgraded) as session:
        assert hourly_from_rollups(session) == hourly_from_rows(session)
        spans = lambda s: sorted(  # noqa: E731
            (p.subscription_id, p.state, p.starts_at, p.ends_at, p.amount_cents, p.currency, p.has_successor)
            for p in s.execute(select(SubscriptionPeriod)).scalars() if p.ends_at > p.starts_at)
        backfilled = spans(session)
    with db.read_session(engine) as session:
        assert backfilled == spans(session)


@pytest.mark.parametrize("window", [(None, None), (at(3, 15, 9), None), (None, at(4, 2)),
                                    (at(3, 1, 12), at(4, 6, 0) + timedelta(minutes=30))])
@pytest.mark.parametrize("item", [None, "plan", "pack"])
def test_payment_totals_from_the_rollup_equal_the_rows(engine, window, item):
    write_history(engine)
    start, end = window
    start = start and start + timedelta(minutes=17)  # partial hours at both ends
    filters = reports.PaymentFilter(start=start, end=end, item=item)
    with db.read_session(engine) as session:
        from_rollup = reports.payments_totals(session, filters=filters)
        from_rows = reports.payments_totals(session, filters=reports.PaymentFilter(start=start, end=end, item=item,
                                                                                    user_id=None, status=None))
        direct = reports._payment_totals_rows(session, filters)
    assert from_rollup == from_rows
    assert {c: (int(n), int(a)) for c, n, a, *_ in direct} == {t.currency: (t.count, t.amount_cents)
                                                                 for t in from_rollup}


def test_the_hour_under_way_comes_from_the_rollup_less_what_came_after(engine, monkeypatch):
    """A range ending inside the current hour reads that hour from the rollup and subtracts the rows written
    after its end: the same totals as the rows themselves."""
    now = at(5, 20, 10) + timedelta(minutes=40)
    monkeypatch.setattr(reports, "utcnow", lambda: now)
    with db.write_session(engine) as session:
        ledger.lock_account(session, user_id="z")
        for minutes in (5, 25, 35, 39):  # two before the range's end (10:30), two after
            created = at(5, 20, 10) + timedelta(minutes=minutes)
            pack = pay(session, user="z", kind="pack", item="pack_100", amount=1000 + minutes, created=created)
            with ledger.recorded_at(created):
                ledger.grant_pack(session, user_id="z", credits=100 + minutes, source_key=f"k{minutes}",
                                  payment_id=pack.id)
    until = at(5, 20, 10) + timedelta(minutes=30)
    assert reports._split_hours(at(5, 20, 8), until)[0] == [(until, at(5, 20, 11), -1)]
    with db.read_session(engine) as session:
        [cash] = reports.revenue_since(session, since=at(5, 20, 8), until=until)
        flows = reports._ledger_sums(session, since=at(5, 20, 8), until=until)
    assert (cash.payments, cash.gross_cents) == (2, 1005 + 1025)
    assert flows["pack_grant"] == 105 + 125


def test_credit_flows_equal_the_entries_by_local_month(engine):
    write_history(engine)
    from billing_core.formatting import local_time
    from billing_core.models import CreditLot

    now = at(6, 10, 12)
    with db.read_session(engine) as session:
        flows = reports.credit_flows(session, since=at(2, 15), now=now, tz_name="Europe/Berlin")
        by_kind = defaultdict(int)
        for created, kind, credits in session.execute(select(LedgerEntry.created_at, LedgerEntry.kind,
                                                             LedgerEntry.credits)).all():
            if kind in reports.FLOW_OF_KIND and at(2, 15) <= created.replace(tzinfo=UTC) < now:
                by_kind[(local_time(created, "Europe/Berlin").strftime("%Y-%m"), kind)] += credits
        expected = defaultdict(int)
        for (period, kind), credits in by_kind.items():
            expected[(period, reports.FLOW_OF_KIND[kind])] += abs(credits)
        for expires, remaining in session.execute(select(CreditLot.expires_at, CreditLot.remaining)).all():
            if expires is not None and at(2, 15) < expires.replace(tzinfo=UTC) <= now:
                expected[(local_time(expires, "Europe/Berlin").strftime("%Y-%m"), "expired")] += remaining
    assert {(f["period"], f["flow"]): f["credits"] for f in flows} == {k: v for k, v in expected.items() if v}
