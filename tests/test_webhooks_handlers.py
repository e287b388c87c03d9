"""Each event handler, through the real app with really signed deliveries, on SQLite and PostgreSQL."""
from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from billing_core import db, ledger
from wiring import wiring
from billing_core.models import Account, CheckoutLink, Dispute, Payment, StripeEvent, Subscription, utcnow
from stripe_events import (send, DEFAULT_PRICES, charge_refunded, checkout_completed, dispute_event, event,
                           invoice_paid, proration_invoice, subscription_event, subscription_invoice)

NOW = int(time.time())
P1_START, P1_END = NOW - 5 * 86400, NOW + 25 * 86400
P2_END = P1_END + 30 * 86400
STARTER, PRO, BUSINESS = DEFAULT_PRICES["starter"], DEFAULT_PRICES["professional"], DEFAULT_PRICES["business"]


def summary(user_id: str) -> dict:
    with db.read_session() as session:
        return ledger.account_summary(session, user_id).as_dict()


def one(model, **where):
    with db.read_session() as session:
        stmt = select(model)
        for name, value in where.items():
            stmt = stmt.where(getattr(model, name) == value)
        return session.execute(stmt).scalars().one_or_none()


def all_rows(model):
    with db.read_session() as session:
        return list(session.execute(select(model)).scalars())


def stored_event(event_id: str) -> StripeEvent:
    return one(StripeEvent, id=event_id)


def first_invoice(user="u1", sub="sub_1", customer="cus_1", invoice_id="in_1", price=STARTER, amount=999,
                  created=None, type="invoice.paid", end=P1_END):
    return invoice_paid(type=type, created=created or P1_START + 10, invoice_id=invoice_id, customer=customer,
                        subscription_id=sub, user_id=user, billing_reason="subscription_create",
                        lines=subscription_invoice(invoice_id=invoice_id, customer=customer, subscription_id=sub,
                                                   user_id=user, price=price, period_start=P1_START,
                                                   period_end=end, amount=amount,
                                                   billing_reason="subscription_create")["lines"]["data"])


def sub_event(type="customer.subscription.created", *, created, price=STARTER, status="active", user="u1",
              end=P1_END, start=P1_START, previous_price=None, cancel_at_period_end=False, sub="sub_1"):
    return subscription_event(type, created=created, subscription_id=sub, customer="cus_1", price=price,
                              user_id=user, period_start=start, period_end=end, status=status,
                              previous_price=previous_price, cancel_at_period_end=cancel_at_period_end)


# --- checkout --------------------------------------------------------------------------------

def _issue_link(session_id: str, user_id: str, item: str) -> None:
    with db.write_session() as session:
        ledger.lock_account(session, user_id=user_id)
        session.add(CheckoutLink(session_id=session_id, idempotency_key="k-" + session_id, user_id=user_id,
                                 item=item, url="https://checkout.stripe.com/c/pay/" + session_id,
                                 expires_at=utcnow() + timedelta(hours=24)))


def test_paid_pack_checkout_grants_once_links_customer_and_completes_the_link(sidecar):
    _issue_link("cs_test_pack1", "u1", "pack_250")
    evt = checkout_completed(session_id="cs_test_pack1", user_id="u1", item="pack_250", customer="cus_9",
                             payment_intent="pi_9", email="ada@example.com")
    assert send(sidecar, evt)["status"] == "processed"
    assert send(sidecar, evt)["duplicate"] is True
    data = summary("u1")
    assert data["balance"] == 250 and data["stripe_customer_id"] == "cus_9" and data["email"] == "ada@example.com"
    assert [row["expires_at"] for row in data["breakdown"]] == [None]  # pack credits never expire
    payment = one(Payment, checkout_session_id="cs_test_pack1")
    assert (payment.status, payment.amount_cents, payment.payment_intent_id, payment.item, payment.credits_granted) \
        == ("paid", 2000, "pi_9", "pack_250", 250)
    assert one(CheckoutLink, session_id="cs_test_pack1").status == "complete"
    assert stored_event(evt["id"]).user_id == "u1" and stored_event(evt["id"]).attempts == 1


