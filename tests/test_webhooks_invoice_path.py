"""How a paid subscription invoice is applied (handlers/invoice.py), on SQLite and PostgreSQL: the payment's
credits known from the grant it just made agree with what its lots say, whichever way they were found; an
invoice before and after its subscription event writes the same ledger; a payment recorded earlier is brought
up to date; ORM copies of rows the handlers write with Core statements are never handed out stale."""
from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from billing_core import db, ledger
from billing_core.handlers import EventContext, handle
from billing_core.handlers.subscription import stored_subscription
from billing_core.models import CreditLot, LedgerEntry, Payment, StripeEvent, Subscription
from billing_core.settings import get_settings
from billing_core.stripe_payloads import NeedsAttention
from stripe_events import (DEFAULT_PRICES, PLAN_AMOUNTS, event, invoice_line, invoice_object, send,
                           subscription_event, subscription_invoice)

DAY = 86400
NOW = int(time.time())
START = NOW - 15 * DAY
END = START + 30 * DAY
NEXT_END = END + 30 * DAY
STARTER, PRO = DEFAULT_PRICES["starter"], DEFAULT_PRICES["professional"]


def sub_event(type="customer.subscription.created", *, user="u1", sub="sub_1", created=START, price=STARTER,
              status="active", start=START, end=END, previous_price=None):
    return subscription_event(type, created=created, subscription_id=sub, customer=f"cus_{user}", price=price,
                              user_id=user, period_start=start, period_end=end, status=status,
                              previous_price=previous_price)


def invoice(*, user="u1", sub="sub_1", invoice_id="in_1", price=STARTER, start=START, end=END,
            reason="subscription_create", extra_lines=(), type="invoice.paid", status="paid", **fields):
    tier = next(key for key, value in DEFAULT_PRICES.items() if value == price)
    obj = subscription_invoice(invoice_id=invoice_id, customer=f"cus_{user}", subscription_id=sub, user_id=user,
                               price=price, period_start=start, period_end=end, amount=PLAN_AMOUNTS[tier],
                               billing_reason=reason, created=start + 5, status=status)
    if extra_lines:
        obj = invoice_object(invoice_id=invoice_id, customer=f"cus_{user}", subscription_id=sub, user_id=user,
                             billing_reason=reason, created=start + 5,
                             lines=[*extra_lines, *obj["lines"]["data"]])
    return event(type, {**obj, **fields}, created=start + 5)


def proration_lines(old, new, at, *, sub="sub_1", end=END):
    left = (end - at) / (end - START)
    return [invoice_line(price=DEFAULT_PRICES[old], subscription_id=sub, period_start=at, period_end=end,
                         amount=-round(PLAN_AMOUNTS[old] * left), proration=True),
            invoice_line(price=DEFAULT_PRICES[new], subscription_id=sub, period_start=at, period_end=end,
                         amount=round(PLAN_AMOUNTS[new] * left), proration=True)]


def credits_of_payments(user="u1") -> dict[str, tuple[int, int]]:
    """Each invoice payment's (credits_granted as stored, what its lots say)."""
    with db.read_session() as session:
        payments = session.execute(select(Payment).where(Payment.user_id == user)).scalars().all()
        return {p.invoice_id: (p.credits_granted, ledger.credits_paid_by(session, p)) for p in payments}


def balance(user="u1") -> int:
    with db.read_session() as session:
        return ledger.balance(session, user)


# --- credits granted: known from the grant, or read from the lots ------------------------------------

