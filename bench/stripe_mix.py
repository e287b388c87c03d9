"""Stripe event payloads and a realistic delivery mix, shared by the benchmarks and the fault tests.

The payloads follow the current API's layout (2026-10-28.endive: `invoice.parent.subscription_details`,
line `pricing.price_details.price`, subscription items' `current_period_end`) with the fields a real
delivery carries, so signing, parsing and storing cost what they cost in production.

`build_workload(events=N)` returns deliveries in send order and what the ledger must say afterwards:
new subscriptions (checkout.session.completed, customer.subscription.created, invoice.paid,
invoice.payment_succeeded, shuffled among themselves), renewals (customer.subscription.updated and the
renewal invoice under both types), pack purchases, event types without a handler, and 10% redeliveries
of events already in the stream (some immediately after the original, so copies race each other).
Half the new subscriptions started 31-50 days ago (their first period is over, and these are the ones
that renew); the others started in the last 20 days. A renewal is placed at least RENEWAL_GAP deliveries
after its customer's first events, as with Stripe, which sends it a month later.
"""
from __future__ import annotations

import json
import random
import time
import uuid
from dataclasses import dataclass, field

import stripe

WEBHOOK_SECRET = "whsec_bench0000000000000000000000000000"
SECRET_KEY = "sk_test_bench000000000000000000000000000000"
API_TOKEN = "bench-api-token-000000000000000000000000"
API_VERSION = stripe.api_version
PRICE_IDS = {
    "starter": "price_benchStarter0001",
    "professional": "price_benchProfessional01",
    "business": "price_benchBusiness0001",
    "pack_100": "price_benchPack100000001",
    "pack_250": "price_benchPack250000001",
    "pack_500": "price_benchPack500000001",
    "pack_1000": "price_benchPack1000000001",
}
PLAN_PRICES = {"starter": 999, "professional": 2999, "business": 9999}
PLAN_CREDITS = {"starter": 100, "professional": 500, "business": 2000}
PACK_PRICES = {"pack_100": 1000, "pack_250": 2000, "pack_500": 3500, "pack_1000": 6000}
PACK_CREDITS = {"pack_100": 100, "pack_250": 250, "pack_500": 500, "pack_1000": 1000}
UNKNOWN_TYPES = ("payment_intent.created", "payment_intent.succeeded", "charge.succeeded", "invoice.created",
                 "invoice.finalized", "customer.updated", "payment_method.attached", "invoiceitem.created")
RENEWAL_GAP = 40
DAY = 86_400
MONTH = 30 * DAY


def sidecar_environment(database_url: str, *, rollover: bool = False) -> dict[str, str]:
    """The settings a sidecar needs to accept and apply this module's events (no config file read)."""
    env = {
        "STRIPE_SECRET_KEY": SECRET_KEY,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "BILLING_API_TOKEN": API_TOKEN,
        "DATABASE_URL": database_url,
        "BILLING_ENV_FILE": "/nonexistent/bench.env",
        "STRIPE_API_BASE": "http://127.0.0.1:9",  # nothing listens: no event here should need Stripe's API
        "SUBSCRIPTION_CREDITS_ROLLOVER": "true" if rollover else "false",
    }
    from billing_core.settings import PRICE_SETTINGS

    for key, name in PRICE_SETTINGS.items():
        env[name] = PRICE_IDS[key]
    return env


def sign(payload: str, *, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    return stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp=timestamp or int(time.time()))


def _rid(prefix: str, rng: random.Random, length: int = 24) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return prefix + "".join(rng.choice(alphabet) for _ in range(length))


# --- payloads ----------------------------------------------------------------------------------

def event(event_type: str, obj: dict, *, created: int, event_id: str, previous_attributes: dict | None = None) -> dict:
    data = {"object": obj}
    if previous_attributes is not None:
        data["previous_attributes"] = previous_attributes
    return {"id": event_id, "object": "event", "api_version": API_VERSION, "created": created, "data": data,
            "livemode": False, "pending_webhooks": 1,
            "request": {"id": f"req_{event_id[4:20]}", "idempotency_key": str(uuid.UUID(int=hash(event_id) & (2**128 - 1)))},
            "type": event_type}