def test_unpaid_checkout_waits_for_async_success(sidecar):
    fields = dict(session_id="cs_test_async", user_id="u2", item="pack_100", payment_intent="pi_a")
    send(sidecar, checkout_completed(payment_status="unpaid", **fields))
    assert summary("u2")["balance"] == 0
    assert one(Payment, checkout_session_id="cs_test_async").status == "unpaid"
    succeeded = checkout_completed(type="checkout.session.async_payment_succeeded", **fields)
    send(sidecar, succeeded)
    send(sidecar, checkout_completed(type="checkout.session.async_payment_succeeded", **fields))  # another copy
    assert summary("u2")["balance"] == 100
    assert one(Payment, checkout_session_id="cs_test_async").status == "paid"


def test_async_payment_failure_is_recorded_and_grants_nothing(sidecar):
    fields = dict(session_id="cs_test_fail", user_id="u3", item="pack_500")
    send(sidecar, checkout_completed(payment_status="unpaid", **fields))
    send(sidecar, checkout_completed(type="checkout.session.async_payment_failed", payment_status="unpaid", **fields))
    assert summary("u3")["balance"] == 0
    assert one(Payment, checkout_session_id="cs_test_fail").status == "failed"


def test_expired_checkout_marks_the_issued_link_expired(sidecar):
    _issue_link("cs_test_exp", "u4", "pack_100")
    send(sidecar, checkout_completed(type="checkout.session.expired", session_id="cs_test_exp", user_id="u4",
                                     item="pack_100", payment_status="unpaid", status="expired"))
    assert one(CheckoutLink, session_id="cs_test_exp").status == "expired"
    assert summary("u4")["balance"] == 0


def test_subscription_checkout_links_the_customer_and_maps_the_subscription_without_granting(sidecar):
    send(sidecar, checkout_completed(session_id="cs_test_sub", user_id="u5", item="professional",
                                     customer="cus_5", subscription="sub_5"))
    row = one(Subscription, id="sub_5")
    assert (row.user_id, row.tier, row.status) == ("u5", "professional", "incomplete")
    data = summary("u5")
    assert data["balance"] == 0 and data["stripe_customer_id"] == "cus_5"
    assert one(Payment, checkout_session_id="cs_test_sub") is None  # the invoice is the payment


# --- invoices --------------------------------------------------------------------------------

def test_first_invoice_grants_the_period_once_under_both_event_types(sidecar):
    send(sidecar, first_invoice())
    send(sidecar, first_invoice(type="invoice.payment_succeeded"))
    data = summary("u1")
    assert data["balance"] == 100 and data["tier"] == "starter" and data["subscription_status"] == "active"
    assert data["breakdown"][0]["expires_at"].startswith(str(ledger.from_epoch(P1_END).date()))
    payment = one(Payment, invoice_id="in_1")
    assert (payment.amount_cents, payment.status, payment.credits_granted, payment.subscription_id) == \
        (999, "paid", 100, "sub_1")
    assert len(all_rows(Payment)) == 1


def test_renewal_grants_the_new_period_and_expires_the_old(sidecar):
    send(sidecar, first_invoice())
    with db.write_session() as session:
        ledger.consume(session, user_id="u1", credits=30, reference="job-1")
    renewal = subscription_invoice(invoice_id="in_2", customer="cus_1", subscription_id="sub_1", user_id="u1",
                                   price=STARTER, period_start=P1_END, period_end=P2_END, amount=999,
                                   billing_reason="subscription_cycle")
    send(sidecar, event("invoice.paid", renewal))
    data = summary("u1")
    assert data["balance"] == 100  # the 70 left of the first period expired with the new grant
    assert data["current_period_end"] == P2_END