AT = START + 20 * DAY
SCENARIOS = {
    "invoice first, new account": ([invoice()], {"in_1": 100}, 100),
    "after its subscription event": ([sub_event(), invoice()], {"in_1": 100}, 100),
    "a renewal": ([invoice(), invoice(invoice_id="in_2", start=END, end=NEXT_END, reason="subscription_cycle")],
                  {"in_1": 100, "in_2": 100}, 100),
    "on a canceled subscription": ([sub_event("customer.subscription.deleted", created=START + 10, status="canceled"),
                                    invoice()], {"in_1": 0}, 0),
    "an upgrade's proration invoice": (
        [invoice(), event("invoice.paid", invoice_object(
            invoice_id="in_up", customer="cus_u1", subscription_id="sub_1", user_id="u1",
            billing_reason="subscription_update", lines=proration_lines("starter", "professional", AT),
            created=AT), created=AT)],
        {"in_1": 100, "in_up": 133}, 233),
    "a renewal with pending prorations": (
        [invoice(), sub_event("customer.subscription.updated", created=AT, price=PRO, previous_price=STARTER),
         invoice(invoice_id="in_2", price=PRO, start=END, end=NEXT_END, reason="subscription_cycle",
                 extra_lines=proration_lines("starter", "professional", AT))],
        {"in_1": 100, "in_2": 500 + 133}, 633),
    "paid after a failed attempt": (
        [sub_event(), invoice(type="invoice.payment_failed", status="open"), invoice()], {"in_1": 100}, 100),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_credits_granted_agree_with_the_lots_whichever_way_they_were_found(sidecar, scenario):
    events, expected, expected_balance = SCENARIOS[scenario]
    for evt in events:
        assert send(sidecar, evt)["status"] == "processed"
    found = credits_of_payments()
    assert {invoice_id: stored for invoice_id, (stored, _lots) in found.items()} == expected
    assert all(stored == lots for stored, lots in found.values()), found
    assert balance() == expected_balance


def test_the_second_event_type_of_each_invoice_changes_nothing(sidecar):
    for evt in SCENARIOS["a renewal with pending prorations"][0]:
        send(sidecar, evt)
    before = (credits_of_payments(), ledger_rows("u1"))
    for evt in SCENARIOS["a renewal with pending prorations"][0]:
        if evt["type"] == "invoice.paid":
            again = event("invoice.payment_succeeded", evt["data"]["object"], created=evt["created"])
            assert send(sidecar, again)["status"] == "processed"
    assert (credits_of_payments(), ledger_rows("u1")) == before


# --- order: the invoice before or after its subscription event --------------------------------------

def ledger_rows(user: str) -> dict:
    """The user's entries and lots, without ids and times of writing, keys made user-neutral."""
    with db.read_session() as session:
        entries = session.execute(select(LedgerEntry).where(LedgerEntry.user_id == user)
                                  .order_by(LedgerEntry.source_key)).scalars().all()
        lots = session.execute(select(CreditLot).where(CreditLot.user_id == user)
                               .order_by(CreditLot.lot_key)).scalars().all()
        sub = session.execute(select(Subscription).where(Subscription.user_id == user)).scalars().one()
        payment = session.execute(select(Payment).where(Payment.user_id == user)).scalars().all()
        neutral = lambda text: text.replace(user, "U") if isinstance(text, str) else text  # noqa: E731
        return {
            "entries": [(e.kind, e.credits, neutral(e.source_key), neutral(e.lot_key), e.expires_at, e.period_end)
                        for e in entries],
            "lots": [(neutral(lot.lot_key), lot.source, lot.granted, lot.remaining, lot.closed, lot.expires_at,
                      lot.period_end, lot.allowance_from, lot.allowance_to) for lot in lots],
            "subscription": (sub.tier, sub.price_id, sub.status, sub.current_period_start, sub.current_period_end,
                             sub.state_at),
            "payments": [(p.item, p.amount_cents, p.status, p.credits_granted) for p in payment],
        }


def life(user: str, *, invoice_first: bool) -> list[dict]:
    sub = f"sub_{user}"
    created = sub_event(user=user, sub=sub)
    first = invoice(user=user, sub=sub, invoice_id=f"in_{user}_1")
    renewed = sub_event("customer.subscription.updated", user=user, sub=sub, created=END, start=END, end=NEXT_END)
    renewal = invoice(user=user, sub=sub, invoice_id=f"in_{user}_2", start=END, end=NEXT_END,
                      reason="subscription_cycle")
    return [first, created, renewal, renewed] if invoice_first else [created, first, renewed, renewal]


def test_invoices_before_and_after_their_subscription_events_write_the_same_ledger(sidecar):
    for user, invoice_first in (("user-a", True), ("user-b", False)):
        for evt in life(user, invoice_first=invoice_first):
            assert send(sidecar, evt)["status"] == "processed"
    first = ledger_rows("user-a")
    assert first == ledger_rows("user-b")
    assert first["subscription"][2:5] == ("active", END, NEXT_END)
    assert [lot[4] for lot in first["lots"]] == [True, False]  # the first period closed with the renewal
    assert balance("user-a") == balance("user-b") == 100


# --- a payment recorded before: brought up to date, its stored fields kept ------------------------

def test_a_paid_invoice_with_an_unreadable_created_updates_the_payment_a_failed_attempt_recorded(sidecar):
    send(sidecar, sub_event())
    send(sidecar, invoice(type="invoice.payment_failed", status="open"))
    with db.read_session() as session:
        recorded_at = session.execute(select(Payment.created_at).where(Payment.invoice_id == "in_1")).scalar_one()
    assert send(sidecar, invoice(created="yesterday"))["status"] == "processed"  # only a new payment stores it
    with db.read_session() as session:
        payment = session.execute(select(Payment).where(Payment.invoice_id == "in_1")).scalars().one()
    assert (payment.status, payment.amount_cents, payment.credits_granted) == ("paid", 999, 100)
    assert payment.created_at == recorded_at


def test_a_new_payment_with_an_unreadable_created_waits_for_a_person(sidecar):
    evt = invoice(created="yesterday")
    assert send(sidecar, evt)["status"] == "needs_attention"
    with db.read_session() as session:
        assert "invoice created" in session.get(StripeEvent, evt["id"]).error
        assert session.execute(select(Payment)).first() is None


# --- Core writes and the ORM session ------------------------------------------------------------------

def test_a_subscription_loaded_in_the_session_before_the_handler_is_read_fresh_after_it(sidecar):
    send(sidecar, sub_event(status="incomplete"))
    settings = get_settings()
    with db.write_session() as session:
        loaded = session.get(Subscription, "sub_1")
        assert loaded.status == "incomplete"
        handled = handle(session, EventContext(event=invoice(), settings=settings))
        assert handled.user_id == "u1"
        assert session.get(Subscription, "sub_1").status == "active"
        payment = session.execute(select(Payment).where(Payment.invoice_id == "in_1")).scalars().one()
        assert payment.credits_granted == 100


def test_a_payment_loaded_in_the_session_before_the_handler_is_read_fresh_after_it(sidecar):
    send(sidecar, sub_event())
    send(sidecar, invoice(type="invoice.payment_failed", status="open"))
    settings = get_settings()
    with db.write_session() as session:
        loaded = session.execute(select(Payment).where(Payment.invoice_id == "in_1")).scalars().one()
        assert (loaded.status, loaded.credits_granted) == ("failed", 0)
        handle(session, EventContext(event=invoice(), settings=settings))
        fresh = session.get(Payment, loaded.id)
        assert (fresh.status, fresh.credits_granted) == ("paid", 100)


# --- the subscription row and the one-plan rule, in one read -------------------------------------------

def test_the_read_names_the_users_oldest_other_live_subscription_and_ignores_the_rest(database_url):
    with db.write_session() as session:
        for user in ("u1", "u2"):
            ledger.lock_account(session, user_id=user)
        for n, (sub, user, status) in enumerate((("sub_newer", "u1", "active"), ("sub_old", "u1", "active"),
                                                 ("sub_ended", "u1", "canceled"), ("sub_waiting", "u1", "incomplete"),
                                                 ("sub_of_u2", "u2", "active"))):
            created_at = ledger.from_epoch(START + (60 if sub == "sub_newer" else n))
            session.add(Subscription(id=sub, user_id=user, tier="starter", status=status, current_period_end=END,
                                     created_at=created_at, updated_at=created_at))
    with db.write_session() as session:
        for unknown_or_waiting in ("sub_third", "sub_waiting"):
            with pytest.raises(NeedsAttention) as refused:
                stored_subscription(session, subscription_id=unknown_or_waiting, user_id="u1", refuse_second=True)
            assert refused.value.reason.startswith(f"second live subscription {unknown_or_waiting} for u1, who already "
                                                   "has sub_old (starter, active): nothing granted")
            assert refused.value.user_id == "u1"
        row = stored_subscription(session, subscription_id="sub_newer", user_id="u1", refuse_second=True)
        assert (row.id, row.status, row.current_period_end, row.stored) == ("sub_newer", "active", END, True)
        assert stored_subscription(session, subscription_id="sub_ended", user_id="u1",
                                   refuse_second=True).status == "canceled"
        assert stored_subscription(session, subscription_id="sub_waiting", user_id="u1",
                                   refuse_second=False).status == "incomplete"
        assert stored_subscription(session, subscription_id="sub_new", user_id="u3", refuse_second=True) is None