def price_object(key: str, *, created: int) -> dict:
    plan = key in PLAN_PRICES
    amount = PLAN_PRICES.get(key) or PACK_PRICES[key]
    return {"id": PRICE_IDS[key], "object": "price", "active": True, "billing_scheme": "per_unit",
            "created": created - 90 * DAY, "currency": "usd", "custom_unit_amount": None, "livemode": False,
            "lookup_key": f"{key}_monthly" if plan else key, "metadata": {}, "nickname": None,
            "product": "prod_" + PRICE_IDS[key][6:20],
            "recurring": {"interval": "month", "interval_count": 1, "meter": None, "usage_type": "licensed",
                          "trial_period_days": None} if plan else None,
            "tax_behavior": "unspecified", "tiers_mode": None, "transform_quantity": None,
            "type": "recurring" if plan else "one_time", "unit_amount": amount, "unit_amount_decimal": str(amount)}


def subscription_object(*, sub_id: str, customer: str, user_id: str, tier: str, status: str, period_start: int,
                        period_end: int, created: int, item_id: str) -> dict:
    item = {"id": item_id, "object": "subscription_item", "created": created, "current_period_start": period_start,
            "current_period_end": period_end, "discounts": [], "metadata": {},
            "price": price_object(tier, created=created), "quantity": 1, "subscription": sub_id, "tax_rates": []}
    return {"id": sub_id, "object": "subscription", "application": None, "automatic_tax": {"enabled": False,
            "liability": None, "disabled_reason": None}, "billing_cycle_anchor": period_start,
            "cancel_at": None, "cancel_at_period_end": False, "canceled_at": None,
            "cancellation_details": {"comment": None, "feedback": None, "reason": None},
            "collection_method": "charge_automatically", "created": created, "currency": "usd", "customer": customer,
            "days_until_due": None, "default_payment_method": "pm_" + sub_id[4:28], "description": None,
            "discounts": [], "ended_at": None, "items": {"object": "list", "data": [item], "has_more": False,
                                                         "total_count": 1, "url": f"/v1/subscription_items?subscription={sub_id}"},
            "latest_invoice": None, "livemode": False, "metadata": {"user_id": user_id, "item": tier},
            "start_date": created, "status": status, "test_clock": None, "trial_end": None, "trial_start": None}


def invoice_object(*, invoice_id: str, customer: str, sub_id: str, user_id: str, tier: str, billing_reason: str,
                   period_start: int, period_end: int, created: int, item_id: str, email: str) -> dict:
    amount = PLAN_PRICES[tier]
    line = {"id": "il_" + invoice_id[3:27], "object": "line_item", "amount": amount, "currency": "usd",
            "description": f"1 × {tier.title()} (at ${amount / 100:.2f} / month)", "discount_amounts": [],
            "discountable": True, "discounts": [], "invoice": invoice_id, "livemode": False,
            "metadata": {"user_id": user_id, "item": tier}, "period": {"start": period_start, "end": period_end},
            "parent": {"type": "subscription_item_details", "invoice_item_details": None,
                       "subscription_item_details": {"invoice_item": None, "proration": False,
                                                     "proration_details": {"credited_items": None},
                                                     "subscription": sub_id, "subscription_item": item_id}},
            "pretax_credit_amounts": [], "pricing": {"type": "price_details", "unit_amount_decimal": str(amount),
                                                     "price_details": {"price": PRICE_IDS[tier],
                                                                       "product": "prod_" + PRICE_IDS[tier][6:20]}},
            "quantity": 1, "subtotal": amount, "taxes": []}
    return {"id": invoice_id, "object": "invoice", "account_country": "US", "account_name": "DevOps Agent",
            "amount_due": amount, "amount_paid": amount, "amount_remaining": 0, "amount_shipping": 0,
            "attempt_count": 1, "attempted": True, "auto_advance": False, "billing_reason": billing_reason,
            "collection_method": "charge_automatically", "created": created, "currency": "usd",
            "customer": customer, "customer_email": email, "customer_name": None, "description": None,
            "discounts": [], "due_date": None, "effective_at": created, "ending_balance": 0,
            "hosted_invoice_url": f"https://invoice.stripe.com/i/acct_bench/{invoice_id}",
            "invoice_pdf": f"https://pay.stripe.com/invoice/acct_bench/{invoice_id}/pdf", "issuer": {"type": "self"},
            "lines": {"object": "list", "data": [line], "has_more": False, "total_count": 1,
                      "url": f"/v1/invoices/{invoice_id}/lines"},
            "livemode": False, "metadata": {}, "number": invoice_id[3:11].upper() + "-0001",
            "parent": {"type": "subscription_details", "quote_details": None,
                       "subscription_details": {"metadata": {"user_id": user_id, "item": tier},
                                                "subscription": sub_id}},
            "period_end": created, "period_start": created if billing_reason == "subscription_create" else created - MONTH,
            "status": "paid", "status_transitions": {"finalized_at": created, "marked_uncollectible_at": None,
                                                     "paid_at": created, "voided_at": None},
            "subtotal": amount, "total": amount, "total_discount_amounts": [], "total_taxes": []}