def test_upgrade_proration_invoice_tops_up_in_proportion_once_and_a_downgrade_takes_back(sidecar):
    """Credits follow money (issue 11; before, an upgrade added the whole difference and a downgrade nothing):
    25 of the period's 30 days are left at NOW."""
    send(sidecar, first_invoice())
    upgrade = proration_invoice(invoice_id="in_up", customer="cus_1", subscription_id="sub_1", user_id="u1",
                                old_price=STARTER, new_price=PRO, changed_at=NOW, period_end=P1_END,
                                credit=833, charge=2499)
    send(sidecar, event("invoice.paid", upgrade))
    send(sidecar, event("invoice.payment_succeeded", upgrade))
    assert summary("u1")["balance"] == 100 + 333  # round(400 x 25/30)
    # the customer.subscription.updated for the same upgrade adds nothing more
    send(sidecar, sub_event("customer.subscription.updated", created=NOW + 1, price=PRO, previous_price=STARTER))
    assert summary("u1")["balance"] == 433
    downgrade = proration_invoice(invoice_id="in_down", customer="cus_1", subscription_id="sub_1", user_id="u1",
                                  old_price=PRO, new_price=STARTER, changed_at=NOW + 60, period_end=P1_END,
                                  credit=2499, charge=833)
    send(sidecar, event("invoice.paid", downgrade))
    assert summary("u1")["balance"] == 100  # round(400 x (25 days - 60 s) / 30 days) = 333 taken back


def test_invoice_without_user_needs_attention_then_reprocess_with_assigned_user(sidecar):
    from billing_core import events

    evt = first_invoice(user=None, customer="cus_unknown")
    assert send(sidecar, evt)["status"] == "needs_attention"
    row = stored_event(evt["id"])
    assert "can't tell which user" in row.error and row.status == "needs_attention"
    assert all_rows(Payment) == [] and all_rows(Subscription) == []  # nothing half-applied
    assert send(sidecar, evt)["duplicate"] is True  # a redelivery changes nothing
    result = events.reprocess(evt["id"], assigned_user_id="u9", **wiring())
    assert result.status == "processed"
    assert summary("u9")["balance"] == 100 and summary("u9")["stripe_customer_id"] == "cus_unknown"
    assert stored_event(evt["id"]).assigned_user_id == "u9"


def test_invoice_with_unknown_price_needs_attention(sidecar):
    evt = first_invoice(price="price_not_ours")
    assert send(sidecar, evt)["status"] == "needs_attention"
    assert "price" in stored_event(evt["id"]).error
    assert summary("u1")["balance"] == 0


def test_user_comes_from_the_customer_link_when_the_invoice_has_no_metadata(sidecar):
    send(sidecar, checkout_completed(user_id="u1", item="pack_100", customer="cus_1"))
    send(sidecar, first_invoice(user=None))
    assert summary("u1")["balance"] == 200


def test_payment_failure_makes_the_subscription_past_due_and_freezes_its_credits(sidecar):
    send(sidecar, sub_event(created=P1_START))
    send(sidecar, first_invoice())
    send(sidecar, checkout_completed(user_id="u1", item="pack_100", customer="cus_1"))
    failed = subscription_invoice(invoice_id="in_f", customer="cus_1", subscription_id="sub_1", user_id="u1",
                                  price=STARTER, period_start=P1_END, period_end=P2_END, amount=999,
                                  billing_reason="subscription_cycle", status="open")
    send(sidecar, event("invoice.payment_failed", failed, created=P1_START + 100))
    data = summary("u1")
    assert data["subscription_status"] == "past_due"
    assert (data["balance"], data["spendable_balance"]) == (200, 100)  # only the pack can be spent
    assert one(Payment, invoice_id="in_f").status == "failed"
    # the retried payment succeeds: active again, and the new period is granted
    send(sidecar, event("invoice.paid", {**failed, "status": "paid", "amount_paid": 999}, created=P1_START + 200))
    data = summary("u1")
    assert data["subscription_status"] == "active" and one(Payment, invoice_id="in_f").status == "paid"
    assert data["spendable_balance"] == 200


