"""Order independence: a subscription's first events in all 24 orders, and a month of a customer's life
delivered with duplicates in shuffled orders, end in exactly the state the ledger rules say."""
from __future__ import annotations

import itertools
import random
import time

import pytest
from sqlalchemy import select

from billing_core import db, ledger
from billing_core.models import Account, Dispute, Payment, StripeEvent, Subscription
from stripe_events import (DEFAULT_PRICES, charge_refunded, checkout_completed, deliver, dispute_event,
                           event, proration_invoice, subscription_event, subscription_invoice)

STARTER, PRO = DEFAULT_PRICES["starter"], DEFAULT_PRICES["professional"]
DAY = 86400


def deliver_all(client, evts) -> None:
    for evt in evts:
        response = deliver(client, evt)
        assert response.status_code == 200, response.text


def state_of(user_id: str, subscription_id: str) -> dict:
    with db.read_session() as session:
        summary = ledger.account_summary(session, user_id).as_dict()
        sub = session.get(Subscription, subscription_id)
        payments = session.execute(select(Payment).where(Payment.user_id == user_id).order_by(Payment.id)).scalars()
        statuses = session.execute(select(StripeEvent.status).where(StripeEvent.user_id == user_id)).scalars()
        return {
            "balance": summary["balance"], "spendable": summary["spendable_balance"], "tier": summary["tier"],
            "status": summary["subscription_status"], "customer": summary["stripe_customer_id"],
            "flagged": summary["flagged"],
            "breakdown": [(row["source"], row["credits"], row["expires_at"]) for row in summary["breakdown"]],
            "subscription": (sub.user_id, sub.tier, sub.price_id, sub.status, sub.current_period_end,
                             sub.cancel_at_period_end) if sub else None,
            "payments": [(p.source, p.item, p.amount_cents, p.status, p.credits_granted, p.amount_refunded)
                         for p in payments],
            "event_statuses": sorted(statuses),
        }


# --- a subscription's first events in every order -----------------------------------------------

FIRST_EVENTS_AT = int(time.time()) - 600
PERIOD_END = FIRST_EVENTS_AT + 30 * DAY


def first_events(n: int, created_status: str) -> tuple[str, str, list[dict]]:
    user, sub, customer, invoice_id = f"u{n}", f"sub_{n}", f"cus_{n}", f"in_{n}"
    t = FIRST_EVENTS_AT
    period_end = t + 30 * DAY
    invoice = subscription_invoice(invoice_id=invoice_id, customer=customer, subscription_id=sub, user_id=user,
                                   price=STARTER, period_start=t, period_end=period_end, amount=999,
                                   billing_reason="subscription_create", created=t + 1)
    return user, sub, [
        checkout_completed(user_id=user, item="starter", customer=customer, subscription=sub, created=t + 3),
        subscription_event("customer.subscription.created", created=t, subscription_id=sub, customer=customer,
                           price=STARTER, user_id=user, period_start=t, period_end=period_end,
                           status=created_status),
        event("invoice.paid", invoice, created=t + 2),
        event("invoice.payment_succeeded", invoice, created=t + 2),
    ]


@pytest.mark.parametrize("created_status", ["active", "incomplete"])
def test_every_order_of_a_subscriptions_first_events_ends_in_the_same_state(sidecar, created_status):
    outcomes = {}
    for n, order in enumerate(itertools.permutations(range(4))):
        user, sub, evts = first_events(n, created_status)
        deliver_all(sidecar, [evts[i] for i in order])
        state = state_of(user, sub)
        state["subscription"] = state["subscription"][1:]  # the user id differs per run by construction
        state["customer"] = state["customer"] == f"cus_{n}"
        state["breakdown"] = [(source, credits) for source, credits, _ in state["breakdown"]]
        outcomes[order] = state
    expected = {
        "balance": 100, "spendable": 100, "tier": "starter", "status": "active", "customer": True, "flagged": False,
        "breakdown": [("subscription", 100)],
        "subscription": ("starter", STARTER, "active", PERIOD_END, False),
        "payments": [("invoice", "starter", 999, "paid", 100, 0)],
        "event_statuses": ["processed"] * 4,
    }
    assert len(outcomes) == 24
    for order, state in outcomes.items():
        assert state == expected, f"order {order}"


# --- a month of a customer's life --------------------------------------------------------------