def checkout_object(*, session_id: str, customer: str, user_id: str, item: str, mode: str, created: int,
                    email: str, sub_id: str | None = None) -> dict:
    amount = PLAN_PRICES.get(item) or PACK_PRICES[item]
    return {"id": session_id, "object": "checkout.session", "after_expiration": None, "allow_promotion_codes": None,
            "amount_subtotal": amount, "amount_total": amount, "automatic_tax": {"enabled": False, "liability": None,
                                                                                "status": None},
            "billing_address_collection": None, "cancel_url": "http://localhost:5000/checkout/cancel",
            "client_reference_id": user_id, "created": created, "currency": "usd", "customer": customer,
            "customer_creation": "always", "customer_details": {"address": None, "email": email, "name": None,
                                                                "phone": None, "tax_exempt": "none", "tax_ids": []},
            "customer_email": email, "expires_at": created + DAY, "invoice": None, "livemode": False, "locale": None,
            "metadata": {"user_id": user_id, "item": item}, "mode": mode,
            "payment_intent": ("pi_" + session_id[8:32]) if mode == "payment" else None,
            "payment_method_types": ["card"], "payment_status": "paid", "status": "complete",
            "subscription": sub_id, "success_url": "http://localhost:5000/checkout/success?session_id={CHECKOUT_SESSION_ID}",
            "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0}, "ui_mode": "hosted",
            "url": None}


def unknown_object(event_type: str, *, customer: str, created: int, rng: random.Random) -> dict:
    kind = event_type.split(".")[0]
    return {"id": _rid({"payment_intent": "pi_", "charge": "ch_", "invoice": "in_", "customer": "cus_",
                        "payment_method": "pm_", "invoiceitem": "ii_"}.get(kind, "obj_"), rng),
            "object": kind, "amount": 2999, "created": created, "currency": "usd", "customer": customer,
            "description": None, "livemode": False, "metadata": {}, "status": "succeeded"}


# --- a customer's life, as events --------------------------------------------------------------

@dataclass
class Customer:
    user_id: str
    customer: str
    email: str
    tier: str | None = None
    sub_id: str | None = None
    item_id: str | None = None
    period_start: int = 0
    period_end: int = 0
    packs: list[str] = field(default_factory=list)

    def expected_balance(self, now: int | None = None) -> int:
        """The current period's allowance while it lasts (the previous period's credits expire), plus packs."""
        current = self.tier and self.period_end > (now or time.time())
        return (PLAN_CREDITS[self.tier] if current else 0) + sum(PACK_CREDITS[p] for p in self.packs)


def new_customer(rng: random.Random, n: int, *, prefix: str = "bench") -> Customer:
    return Customer(user_id=f"{prefix}_user_{n:06d}", customer=_rid("cus_", rng, 14),
                    email=f"{prefix}.user{n:06d}@example.com")


def new_subscription_events(c: Customer, tier: str, *, now: int, rng: random.Random) -> list[dict]:
    """The four events of a new subscription, as Stripe sends them (in a random order)."""
    c.tier, c.sub_id, c.item_id = tier, _rid("sub_", rng), _rid("si_", rng, 14)
    c.period_start, c.period_end = now, now + MONTH
    invoice_id = _rid("in_", rng)
    sub = subscription_object(sub_id=c.sub_id, customer=c.customer, user_id=c.user_id, tier=tier, status="active",
                              period_start=c.period_start, period_end=c.period_end, created=now, item_id=c.item_id)
    invoice = invoice_object(invoice_id=invoice_id, customer=c.customer, sub_id=c.sub_id, user_id=c.user_id,
                             tier=tier, billing_reason="subscription_create", period_start=c.period_start,
                             period_end=c.period_end, created=now, item_id=c.item_id, email=c.email)
    checkout = checkout_object(session_id=_rid("cs_test_", rng, 40), customer=c.customer, user_id=c.user_id,
                               item=tier, mode="subscription", created=now - 30, email=c.email, sub_id=c.sub_id)
    return [event("checkout.session.completed", checkout, created=now + 1, event_id=_rid("evt_", rng)),
            event("customer.subscription.created", sub, created=now, event_id=_rid("evt_", rng)),
            event("invoice.paid", invoice, created=now + 1, event_id=_rid("evt_", rng)),
            event("invoice.payment_succeeded", invoice, created=now + 1, event_id=_rid("evt_", rng))]