# --- subscriptions ---------------------------------------------------------------------------

def test_stale_subscription_event_never_overwrites_newer_state(sidecar):
    send(sidecar, sub_event("customer.subscription.updated", created=NOW, cancel_at_period_end=True))
    send(sidecar, sub_event("customer.subscription.created", created=NOW - 100, status="incomplete"))
    row = one(Subscription, id="sub_1")
    assert (row.status, row.cancel_at_period_end, row.state_at) == ("active", True, NOW)


def test_equal_timestamps_let_the_cancellation_win(sidecar):
    send(sidecar, sub_event("customer.subscription.deleted", created=NOW, status="canceled"))
    send(sidecar, sub_event("customer.subscription.updated", created=NOW, status="active"))
    row = one(Subscription, id="sub_1")
    assert (row.status, row.tier) == ("canceled", "none")


def test_an_upgrade_event_changes_the_tier_and_grants_only_when_its_invoice_is_paid(sidecar):
    """Issue 11: the subscription event alone is no money, so it grants nothing (before, it topped up to the new
    allowance); a later downgrade takes back at once, at most the period's unspent subscription credits."""
    send(sidecar, sub_event(created=P1_START))
    send(sidecar, first_invoice())
    upgraded = sub_event("customer.subscription.updated", created=NOW, price=BUSINESS, previous_price=STARTER)
    send(sidecar, upgraded)
    send(sidecar, sub_event("customer.subscription.updated", created=NOW, price=BUSINESS, previous_price=STARTER))
    data = summary("u1")
    assert (data["balance"], data["tier"]) == (100, "business")
    send(sidecar, sub_event("customer.subscription.updated", created=NOW + 5, price=STARTER,
                            previous_price=BUSINESS))
    assert (summary("u1")["balance"], summary("u1")["tier"]) == (0, "starter")
    # the upgrade's proration, paid late: its top-up, less what the downgrade could not take before
    upgrade = proration_invoice(invoice_id="in_up", customer="cus_1", subscription_id="sub_1", user_id="u1",
                                old_price=STARTER, new_price=BUSINESS, changed_at=NOW, period_end=P1_END,
                                credit=833, charge=8333)
    send(sidecar, event("invoice.paid", upgrade))
    assert abs(summary("u1")["balance"] - 100) <= 1


def test_unknown_subscription_price_needs_attention(sidecar):
    evt = sub_event(created=NOW, price="price_other_product")
    assert send(sidecar, evt)["status"] == "needs_attention"
    assert one(Subscription, id="sub_1") is None


def test_deleted_subscription_expires_its_credits_and_keeps_packs(sidecar):
    send(sidecar, sub_event(created=P1_START))
    send(sidecar, first_invoice())
    send(sidecar, checkout_completed(user_id="u1", item="pack_100", customer="cus_1"))
    send(sidecar, sub_event("customer.subscription.deleted", created=NOW, status="canceled"))
    data = summary("u1")
    assert (data["balance"], data["tier"], data["subscription_status"]) == (100, "none", "canceled")
    # a late copy of the first invoice grants nothing to a canceled subscription
    send(sidecar, first_invoice(type="invoice.payment_succeeded"))
    assert summary("u1")["balance"] == 100


# --- refunds and disputes --------------------------------------------------------------------

def _pack(client, *, user="u1", pi="pi_p", item="pack_500"):
    send(client, checkout_completed(user_id=user, item=item, customer="cus_1", payment_intent=pi,
                                    session_id="cs_test_" + pi))