def a_month(now: int) -> list[dict]:
    """Subscribe (starter), renew, buy a pack, upgrade to professional, refund half the pack, a dispute on the
    renewal's charge (won), cancel."""
    user, sub, customer = "ada", "sub_ada", "cus_ada"
    t0 = now - 40 * DAY
    p1_end = t0 + 30 * DAY          # ten days ago
    p2_end = p1_end + 30 * DAY      # twenty days ahead
    upgrade_at = now - 5 * DAY
    common = dict(subscription_id=sub, customer=customer, user_id=user)

    def sub_snapshot(type, created, price, start, end, **kw):
        return subscription_event(type, created=created, price=price, period_start=start, period_end=end,
                                  **common, **kw)

    first = subscription_invoice(invoice_id="in_first", price=STARTER, period_start=t0, period_end=p1_end,
                                 amount=999, billing_reason="subscription_create", created=t0 + 1, **common)
    renewal = subscription_invoice(invoice_id="in_renewal", price=STARTER, period_start=p1_end, period_end=p2_end,
                                   amount=999, billing_reason="subscription_cycle", created=p1_end + 3600, **common)
    upgrade = proration_invoice(invoice_id="in_upgrade", old_price=STARTER, new_price=PRO, changed_at=upgrade_at,
                                period_end=p2_end, credit=833, charge=2499, created=upgrade_at + 5, **common)
    return [
        sub_snapshot("customer.subscription.created", t0, STARTER, t0, p1_end, status="incomplete"),
        event("invoice.paid", first, created=t0 + 2),
        event("invoice.payment_succeeded", first, created=t0 + 2),
        sub_snapshot("customer.subscription.updated", t0 + 3, STARTER, t0, p1_end,
                     previous_attributes={"status": "incomplete"}),
        checkout_completed(user_id=user, item="starter", customer=customer, subscription=sub, created=t0 + 4),
        # renewal
        sub_snapshot("customer.subscription.updated", p1_end, STARTER, p1_end, p2_end,
                     previous_attributes={"items": {"data": [{"current_period_end": p1_end}]}}),
        event("invoice.paid", renewal, created=p1_end + 3601),
        event("invoice.payment_succeeded", renewal, created=p1_end + 3601),
        # a pack
        checkout_completed(user_id=user, item="pack_250", customer=customer, payment_intent="pi_pack",
                           session_id="cs_test_ada_pack", created=now - 8 * DAY),
        # upgrade mid-period
        sub_snapshot("customer.subscription.updated", upgrade_at, PRO, p1_end, p2_end, previous_price=STARTER),
        event("invoice.paid", upgrade, created=upgrade_at + 6),
        event("invoice.payment_succeeded", upgrade, created=upgrade_at + 6),
        # half the pack refunded
        charge_refunded(charge_id="ch_pack", payment_intent="pi_pack", amount=2000, amount_refunded=1000,
                        created=now - 4 * DAY),
        # a dispute on the renewal's charge, won
        dispute_event("charge.dispute.created", dispute_id="dp_ada", charge_id="ch_renewal",
                      payment_intent="pi_renewal", amount=999, created=now - 3 * DAY),
        dispute_event("charge.dispute.closed", dispute_id="dp_ada", charge_id="ch_renewal",
                      payment_intent="pi_renewal", amount=999, status="won", created=now - 2 * DAY),
        # cancel
        sub_snapshot("customer.subscription.updated", now - 3600, PRO, p1_end, p2_end, cancel_at_period_end=True),
        sub_snapshot("customer.subscription.deleted", now - 60, PRO, p1_end, p2_end, status="canceled"),
    ]


def shuffled_with_duplicates(evts: list[dict], seed: int) -> list[dict]:
    if seed == 0:
        return list(evts)  # the order things happened in
    rng = random.Random(seed)
    copies = evts + [evt for evt in evts if rng.random() < 0.5]
    rng.shuffle(copies)
    return copies


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_a_month_of_a_customers_life_in_any_order_gives_the_exact_balance_and_tier(fake_stripe, sidecar, seed):
    # the dispute names only the renewal's PaymentIntent; Stripe's invoice payments list links it to the invoice
    fake_stripe.state.add_invoice_payment(invoice="in_renewal", payment_intent="pi_renewal", amount_paid=999)
    now = int(time.time())
    deliver_all(sidecar, shuffled_with_duplicates(a_month(now), seed))

    with db.read_session() as session:
        summary = ledger.account_summary(session, "ada").as_dict()
        statuses = set(session.execute(select(StripeEvent.status)).scalars())
        pack = session.execute(select(Payment).where(Payment.payment_intent_id == "pi_pack")).scalars().one()
        renewal = session.execute(select(Payment).where(Payment.invoice_id == "in_renewal")).scalars().one()
        dispute = session.get(Dispute, "dp_ada")
        account = session.get(Account, "ada")
        sub = session.get(Subscription, "sub_ada")
    # Subscription credits all expired with the cancellation; the pack's 250 minus half of it refunded.
    assert summary["balance"] == 125 and summary["spendable_balance"] == 125
    assert summary["tier"] == "none" and summary["subscription_status"] == "canceled"
    assert [(row["source"], row["credits"]) for row in summary["breakdown"]] == [("pack", 125)]
    assert not summary["flagged"] and account.open_disputes == 0 and dispute.status == "won"
    assert statuses == {"processed"}
    assert (pack.amount_refunded, pack.status) == (1000, "partially_refunded")
    assert renewal.payment_intent_id == "pi_renewal" and renewal.charge_id == "ch_renewal"
    assert (sub.tier, sub.status) == ("none", "canceled")


@pytest.mark.parametrize("seed", [0, 7, 8, 9])
def test_the_month_before_the_cancellation_has_the_professional_allowance(fake_stripe, sidecar, seed):
    """Mid-month check of the same story: after the upgrade (25 of 30 days left), the period holds the starter
    allowance plus round(400 x 25/30) = 333, whichever of the three upgrade/renewal reports came first (issue 11;
    before, the whole professional allowance)."""
    now = int(time.time())
    before_cancel = [evt for evt in a_month(now) if not evt["type"].startswith("charge.")
                     and evt["created"] < now - 3 * 3600]
    deliver_all(sidecar, shuffled_with_duplicates(before_cancel, seed))
    with db.read_session() as session:
        summary = ledger.account_summary(session, "ada").as_dict()
        sub = session.get(Subscription, "sub_ada")
    assert summary["tier"] == "professional" and summary["subscription_status"] == "active"
    assert summary["balance"] == 100 + 333 + 250  # starter + the upgrade's top-up + the pack
    assert sub.current_period_end == now - 40 * DAY + 60 * DAY and not sub.cancel_at_period_end