def renewal_events(c: Customer, *, rng: random.Random) -> list[dict]:
    """The next month: the subscription moves its period, the renewal invoice is paid (under two types)."""
    old_start, old_end = c.period_start, c.period_end
    c.period_start, c.period_end = old_end, old_end + MONTH
    at = old_end  # Stripe renews at the end of the period
    sub = subscription_object(sub_id=c.sub_id, customer=c.customer, user_id=c.user_id, tier=c.tier, status="active",
                              period_start=c.period_start, period_end=c.period_end, created=old_start,
                              item_id=c.item_id)
    invoice = invoice_object(invoice_id=_rid("in_", rng), customer=c.customer, sub_id=c.sub_id, user_id=c.user_id,
                             tier=c.tier, billing_reason="subscription_cycle", period_start=c.period_start,
                             period_end=c.period_end, created=at, item_id=c.item_id, email=c.email)
    previous = {"items": {"data": [{"current_period_start": old_start, "current_period_end": old_end}]}}
    return [event("customer.subscription.updated", sub, created=at, event_id=_rid("evt_", rng),
                  previous_attributes=previous),
            event("invoice.paid", invoice, created=at + 1, event_id=_rid("evt_", rng)),
            event("invoice.payment_succeeded", invoice, created=at + 1, event_id=_rid("evt_", rng))]


def pack_events(c: Customer, pack: str, *, now: int, rng: random.Random) -> list[dict]:
    c.packs.append(pack)
    checkout = checkout_object(session_id=_rid("cs_test_", rng, 40), customer=c.customer, user_id=c.user_id,
                               item=pack, mode="payment", created=now - 20, email=c.email)
    return [event("checkout.session.completed", checkout, created=now, event_id=_rid("evt_", rng))]


def unknown_event(c: Customer, *, now: int, rng: random.Random) -> dict:
    event_type = rng.choice(UNKNOWN_TYPES)
    return event(event_type, unknown_object(event_type, customer=c.customer, created=now, rng=rng), created=now,
                 event_id=_rid("evt_", rng))


# --- the benchmark's stream ----------------------------------------------------------------------

@dataclass
class Workload:
    deliveries: list[dict]  # events in send order, redeliveries included
    customers: dict[str, Customer]

    @property
    def unique_events(self) -> int:
        return len({e["id"] for e in self.deliveries})

    def expected_balances(self) -> dict[str, int]:
        return {user_id: c.expected_balance() for user_id, c in self.customers.items()}

    def expected_tiers(self) -> dict[str, str]:
        return {user_id: c.tier or "none" for user_id, c in self.customers.items()}


def build_workload(*, events: int, seed: int = 1, duplicate_share: float = 0.10, prefix: str = "bench",
                   now: int | None = None) -> Workload:
    """About `events` deliveries: ~45% new subscriptions, ~20% renewals, ~15% packs, ~10% unknown types,
    ~10% redeliveries."""
    rng = random.Random(seed)
    now = now or int(time.time())
    originals_wanted = int(events * (1 - duplicate_share))
    stream: list[dict] = []
    customers: dict[str, Customer] = {}
    subscribed_at: list[tuple[int, Customer]] = []  # (stream position after its first events, customer)
    renewed: set[str] = set()
    while len(stream) < originals_wanted:
        roll = rng.random()
        renewable = [c for pos, c in subscribed_at
                     if len(stream) - pos >= RENEWAL_GAP and c.user_id not in renewed and c.period_end <= now]
        if roll < 0.50 or not customers:
            c = new_customer(rng, len(customers), prefix=prefix)
            customers[c.user_id] = c
            started = now - (rng.randint(31 * DAY, 50 * DAY) if rng.random() < 0.5 else rng.randint(0, 20 * DAY))
            group = new_subscription_events(c, rng.choice(list(PLAN_PRICES)), now=started, rng=rng)
            rng.shuffle(group)
            stream += group
            subscribed_at.append((len(stream), c))
        elif roll < 0.72 and renewable:
            c = rng.choice(renewable)
            renewed.add(c.user_id)
            stream += renewal_events(c, rng=rng)
        elif roll < 0.88:
            if rng.random() < 0.3:
                c = new_customer(rng, len(customers), prefix=prefix)
                customers[c.user_id] = c
            else:
                c = rng.choice(list(customers.values()))
            stream += pack_events(c, rng.choice(list(PACK_PRICES)), now=now - rng.randint(0, 5 * DAY), rng=rng)
        else:
            stream.append(unknown_event(rng.choice(list(customers.values())), now=now, rng=rng))
    return Workload(deliveries=with_redeliveries(stream, total=events, rng=rng), customers=customers)