def test_partial_then_full_refund_claws_back_in_proportion_and_a_late_smaller_amount_takes_nothing(sidecar):
    _pack(sidecar)  # 500 credits for $35.00
    half = charge_refunded(charge_id="ch_p", payment_intent="pi_p", amount=3500, amount_refunded=1750)
    send(sidecar, half)
    assert summary("u1")["balance"] == 250
    payment = one(Payment, payment_intent_id="pi_p")
    assert (payment.amount_refunded, payment.status, payment.charge_id) == (1750, "partially_refunded", "ch_p")
    send(sidecar, charge_refunded(charge_id="ch_p", payment_intent="pi_p", amount=3500, amount_refunded=3500))
    send(sidecar, charge_refunded(charge_id="ch_p", payment_intent="pi_p", amount=3500, amount_refunded=1750))
    assert summary("u1")["balance"] == 0
    assert one(Payment, payment_intent_id="pi_p").status == "refunded"


def test_refund_of_an_unknown_payment_needs_attention(sidecar):
    evt = charge_refunded(charge_id="ch_x", payment_intent="pi_x", amount=1000, amount_refunded=1000)
    assert send(sidecar, evt)["status"] == "needs_attention"
    assert "no recorded payment" in stored_event(evt["id"]).error


def test_refund_delivered_before_its_payment_applies_once_the_payment_arrives(sidecar):
    refund = charge_refunded(charge_id="ch_p", payment_intent="pi_p", amount=3500, amount_refunded=1750)
    assert send(sidecar, refund)["status"] == "needs_attention"
    _pack(sidecar)
    assert summary("u1")["balance"] == 250
    assert stored_event(refund["id"]).status == "processed"


def test_dispute_holds_and_flags_then_won_releases_and_clears_the_flag(sidecar):
    _pack(sidecar)
    created = dispute_event("charge.dispute.created", dispute_id="dp_1", charge_id="ch_p", payment_intent="pi_p",
                            amount=3500)
    send(sidecar, created)
    send(sidecar, created)
    data = summary("u1")
    assert data["flagged"] and data["flag_reason"] == "open dispute" and data["balance"] == 0
    assert one(Account, user_id="u1").open_disputes == 1
    closed = dispute_event("charge.dispute.closed", dispute_id="dp_1", charge_id="ch_p", payment_intent="pi_p",
                           amount=3500, status="won")
    send(sidecar, closed)
    send(sidecar, closed)
    data = summary("u1")
    assert not data["flagged"] and data["balance"] == 500
    assert one(Account, user_id="u1").open_disputes == 0 and one(Dispute, id="dp_1").status == "won"


def test_lost_dispute_takes_the_credits_back(sidecar):
    _pack(sidecar)
    with db.write_session() as session:
        ledger.consume(session, user_id="u1", credits=100, reference="job")
    send(sidecar, dispute_event("charge.dispute.created", dispute_id="dp_2", charge_id="ch_p",
                                payment_intent="pi_p", amount=3500))
    lost = dispute_event("charge.dispute.closed", dispute_id="dp_2", charge_id="ch_p", payment_intent="pi_p",
                         amount=3500, status="lost")
    send(sidecar, lost)
    send(sidecar, lost)
    data = summary("u1")
    assert data["balance"] == -100 and data["flagged"] and data["flag_reason"] == "negative balance"
    payment = one(Payment, payment_intent_id="pi_p")
    assert payment.amount_disputed_lost == 3500 and one(Account, user_id="u1").open_disputes == 0


def test_dispute_closed_before_created_ends_the_same(sidecar):
    _pack(sidecar)
    send(sidecar, dispute_event("charge.dispute.closed", dispute_id="dp_3", charge_id="ch_p",
                                payment_intent="pi_p", amount=3500, status="won"))
    send(sidecar, dispute_event("charge.dispute.created", dispute_id="dp_3", charge_id="ch_p",
                                payment_intent="pi_p", amount=3500))
    data = summary("u1")
    assert (data["balance"], data["flagged"]) == (500, False)
    assert one(Account, user_id="u1").open_disputes == 0


