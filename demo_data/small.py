"""Demo data for the console's demo mode: sample customers on their own database (data/demo.db).

Every demo account's user id starts with `demo_`, and the command refuses a database that holds
anything else, so demo data is never mixed with real data.
"""
from __future__ import annotations

import random
from datetime import timedelta

from sqlalchemy import func, select

from billing_core import db, ledger
from billing_core.catalog import PACKS, PLANS
from billing_core.models import Account, Payment, Subscription, utcnow
from billing_core.operators import OperatorExists, create_operator
from billing_core.settings import DEMO_DATABASE_URL, mask_url_password, resolve_sqlite_path

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
        ensure_demo_operator(url)  # a demo database filled before operators existed
        return f"demo database already has {existing} demo accounts; left as it is"
    if scale == "large":
        from .large import fill_large

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
    return f"added {accounts} demo accounts to {mask_url_password(url)}; {ensure_demo_operator(url)}"


def _demo_customer(session, rng: random.Random, user_id: str, n: int, now) -> None:
    """One customer's history, played in time order so the timeline reads like a real one."""
    ledger.lock_account(session, user_id=user_id, email=f"user{n:04d}@example.com",
                        stripe_customer_id=f"cus_demo{n:06d}")
    happenings = []  # (when, what, details)
    plan = rng.choice(PLANS + (None,))
    status = None
    if plan is not None:
        sub_id = f"sub_demo{n:06d}"
        status = rng.choices(["active", "past_due", "canceled"], weights=[8, 1, 1])[0]
        current_end = now + timedelta(days=rng.randint(1, 29))
        for month in range(rng.randint(1, 6)):
            period_end = current_end - timedelta(days=30 * month)
            happenings.append((period_end - timedelta(days=30), "renewal", (sub_id, plan, period_end, month)))
        if status == "canceled":
            happenings.append((now - timedelta(hours=rng.randint(1, 72)), "cancel", sub_id))
        # active first; going past due or canceled is a change at its moment, as the handlers make it
        session.add(Subscription(id=sub_id, user_id=user_id, tier=plan.key, status="active",
                                 current_period_end=int(current_end.timestamp()), state_at=int(now.timestamp())))
        session.flush()
    for k in range(rng.randint(0, 2)):
        happenings.append((now - timedelta(days=rng.randint(0, 90), hours=rng.randint(0, 23)), "pack",
                           (rng.choice(PACKS), k)))
    for k in range(rng.randint(0, 6)):
        happenings.append((now - timedelta(days=rng.randint(0, 60), minutes=rng.randint(0, 1440)), "spend", k))
    if n % 17 == 5:
        happenings.append((now - timedelta(days=rng.randint(0, 20)), "goodwill", None))
    if status == "past_due":
        happenings.append((now - timedelta(hours=rng.randint(1, 48)), "past_due", sub_id))
    for when, what, details in sorted(happenings, key=lambda h: h[0]):
        with ledger.recorded_at(when):
            _play(session, rng, user_id, n, when, what, details)


def _play(session, rng: random.Random, user_id: str, n: int, when, what: str, details) -> None:
    if what == "renewal":
        sub_id, plan, period_end, month = details
        payment = _demo_payment(session, user_id=user_id, when=when, item=plan, source="invoice",
                                invoice_id=f"in_demo{n:06d}_{month}", subscription_id=sub_id)
        ledger.grant_subscription_period(session, user_id=user_id, subscription_id=sub_id,
                                         period_end=int(period_end.timestamp()), tier=plan.key,
                                         source_key=f"invoice:{payment.invoice_id}", payment_id=payment.id, now=when)
    elif what == "cancel":
        _change_status(session, details, "canceled", when)
        ledger.expire_subscription_credits(session, user_id=user_id, subscription_id=details,
                                           reason="subscription canceled", now=when)
    elif what == "past_due":
        _change_status(session, details, "past_due", when)
    elif what == "pack":
        pack, k = details
        payment = _demo_payment(session, user_id=user_id, when=when, item=pack, source="checkout",
                                checkout_session_id=f"cs_demo{n:06d}_{k}")
        ledger.grant_pack(session, user_id=user_id, credits=pack.credits,
                          source_key=f"checkout:{payment.checkout_session_id}", payment_id=payment.id, now=when)
    elif what == "spend":
        available = ledger.spendable_balance(session, user_id, now=when)
        if available > 0:
            ledger.consume(session, user_id=user_id, credits=rng.randint(1, max(1, available // 3)),
                           reference=f"agent-run-{details}", now=when)
    elif what == "goodwill":
        ledger.adjust(session, user_id=user_id, credits=25, reason="goodwill after an agent outage",
                      operator="demo", now=when)


def _change_status(session, sub_id: str, status: str, when) -> None:
    row = session.get(Subscription, sub_id)
    row.status, row.updated_at = status, when
    session.add(row)
    session.flush()


def _demo_payment(session, *, user_id: str, when, item, source: str, **ids) -> Payment:
    payment = Payment(user_id=user_id, source=source, item=item.key, kind=item.kind, amount_cents=item.amount_cents,
                      status="paid", credits_granted=item.credits, created_at=when, updated_at=when, **ids)
    session.add(payment)
    session.flush()
    return payment


def is_demo_database(url: str) -> bool:
    from billing_core import settings  # looked up at call time: tests point DEMO_DATABASE_URL elsewhere

    return resolve_sqlite_path(url) == resolve_sqlite_path(settings.DEMO_DATABASE_URL)


def ensure_demo_operator(url: str) -> str:
    """Creates the demo operator, whose password the sign-in page publishes, in the demo database only:
    anywhere else it would be a known-password admin. Returns what to tell the user about signing in."""
    if not is_demo_database(url):
        return ("no demo operator (not the demo database); create one with "
                "`python -m billing_core add-operator NAME --role admin`")
    try:
        with db.write_session(db.get_engine(url)) as session:
            create_operator(session, name=DEMO_OPERATOR[0], role="admin", password=DEMO_OPERATOR[1])
    except OperatorExists:
        pass
    return f"sign in as {DEMO_OPERATOR[0]!r} with password {DEMO_OPERATOR[1]!r}"