def build_pack_workload(*, events: int, seed: int = 1, duplicate_share: float = 0.10, prefix: str = "pack",
                        now: int | None = None) -> Workload:
    """About `events` deliveries of pack purchases only (`checkout.session.completed` in payment mode), by
    customers buying one to three packs each, with `duplicate_share` redeliveries."""
    rng = random.Random(seed)
    now = now or int(time.time())
    originals_wanted = int(events * (1 - duplicate_share))
    stream: list[dict] = []
    customers: dict[str, Customer] = {}
    while len(stream) < originals_wanted:
        if not customers or rng.random() < 0.5:
            c = new_customer(rng, len(customers), prefix=prefix)
            customers[c.user_id] = c
        else:
            c = rng.choice(list(customers.values()))
        stream += pack_events(c, rng.choice(list(PACK_PRICES)), now=now - rng.randint(0, 5 * DAY), rng=rng)
    return Workload(deliveries=with_redeliveries(stream, total=events, rng=rng), customers=customers)


def with_redeliveries(stream: list[dict], *, total: int, rng: random.Random) -> list[dict]:
    """The stream with byte-identical copies of its events added up to `total` deliveries: a third of them
    right behind the original (the two copies race), the others anywhere later."""
    deliveries = list(stream)
    for _ in range(total - len(stream)):
        original = rng.choice(stream)
        if rng.random() < 0.3:
            at = deliveries.index(original) + 1
        else:
            at = rng.randint(deliveries.index(original) + 1, len(deliveries))
        deliveries.insert(at, original)
    return deliveries


def signed_deliveries(deliveries: list[dict], *, timestamp: int | None = None) -> list[tuple[bytes, str]]:
    """(body, Stripe-Signature) per delivery; a redelivery carries the same body, as from Stripe."""
    timestamp = timestamp or int(time.time())
    bodies: dict[str, tuple[bytes, str]] = {}
    out = []
    for e in deliveries:
        if e["id"] not in bodies:
            payload = json.dumps(e, indent=2)
            bodies[e["id"]] = (payload.encode(), sign(payload, timestamp=timestamp))
        out.append(bodies[e["id"]])
    return out


# --- checking the ledger afterwards --------------------------------------------------------------

def expected_grants(workload: Workload) -> int:
    """Grant entries the workload must leave: one per paid period, one per pack."""
    periods = 0
    for e in {e["id"]: e for e in workload.deliveries}.values():
        if e["type"] == "invoice.paid":
            periods += 1
    return periods + sum(len(c.packs) for c in workload.customers.values())


def ledger_mismatches(engine, workload: Workload) -> list[str]:
    """Everything in the database that differs from what the workload must produce; [] when exact."""
    from sqlalchemy import func, select

    from billing_core import ledger
    from billing_core.db import read_session
    from billing_core.models import LedgerEntry, StripeEvent

    problems = []
    ids = {e["id"] for e in workload.deliveries}
    with read_session(engine) as session:
        statuses = dict(session.execute(select(StripeEvent.status, func.count()).where(StripeEvent.id.in_(ids))
                                        .group_by(StripeEvent.status)).all())
        stored = sum(statuses.values())
        if stored != len(ids):
            problems.append(f"{stored} of {len(ids)} events stored")
        unfinished = {s: n for s, n in statuses.items() if s not in ("processed", "ignored")}
        if unfinished:
            problems.append(f"events not applied: {unfinished}")
            errors = session.execute(select(StripeEvent.type, StripeEvent.error).where(
                StripeEvent.id.in_(ids), StripeEvent.status.not_in(("processed", "ignored"))).limit(5)).all()
            problems += [f"{event_type}: {error}" for event_type, error in errors]
        users = list(workload.customers)
        grants = session.execute(select(func.count()).select_from(LedgerEntry).where(
            LedgerEntry.user_id.in_(users), LedgerEntry.kind.in_(("subscription_grant", "pack_grant")))).scalar_one()
        if grants != expected_grants(workload):
            problems.append(f"{grants} grant entries, expected {expected_grants(workload)}")
        for user_id, customer in workload.customers.items():
            summary = ledger.account_summary(session, user_id)
            want_balance, want_tier = customer.expected_balance(), customer.tier or "none"
            if (summary.balance, summary.spendable_balance, summary.tier) != (want_balance, want_balance, want_tier):
                problems.append(f"{user_id}: balance {summary.balance} (spendable {summary.spendable_balance}), "
                                f"tier {summary.tier}; expected {want_balance}, tier {want_tier}")
    return problems