def test_other_event_types_are_stored_and_ignored(sidecar):
    evt = event("customer.created", {"id": "cus_new", "object": "customer"})
    assert send(sidecar, evt)["status"] == "ignored"
    assert stored_event(evt["id"]).status == "ignored"


@pytest.mark.parametrize("cancel_first", [True, False])
def test_lost_dispute_on_credits_that_expired_while_held_takes_nothing_more(fake_stripe, sidecar, cancel_first):
    """Held credits whose lot closes (cancellation) are gone either way: losing the dispute afterwards
    must not turn them into debt, whichever came first (ledger fix in clawback_for_payment)."""
    fake_stripe.state.add_invoice_payment(invoice="in_1", payment_intent="pi_1", amount_paid=999)
    send(sidecar, sub_event(created=P1_START))
    send(sidecar, first_invoice())
    opened = dispute_event("charge.dispute.created", dispute_id="dp_x", charge_id="ch_1", payment_intent="pi_1",
                           amount=999)
    canceled = sub_event("customer.subscription.deleted", created=NOW, status="canceled")
    for evt in ([canceled, opened] if cancel_first else [opened, canceled]):
        send(sidecar, evt)
    send(sidecar, dispute_event("charge.dispute.closed", dispute_id="dp_x", charge_id="ch_1", payment_intent="pi_1",
                                amount=999, status="lost"))
    data = summary("u1")
    assert (data["balance"], data["flagged"]) == (0, False)
    assert one(Payment, invoice_id="in_1").amount_disputed_lost == 999


def test_proration_invoice_first_leaves_the_subscription_state_to_the_subscription_events(sidecar):
    upgrade = proration_invoice(invoice_id="in_up", customer="cus_1", subscription_id="sub_1", user_id="u1",
                                old_price=STARTER, new_price=PRO, changed_at=NOW - 100, period_end=P1_END,
                                credit=800, charge=2400, created=NOW - 90)
    send(sidecar, event("invoice.paid", upgrade, created=NOW - 90))
    assert one(Subscription, id="sub_1") is None
    send(sidecar, sub_event("customer.subscription.updated", created=NOW - 100, price=PRO, previous_price=STARTER))
    send(sidecar, first_invoice())
    data = summary("u1")
    # the period's start was not known when the invoice came: the fraction is the amount charged over the
    # price, 2400 / 2999, and the top-up round(400 x 0.8003) = 320 (issue 11; before, the whole 400)
    assert (data["tier"], data["subscription_status"], data["balance"]) == ("professional", "active", 100 + 320)


def test_dispute_before_its_invoice_waits_and_applies_when_the_invoice_is_recorded(fake_stripe, sidecar):
    fake_stripe.state.add_invoice_payment(invoice="in_1", payment_intent="pi_1", amount_paid=999)
    opened = dispute_event("charge.dispute.created", dispute_id="dp_w", charge_id="ch_1", payment_intent="pi_1",
                           amount=999)
    assert send(sidecar, opened)["status"] == "needs_attention"
    assert "invoice in_1" in stored_event(opened["id"]).error
    send(sidecar, first_invoice())
    assert stored_event(opened["id"]).status == "processed"
    data = summary("u1")
    assert data["flagged"] and data["balance"] == 0  # the invoice's 100 credits are held


def test_unrelated_waiting_events_are_not_retried(fake_stripe, sidecar):
    foreign = charge_refunded(charge_id="ch_foreign", payment_intent="pi_foreign", amount=500, amount_refunded=500)
    assert send(sidecar, foreign)["status"] == "needs_attention"
    lookups = len(fake_stripe.state.requests_to("GET", "/v1/invoice_payments"))
    send(sidecar, checkout_completed(user_id="u1", item="pack_100", customer="cus_1", payment_intent="pi_mine"))
    send(sidecar, first_invoice())
    row = stored_event(foreign["id"])
    assert (row.status, row.attempts) == ("needs_attention", 1)
    assert len(fake_stripe.state.requests_to("GET", "/v1/invoice_payments")) == lookups


