"""Demo data for the console's demo mode: sample customers on their own database (data/demo.db).

Every demo account's user id starts with `demo_`, and the command refuses a database that holds
anything else, so demo data is never mixed with real data.
"""
from __future__ import annotations

import random
from datetime import timedelta

from sqlalchemy import func, select

from . import db, ledger
from .catalog import PACKS, PLANS
from .models import Account, Payment, Subscription, utcnow
from .settings import DEMO_DATABASE_URL, resolve_sqlite_path

DEMO_PREFIX = "demo_"
DEMO_OPERATOR = ("demo", "demo-password")


class NotADemoDatabase(ValueError):
    pass


def _check_target(url: str) -> int:
    """How many demo accounts the database already has; refuses one that holds real accounts."""
    with db.read_session(db.get_engine(url)) as session:
        real = session.execute(select(func.count()).select_from(Account)
                               .where(~Account.user_id.startswith(DEMO_PREFIX))).scalar_one()
        demo = session.execute(select(func.count()).select_from(Account)
                               .where(Account.user_id.startswith(DEMO_PREFIX))).scalar_one()
    if real:
        raise NotADemoDatabase(f"refusing to add demo data: the database holds {real} real account(s)")
    return demo


def fill_demo_database(*, database_url: str | None = None, scale: str = "small", if_empty: bool = False,
                       seed: int = 7) -> str:
    url = resolve_sqlite_path(database_url or DEMO_DATABASE_URL)
    db.migrate(url)
    existing = _check_target(url)
    if existing and if_empty:
        _create_demo_operator(db.get_engine(url))  # a demo database filled before operators existed
        return f"demo database already has {existing} demo accounts; left as it is"
    if scale == "large":
        from .demo_large import fill_large

        return fill_large(url, seed=seed)
    return _fill_small(url, seed=seed, start=existing)


def _fill_small(url: str, *, seed: int, start: int, accounts: int = 40) -> str:
    rng = random.Random(seed + start)
    engine = db.get_engine(url)
    now = utcnow()
    for n in range(start, start + accounts):
        user_id = f"{DEMO_PREFIX}user_{n:04d}"
        with db.write_session(engine) as session:
            _demo_customer(session, rng, user_id, n, now)
    _create_demo_operator(engine)
    return (f"added {accounts} demo accounts to {url}; sign in as "
            f"{DEMO_OPERATOR[0]!r} with password {DEMO_OPERATOR[1]!r}")


def _demo_customer(session, rng: random.Random, user_id: str, n: int, now) -> None:
    ledger.lock_account(session, user_id=user_id, email=f"user{n:04d}@example.com",
                                  stripe_customer_id=f"cus_demo{n:06d}")
    plan = rng.choice(PLANS + (None,))
    if plan is not None:
        sub_id = f"sub_demo{n:06d}"
        months = rng.randint(1, 6)
        status = rng.choices(["active", "past_due", "canceled"], weights=[8, 1, 1])[0]
        period_end = int((now + timedelta(days=rng.randint(1, 29))).timestamp())
        session.add(Subscription(id=sub_id, user_id=user_id, tier=plan.key, status=status,
                                 current_period_end=period_end, state_at=int(now.timestamp())))
        for month in range(months, 0, -1):
            paid_at = now - timedelta(days=30 * month - rng.randint(0, 3))
            payment = Payment(user_id=user_id, source="invoice", invoice_id=f"in_demo{n:06d}_{month}",
                              subscription_id=sub_id, item=plan.key, kind="plan", amount_cents=plan.amount_cents,
                              status="paid", credits_granted=plan.credits, created_at=paid_at, updated_at=paid_at)
            session.add(payment)
            session.flush()
            pe = period_end - 30 * 86400 * (month - 1)
            ledger.grant_subscription_period(session, user_id=user_id, subscription_id=sub_id, period_end=pe,
                                             tier=plan.key, source_key=f"invoice:{payment.invoice_id}",
                                             payment_id=payment.id)
        if status == "canceled":
            ledger.expire_subscription_credits(session, user_id=user_id, subscription_id=sub_id,
                                               reason="subscription canceled")
    for k in range(rng.randint(0, 2)):
        pack = rng.choice(PACKS)
        paid_at = now - timedelta(days=rng.randint(0, 90))
        payment = Payment(user_id=user_id, source="checkout", checkout_session_id=f"cs_demo{n:06d}_{k}",
                          item=pack.key, kind="pack", amount_cents=pack.amount_cents, status="paid",
                          credits_granted=pack.credits, created_at=paid_at, updated_at=paid_at)
        session.add(payment)
        session.flush()
        ledger.grant_pack(session, user_id=user_id, credits=pack.credits,
                          source_key=f"checkout:{payment.checkout_session_id}", payment_id=payment.id)
    for k in range(rng.randint(0, 6)):
        available = ledger.spendable_balance(session, user_id)
        if available <= 0:
            break
        ledger.consume(session, user_id=user_id, credits=rng.randint(1, max(1, available // 3)),
                       reference=f"demo-run-{k}")
    if n % 17 == 5:
        ledger.adjust(session, user_id=user_id, credits=25, reason="goodwill after an agent outage",
                      operator="demo")


def _create_demo_operator(engine) -> None:
    try:
        from .operators import create_operator, OperatorExists
    except ModuleNotFoundError:
        return
    try:
        with db.write_session(engine) as session:
            create_operator(session, name=DEMO_OPERATOR[0], role="admin", password=DEMO_OPERATOR[1])
    except OperatorExists:
        pass
