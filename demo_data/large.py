"""`demo-data --scale large`: 100,000 accounts, 200,000 payments and 1,000,000 ledger entries, for
measuring the dashboard at scale.

The rows follow the ledger's data model exactly (see ledger.py): every grant opens a lot keyed by its
own source key; spends, expiries, clawbacks and dispute holds draw on a lot and never take more than
it holds; each spend has its Consumption record. Each lot's `credit_lot` row and each account's totals
are filled as the ledger keeps them (`check-ledger` is clean). They are written with bulk Core inserts in one
transaction per chunk of accounts, so the whole set takes about a minute on SQLite.

Every account has exactly two payments and ten ledger entries:
- subscribers (60%): two monthly periods (invoice payments); period 1's grant, three spends, the
  expiry of what was left when period 2's grant arrived, period 2's grant and four spends (a canceled
  subscription's last entry is the cancellation expiry instead);
- pack buyers (40%): two pack grants and eight entries drawing on them: spends, and for some accounts
  a full refund's clawback, a goodwill adjustment, or an open dispute's hold (flagged).

A subscription that is past due or canceled is written active and then changed at the moment it went
past due or was canceled, as the webhook handlers change it, so the dashboard's MRR rollups (migration
0007) see the change. The Webhook events and Checkout links pages are measured at scale too: three
stored Stripe events per account (300,000; a few needing attention or failed, some on an older API
version) and a checkout link for every other account (50,000).
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import stripe
from sqlalchemy import bindparam, func, select

from billing_core import db
from billing_core.catalog import PACKS, PLANS
from billing_core.models import (Account, CheckoutLink, Consumption, CreditLot, Dispute, LedgerEntry, Payment,
                                 StripeEvent, Subscription, utcnow)
from billing_core.settings import mask_url_password

ACCOUNTS = 100_000
CHUNK = 5_000
PREFIX = "demo_big_"
HOUR = timedelta(hours=1)


class LargeDemoExists(ValueError):
    pass


def _spend_key(user_id: str, reference: str) -> str:
    """The key ledger.consume gives a spend's first entry."""
    digest = hashlib.sha256(f"{user_id}\x00{reference}".encode()).hexdigest()[:32]
    return f"spend:{digest}:0"


@dataclass
class Rows:
    accounts: list = field(default_factory=list)
    subscriptions: list = field(default_factory=list)
    payments: list = field(default_factory=list)
    entries: list = field(default_factory=list)
    lots: list = field(default_factory=list)
    consumptions: list = field(default_factory=list)
    disputes: list = field(default_factory=list)
    status_changes: list = field(default_factory=list)  # {sub_id, new_status, changed_at}
    events: list = field(default_factory=list)
    links: list = field(default_factory=list)