@pytest.mark.parametrize("subscription_event_first", [True, False], ids=["update-first", "invoice-first"])
def test_refunding_an_upgrade_takes_back_its_top_up_whichever_event_granted_it(fake_stripe, sidecar,
                                                                               subscription_event_first):
    """Stripe usually sends customer.subscription.updated before the proration invoice; the top-up is granted
    by the paid invoice either way and tied to its payment, so a refund of the upgrade takes it back."""
    fake_stripe.state.add_invoice_payment(invoice="in_up", payment_intent="pi_up", amount_paid=1666)
    send(sidecar, first_invoice())
    upgrade = proration_invoice(invoice_id="in_up", customer="cus_1", subscription_id="sub_1", user_id="u1",
                                old_price=STARTER, new_price=PRO, changed_at=NOW, period_end=P1_END,
                                credit=833, charge=2499)
    updated = sub_event("customer.subscription.updated", created=NOW, price=PRO, previous_price=STARTER)
    for evt in ([updated, event("invoice.paid", upgrade)] if subscription_event_first
                else [event("invoice.paid", upgrade), updated]):
        send(sidecar, evt)
    assert summary("u1")["balance"] == 433  # round(400 x 25/30) on top of the starter's 100
    assert one(Payment, invoice_id="in_up").credits_granted == 333
    send(sidecar, charge_refunded(charge_id="ch_up", payment_intent="pi_up", amount=1666, amount_refunded=1666))
    assert summary("u1")["balance"] == 100  # the starter allowance the first invoice paid for stays
    assert one(Payment, invoice_id="in_up").status == "refunded"


# --- a price replaced by sync-catalog (the old price stays on existing subscriptions) ---------

OLD_STARTER = "price_replaced_starter_0000"


def _with_price_details(evt: dict, **price_fields) -> dict:
    evt["data"]["object"]["items"]["data"][0]["price"].update(price_fields)
    return evt


def _renewal(price: str, *, invoice_id="in_2", item: str | None = None, start=P1_END, end=P2_END) -> dict:
    renewal = subscription_invoice(invoice_id=invoice_id, customer="cus_1", subscription_id="sub_1", user_id="u1",
                                   price=price, period_start=start, period_end=end, amount=999,
                                   billing_reason="subscription_cycle")
    if item is not None:
        renewal["parent"]["subscription_details"]["metadata"]["item"] = item
    return event("invoice.paid", renewal)


def test_a_replaced_price_is_recognised_by_its_lookup_key_and_teaches_the_invoice_lines(sidecar):
    sub = _with_price_details(sub_event(created=P1_START, price=OLD_STARTER), lookup_key="starter_monthly")
    assert send(sidecar, sub)["status"] == "processed"
    row = one(Subscription, id="sub_1")
    assert (row.tier, row.price_id) == ("starter", OLD_STARTER)
    # the renewal's line names only the old price id: the stored subscription says which plan it is
    assert send(sidecar, _renewal(OLD_STARTER))["status"] == "processed"
    data = summary("u1")
    assert (data["balance"], data["tier"], data["current_period_end"]) == (100, "starter", P2_END)


def test_a_replaced_price_is_recognised_by_its_metadata_item(sidecar):
    sub = _with_price_details(sub_event(created=P1_START, price=OLD_STARTER), metadata={"item": "professional"})
    assert send(sidecar, sub)["status"] == "processed"
    assert one(Subscription, id="sub_1").tier == "professional"


def test_an_invoice_of_a_replaced_price_falls_back_to_the_checkout_item_in_the_subscription_metadata(sidecar):
    assert send(sidecar, _renewal(OLD_STARTER, item="starter"))["status"] == "processed"
    assert (summary("u1")["balance"], summary("u1")["tier"]) == (100, "starter")


def test_a_proration_line_of_an_unknown_price_is_not_taken_for_the_checkout_item(sidecar):
    send(sidecar, first_invoice())
    upgrade = proration_invoice(invoice_id="in_up", customer="cus_1", subscription_id="sub_1", user_id="u1",
                                old_price=STARTER, new_price="price_unknown_new", changed_at=NOW,
                                period_end=P1_END, credit=800, charge=2400)
    upgrade["parent"]["subscription_details"]["metadata"]["item"] = "business"
    send(sidecar, event("invoice.paid", upgrade))
    assert summary("u1")["balance"] == 100  # no top-up to a plan nobody can name


def test_a_price_that_nothing_identifies_still_needs_attention(sidecar):
    sub = _with_price_details(sub_event(created=P1_START, price="price_someone_elses"), lookup_key="other_monthly",
                              metadata={"item": "pack_100"})
    assert send(sidecar, sub)["status"] == "needs_attention"
    assert send(sidecar, _renewal("price_someone_elses"))["status"] == "needs_attention"
    assert summary("u1")["balance"] == 0
    assert all_rows(Payment) == []


def test_an_older_subscription_snapshot_processed_after_a_renewal_never_moves_the_period_back(sidecar):
    send(sidecar, sub_event(created=P1_START))
    send(sidecar, first_invoice())
    send(sidecar, _renewal(STARTER, start=P1_END, end=P2_END))  # invoice created now: period 2 paid
    # a customer.subscription.updated from before the renewal (newer than the stored snapshot) arrives late
    send(sidecar, sub_event("customer.subscription.updated", created=P1_START + 100, cancel_at_period_end=True))
    row = one(Subscription, id="sub_1")
    assert (row.current_period_end, row.cancel_at_period_end, row.status) == (P2_END, True, "active")
    assert summary("u1")["current_period_end"] == P2_END


# --- the payment's status through a dispute ---------------------------------------------------

def _dispute(type, *, dispute_id="dp_s", status="needs_response"):
    return dispute_event(type, dispute_id=dispute_id, charge_id="ch_p", payment_intent="pi_p", amount=3500,
                         status=status)


def payment_status() -> str:
    return one(Payment, payment_intent_id="pi_p").status


@pytest.mark.parametrize("refunded, after_won", [(0, "paid"), (1000, "partially_refunded")])
def test_an_open_dispute_marks_the_payment_disputed_and_a_won_one_restores_its_status(sidecar, refunded, after_won):
    _pack(sidecar)
    if refunded:
        send(sidecar, charge_refunded(charge_id="ch_p", payment_intent="pi_p", amount=3500, amount_refunded=refunded))
    send(sidecar, _dispute("charge.dispute.created"))
    assert payment_status() == "disputed"
    send(sidecar, _dispute("charge.dispute.closed", status="won"))
    assert payment_status() == after_won


def test_a_refund_during_a_dispute_keeps_it_disputed_and_a_won_close_then_says_partially_refunded(sidecar):
    _pack(sidecar)
    send(sidecar, _dispute("charge.dispute.created"))
    send(sidecar, charge_refunded(charge_id="ch_p", payment_intent="pi_p", amount=3500, amount_refunded=1000))
    assert payment_status() == "disputed"
    send(sidecar, _dispute("charge.dispute.closed", status="won"))
    assert payment_status() == "partially_refunded"


@pytest.mark.parametrize("opened_first", [True, False], ids=["opened-first", "closed-first"])
def test_a_lost_dispute_leaves_the_payment_disputed(sidecar, opened_first):
    _pack(sidecar)
    if opened_first:
        send(sidecar, _dispute("charge.dispute.created"))
    send(sidecar, _dispute("charge.dispute.closed", status="lost"))
    send(sidecar, _dispute("charge.dispute.created"))
    assert payment_status() == "disputed"
    assert summary("u1")["balance"] == 0