class AccountBuilder:
    """Writes one account's rows, keeping each lot's remaining credits and the balance."""

    def __init__(self, rows: Rows, rng: random.Random, user_id: str, next_payment_id):
        self.rows, self.rng, self.user_id = rows, rng, user_id
        self.next_payment_id = next_payment_id
        self.remaining: dict[str, int] = {}
        self.lots: dict[str, dict] = {}  # credit_lot rows by lot key
        self.balance = 0
        self.debt = 0
        self.spends = 0

    def entry(self, *, credits: int, kind: str, source_key: str, lot_key: str | None, at: datetime, **extra) -> None:
        values = {"user_id": self.user_id, "credits": credits, "kind": kind, "source_key": source_key,
                  "lot_key": lot_key, "lot_source": None, "expires_at": None, "subscription_id": None,
                  "period_end": None, "payment_id": None, "reference": None, "operator": None, "reason": None,
                  "created_at": at}
        values.update(extra)
        self.rows.entries.append(values)
        if values["lot_source"] is not None:
            self.lots[source_key] = {
                "lot_key": source_key, "user_id": self.user_id, "source": values["lot_source"], "granted": credits,
                "remaining": 0, "held": 0, "expires_at": values["expires_at"],
                "subscription_id": values["subscription_id"], "period_end": values["period_end"],
                "payment_id": values["payment_id"], "allowance_from": None, "allowance_to": None,
                "closed": False, "closed_at": None, "created_at": at}
        if lot_key is not None:
            self.remaining[lot_key] = self.remaining.get(lot_key, 0) + credits
            lot = self.lots[lot_key]
            lot["remaining"] += credits
            if kind in ("dispute_hold", "dispute_release"):
                lot["held"] -= credits
            if kind == "expire" or (lot["source"] != "subscription" and lot["remaining"] == 0 and lot["held"] == 0):
                lot["closed"], lot["closed_at"] = True, at
        else:
            self.debt += credits
        self.balance += credits

    def close_lots(self, now: datetime) -> dict:
        """The lots into rows, those whose time has passed closed; the account's totals as the ledger keeps them."""
        for lot in self.lots.values():
            if not lot["closed"] and lot["expires_at"] is not None and lot["expires_at"] <= now:
                lot["closed"], lot["closed_at"] = True, lot["expires_at"]
            self.rows.lots.append(lot)
        return {"balance": self.debt + sum(lot["remaining"] for lot in self.lots.values() if not lot["closed"]),
                "debt": self.debt}

    def payment(self, *, at: datetime, item, **extra) -> int:
        payment_id = self.next_payment_id()
        values = {"id": payment_id, "user_id": self.user_id, "item": item.key, "kind": item.kind,
                  "amount_cents": item.amount_cents, "currency": item.currency, "status": "paid",
                  "amount_refunded": 0, "amount_disputed_lost": 0, "credits_granted": item.credits,
                  "checkout_session_id": None, "invoice_id": None, "payment_intent_id": None, "charge_id": None,
                  "subscription_id": None, "created_at": at, "updated_at": at}
        values.update(extra)
        self.rows.payments.append(values)
        return payment_id

    def spend(self, lot: str, at: datetime, share: int) -> None:
        """The agent spends a share of what the lot holds (lots here always hold more than `share`)."""
        take = max(1, self.remaining[lot] // share)
        assert 0 < take <= self.remaining[lot], (self.user_id, lot)
        reference = f"agent-run-{self.spends}"
        self.spends += 1
        self.entry(credits=-take, kind="spend", source_key=_spend_key(self.user_id, reference), lot_key=lot,
                   at=at, reference=reference)
        self.rows.consumptions.append({"user_id": self.user_id, "reference": reference, "credits": take,
                                       "balance_after": self.balance, "spendable_after": self.balance,
                                       "created_at": at})

    def between(self, start: datetime, end: datetime) -> datetime:
        return start + (end - start) * self.rng.random()


def _subscriber(b: AccountBuilder, n: int, now: datetime) -> dict:
    rng = b.rng
    plan = rng.choices(PLANS, weights=[6, 3, 1])[0]
    status = rng.choices(["active", "past_due", "canceled"], weights=[85, 5, 10])[0]
    shift = timedelta(days=rng.randint(35, 330)) if status == "canceled" else timedelta(0)
    period2_end = now - shift + timedelta(days=rng.randint(1, 29), hours=rng.randint(0, 23))
    period1_end = period2_end - timedelta(days=30)
    starts = (period1_end - timedelta(days=30), period1_end)
    sub_id = f"sub_big{n:06d}"
    lots = []
    for k, (start, end) in enumerate(zip(starts, (period1_end, period2_end)), start=1):
        paid_at = start - HOUR  # Stripe finalizes a renewal invoice about an hour before the period starts
        invoice = f"in_big{n:06d}_{k}"
        payment_id = b.payment(at=paid_at, item=plan, source="invoice", invoice_id=invoice, subscription_id=sub_id)
        if k == 2:  # period 2's grant closes period 1's lot, still open an hour before its end
            b.entry(credits=-b.remaining[lots[0]], kind="expire", source_key=f"expire:{lots[0]}", lot_key=lots[0],
                    at=paid_at, subscription_id=sub_id, reason="next period's credits granted")
        key = f"invoice:{invoice}"
        b.entry(credits=plan.credits, kind="subscription_grant", source_key=key, lot_key=key,
                lot_source="subscription", expires_at=end, subscription_id=sub_id,
                period_end=int(end.timestamp()), payment_id=payment_id, at=paid_at + timedelta(seconds=2))
        lots.append(key)
        spends = 3 if k == 1 else 4
        last = min(end, now) if k == 2 else end - 2 * HOUR
        times = sorted(b.between(paid_at + timedelta(minutes=5), last) for _ in range(spends))
        for s, at in enumerate(times):
            if k == 2 and s == spends - 1 and status == "canceled":
                b.entry(credits=-b.remaining[key], kind="expire", source_key=f"expire:{key}", lot_key=key,
                        at=at, subscription_id=sub_id, reason="subscription canceled")
                b.rows.status_changes.append({"sub_id": sub_id, "new_status": "canceled", "changed_at": at})
            else:
                b.spend(key, at, share=5)
    if status == "past_due":  # the renewal failed in the last few days, after period 2 began
        went = max(period1_end + HOUR, now - timedelta(days=rng.uniform(0, 5)))
        b.rows.status_changes.append({"sub_id": sub_id, "new_status": "past_due", "changed_at": min(went, now)})
    b.rows.subscriptions.append({"id": sub_id, "user_id": b.user_id, "tier": plan.key, "price_id": None,
                                 "status": "active", "current_period_end": int(period2_end.timestamp()),
                                 "cancel_at_period_end": False, "state_at": int((period1_end - HOUR).timestamp()),
                                 "created_at": starts[0], "updated_at": period1_end})
    return {}


def _pack_buyer(b: AccountBuilder, n: int, now: datetime) -> dict:
    rng = b.rng
    first_at = now - timedelta(days=rng.uniform(1, 365))
    second_at = min(now - HOUR, first_at + timedelta(days=rng.uniform(0, 60)))
    lots, payment_ids = [], []
    for k, at in enumerate((first_at, second_at)):
        pack = rng.choice(PACKS)
        session_id = f"cs_big{n:06d}_{k}"
        payment_ids.append(b.payment(at=at, item=pack, source="checkout", checkout_session_id=session_id,
                                     payment_intent_id=f"pi_big{n:06d}_{k}", charge_id=f"ch_big{n:06d}_{k}"))
        key = f"checkout:{session_id}"
        b.entry(credits=pack.credits, kind="pack_grant", source_key=key, lot_key=key, lot_source="pack",
                payment_id=payment_ids[-1], at=at + timedelta(seconds=2))
        lots.append(key)
    twist = rng.choices(["none", "refund", "adjustment", "dispute"], weights=[92, 3, 4, 1])[0]
    account: dict = {}
    times = sorted(b.between(second_at + timedelta(minutes=1), now) for _ in range(8))
    for step, at in enumerate(times):
        if twist == "refund" and step == 0:  # the first pack refunded in full before any spending
            payment = b.rows.payments[-2]
            payment.update(status="refunded", amount_refunded=payment["amount_cents"], updated_at=at)
            target = payment["credits_granted"]
            b.entry(credits=-target, kind="clawback", source_key=f"clawback:{payment['id']}:{target}:0",
                    lot_key=lots[0], payment_id=payment["id"], at=at,
                    reason=f"{payment['amount_cents']} of {payment['amount_cents']} usd reversed")
        elif twist == "adjustment" and step == 3:
            key = f"adjust:big-{n:06d}"
            b.entry(credits=25, kind="adjustment", source_key=key, lot_key=key, lot_source="adjustment",
                    operator="demo", reason="goodwill after an agent outage", at=at)
        elif twist == "dispute" and step == 7:
            dispute_id = f"dp_big{n:06d}"
            payment = b.rows.payments[-1]
            payment.update(status="disputed", updated_at=at)
            b.entry(credits=-b.remaining[lots[1]], kind="dispute_hold", source_key=f"dispute_hold:{dispute_id}:"
                    f"{lots[1]}", lot_key=lots[1], payment_id=payment["id"], reference=dispute_id, at=at)
            b.rows.disputes.append({"id": dispute_id, "user_id": b.user_id, "payment_id": payment["id"],
                                    "charge_id": payment["charge_id"], "amount_cents": payment["amount_cents"],
                                    "status": "open", "created_at": at, "closed_at": None})
            account = {"flagged": True, "flag_reason": "open dispute", "open_disputes": 1}
        else:
            b.spend(next(lot for lot in lots if b.remaining[lot] > 0), at, share=6)
    return account


def _chunk(start: int, stop: int, rng: random.Random, now: datetime, next_payment_id) -> Rows:
    rows = Rows()
    for n in range(start, stop):
        user_id = f"{PREFIX}{n:06d}"
        builder = AccountBuilder(rows, rng, user_id, next_payment_id)
        extra = _subscriber(builder, n, now) if rng.random() < 0.6 else _pack_buyer(builder, n, now)
        created = min(e["created_at"] for e in rows.entries[-10:]) - timedelta(minutes=1)
        _events_and_link(rows, rng, n, user_id, now)
        rows.accounts.append({"user_id": user_id, "email": f"big{n:06d}@example.com",
                              "stripe_customer_id": f"cus_big{n:06d}", "flagged": False, "flag_reason": None,
                              "open_disputes": 0, "created_at": created, "updated_at": created,
                              **builder.close_lots(now), **extra})
    return rows


EVENT_TYPES = {"plan": ("invoice.paid", "invoice.payment_succeeded", "customer.subscription.updated"),
               "pack": ("checkout.session.completed", "payment_intent.succeeded", "charge.succeeded")}
OLDER_API_VERSION = "2024-06-20"


def _events_and_link(rows: Rows, rng: random.Random, n: int, user_id: str, now: datetime) -> None:
    """Three stored Stripe events for the account's payments, and a checkout link for every other account."""
    payments = [p for p in rows.payments[-2:] if p["user_id"] == user_id]
    kind = payments[0]["kind"] if payments else "pack"
    for k, event_type in enumerate(EVENT_TYPES[kind]):
        payment = payments[min(k, len(payments) - 1)]
        at = payment["created_at"] + timedelta(seconds=3 + k)
        status = rng.choices(["processed", "ignored", "needs_attention", "failed"], weights=[9900, 94, 4, 2])[0]
        event_id = f"evt_big{n:06d}_{k}"
        obj = {"id": payment["invoice_id"] or payment["checkout_session_id"] or f"pi_big{n:06d}_{k}",
               "object": event_type.split(".")[0], "customer": f"cus_big{n:06d}", "amount": payment["amount_cents"],
               "currency": payment["currency"], "metadata": {"user_id": user_id}}
        version = OLDER_API_VERSION if n % 50 == 0 else stripe.api_version
        rows.events.append({
            "id": event_id, "type": event_type, "api_version": version, "livemode": False,
            "created": int(at.timestamp()), "received_at": at, "status": status, "attempts": 1,
            "payload": json.dumps({"id": event_id, "object": "event", "api_version": version, "type": event_type,
                                   "created": int(at.timestamp()), "data": {"object": obj}}),
            "error": "no account matches this customer" if status in ("needs_attention", "failed") else None,
            "processed_at": at if status in ("processed", "ignored") else None, "source": "webhook",
            "assigned_user_id": None, "reprocessed_by": None, "user_id": user_id})
    if n % 2 == 0:
        created = now - timedelta(days=rng.uniform(0, 365))
        status = "open" if created > now - timedelta(hours=24) else rng.choice(["complete", "expired"])
        item = rng.choice(PLANS + PACKS)
        session_id = f"cs_link{n:06d}"
        rows.links.append({"session_id": session_id, "idempotency_key": f"link:big{n:06d}", "user_id": user_id,
                           "item": item.key, "url": f"https://checkout.stripe.com/c/pay/{session_id}",
                           "operator": "demo", "status": status, "created_at": created,
                           "expires_at": created + timedelta(hours=24),
                           "completed_at": created + timedelta(minutes=7) if status == "complete" else None})


def _insert(conn, rows: Rows) -> None:
    for model, values in ((Account, rows.accounts), (Subscription, rows.subscriptions), (Payment, rows.payments),
                          (LedgerEntry, rows.entries), (CreditLot, rows.lots), (Consumption, rows.consumptions),
                          (Dispute, rows.disputes), (StripeEvent, rows.events), (CheckoutLink, rows.links)):
        if values:
            conn.execute(model.__table__.insert(), values)
    if rows.status_changes:  # as the handlers change a subscription, so the MRR triggers see it
        table = Subscription.__table__
        conn.execute(table.update().where(table.c.id == bindparam("sub_id"))
                     .values(status=bindparam("new_status"), updated_at=bindparam("changed_at")), rows.status_changes)


def fill_large(url: str, *, seed: int = 7, accounts: int = ACCOUNTS) -> str:
    """Add `accounts` large-scale demo accounts (default 100,000) to the database at `url`."""
    from .small import ensure_demo_operator

    engine = db.get_engine(url)
    with db.read_session(engine) as session:
        if session.execute(select(func.count()).select_from(Account)
                           .where(Account.user_id.startswith(PREFIX))).scalar_one():
            raise LargeDemoExists("the large demo data set is already in this database; "
                                  "use a fresh database (--database-url) to build it again")
        first_payment_id = int(session.execute(select(func.coalesce(func.max(Payment.id), 0))).scalar_one()) + 1
    rng = random.Random(seed)
    now = utcnow().replace(microsecond=0)
    payment_ids = iter(range(first_payment_id, first_payment_id + 10 * accounts))
    next_payment_id = payment_ids.__next__
    for start in range(0, accounts, CHUNK):
        rows = _chunk(start, min(start + CHUNK, accounts), rng, now, next_payment_id)
        with engine.begin() as conn:
            _insert(conn, rows)
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.exec_driver_sql("SELECT setval(pg_get_serial_sequence('payment', 'id'), "
                                 "(SELECT MAX(id) FROM payment))")
            conn.exec_driver_sql("ANALYZE")
    else:
        with engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
    sign_in_hint = ensure_demo_operator(url)
    with db.read_session(engine) as session:
        counts = [session.execute(select(func.count()).select_from(model)).scalar_one()
                  for model in (Account, Payment, LedgerEntry)]
    return (f"large demo data in {mask_url_password(url)}: {counts[0]:,} accounts, "
            f"{counts[1]:,} payments, {counts[2]:,} ledger entries; {sign_in_hint}")
