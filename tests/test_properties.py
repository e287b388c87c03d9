"""Property-based tests (hypothesis) through the real sidecar app (Starlette TestClient on create_app()):

* any order and any duplication of a customer's events ends in the same ledger (balance, spendable
  balance, breakdown, tier, subscription status, flag) as delivering them once, in the order they happened;
* malformed bodies and headers are refused with a 4xx and write nothing; correctly signed events of a
  handled type with garbage inside never get a 5xx (retrying can't help them) and never touch the ledger.

Each example uses its own ids, so examples share one database without resetting it.
"""
from __future__ import annotations

import itertools
import json
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import func, select

from billing_core import db, ledger
from billing_core.handlers import EVENT_TYPES
from billing_core.models import Account, CheckoutLink, Dispute, LedgerEntry, Payment, StripeEvent, Subscription
from stripe_events import (DEFAULT_PRICES, PACK_AMOUNTS, PLAN_AMOUNTS, charge_refunded, checkout_completed,
                           deliver, dispute_event, encode, event, proration_invoice, signed_headers,
                           subscription_event, subscription_invoice)

URL = "/api/stripe/webhook"
DAY = 86_400
TIERS = ("starter", "professional", "business")
# `make test` runs 40 fixed examples per property; PROPERTY_EXAMPLES=500 explores afresh (random seed).
THOROUGH = int(os.environ.get("PROPERTY_EXAMPLES", "0"))
pytestmark = [pytest.mark.timeout(3600 if THOROUGH else 90)]  # a hang fails the test; 40 examples take ~15 s
PROPERTY_SETTINGS = settings(max_examples=THOROUGH or 40, deadline=None, derandomize=not THOROUGH, database=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_example = itertools.count(1)


# --- a customer's life ---------------------------------------------------------------------------

@st.composite
def lives(draw) -> dict:
    tier = draw(st.sampled_from(TIERS))
    higher = [t for t in TIERS if TIERS.index(t) > TIERS.index(tier)]
    pack = draw(st.sampled_from((None, "pack_100", "pack_250", "pack_500", "pack_1000")))
    renewal = draw(st.booleans())
    upgrade = draw(st.sampled_from([None, *higher]))
    reversals = (None, "refund_half", "refund_all", "dispute_open", "dispute_won", "dispute_lost")
    return {
        "tier": tier,
        "renewal": renewal,
        "renewal_retry": renewal and draw(st.booleans()),  # the renewal charge fails once, then succeeds
        "upgrade": upgrade,
        "pack": pack,
        "refund_share": draw(st.sampled_from((0, 0.25, 0.5, 1))) if pack else 0,
        "dispute": draw(st.sampled_from((None, "open", "won", "lost"))) if pack else None,
        "cancel": draw(st.booleans()),
        # a refund or dispute of the latest subscription invoice's charge (linked through Stripe's invoice payments)
        "invoice_reversal": draw(st.sampled_from(reversals)),
    }


def life_events(life: dict, *, tag: str, now: int) -> list[dict]:
    """The customer's events in the order they happened; every id carries `tag`."""
    user, sub, customer = f"user_{tag}", f"sub_{tag}", f"cus_{tag}"
    price = DEFAULT_PRICES[life["tier"]]
    t0 = now - (40 if life["renewal"] else 10) * DAY
    p1_end = t0 + 30 * DAY
    period_start, period_end = (p1_end, p1_end + 30 * DAY) if life["renewal"] else (t0, p1_end)
    ids = dict(subscription_id=sub, customer=customer, user_id=user)
    first = subscription_invoice(invoice_id=f"in_{tag}_1", price=price, period_start=t0, period_end=p1_end,
                                 amount=PLAN_AMOUNTS[life["tier"]], billing_reason="subscription_create",
                                 created=t0 + 1, **ids)
    evts = [
        subscription_event("customer.subscription.created", created=t0, price=price, period_start=t0,
                           period_end=p1_end, event_id=f"evt_{tag}_created", **ids),
        event("invoice.paid", first, created=t0 + 2, id=f"evt_{tag}_inv1_paid"),
        event("invoice.payment_succeeded", first, created=t0 + 2, id=f"evt_{tag}_inv1_succeeded"),
        checkout_completed(user_id=user, item=life["tier"], customer=customer, subscription=sub,
                           session_id=f"cs_test_{tag}_sub", created=t0 + 3, event_id=f"evt_{tag}_cs_sub"),
    ]
    if life["renewal"]:
        renewal = subscription_invoice(invoice_id=f"in_{tag}_2", price=price, period_start=period_start,
                                       period_end=period_end, amount=PLAN_AMOUNTS[life["tier"]],
                                       billing_reason="subscription_cycle", created=p1_end + 60, **ids)
        evts.append(subscription_event(
            "customer.subscription.updated", created=p1_end, price=price, period_start=period_start,
            period_end=period_end, event_id=f"evt_{tag}_renew_sub",
            previous_attributes={"items": {"data": [{"current_period_end": p1_end}]}}, **ids))
        paid_at = p1_end + 61
        if life.get("renewal_retry"):
            unpaid = subscription_invoice(invoice_id=f"in_{tag}_2", price=price, period_start=period_start,
                                          period_end=period_end, amount=PLAN_AMOUNTS[life["tier"]], status="open",
                                          billing_reason="subscription_cycle", created=p1_end + 60, **ids)
            paid_at = p1_end + 2 * DAY
            evts += [
                event("invoice.payment_failed", unpaid, created=p1_end + 61, id=f"evt_{tag}_inv2_failed"),
                subscription_event("customer.subscription.updated", created=p1_end + 62, price=price,
                                   period_start=period_start, period_end=period_end, status="past_due",
                                   previous_attributes={"status": "active"}, event_id=f"evt_{tag}_past_due", **ids),
            ]
        evts += [
            event("invoice.paid", renewal, created=paid_at, id=f"evt_{tag}_inv2_paid"),
            event("invoice.payment_succeeded", renewal, created=paid_at, id=f"evt_{tag}_inv2_succeeded"),
        ]
        if life.get("renewal_retry"):
            evts.append(subscription_event("customer.subscription.updated", created=paid_at + 1, price=price,
                                           period_start=period_start, period_end=period_end,
                                           previous_attributes={"status": "past_due"},
                                           event_id=f"evt_{tag}_active_again", **ids))
    current_price = price
    if life["upgrade"]:
        new_price, at = DEFAULT_PRICES[life["upgrade"]], now - 5 * DAY
        left = (period_end - at) / (30 * DAY)  # Stripe's proration amounts for the time left (25 of 30 days)
        upgrade = proration_invoice(invoice_id=f"in_{tag}_up", old_price=price, new_price=new_price, changed_at=at,
                                    period_end=period_end, credit=round(PLAN_AMOUNTS[life["tier"]] * left),
                                    charge=round(PLAN_AMOUNTS[life["upgrade"]] * left), created=at + 5, **ids)
        evts += [
            subscription_event("customer.subscription.updated", created=at, price=new_price,
                               period_start=period_start, period_end=period_end, previous_price=price,
                               event_id=f"evt_{tag}_up_sub", **ids),
            event("invoice.paid", upgrade, created=at + 6, id=f"evt_{tag}_up_paid"),
            event("invoice.payment_succeeded", upgrade, created=at + 6, id=f"evt_{tag}_up_succeeded"),
        ]
        current_price = new_price
    if life["pack"]:
        amount = PACK_AMOUNTS[life["pack"]]
        charge = dict(charge_id=f"ch_{tag}_pack", payment_intent=f"pi_{tag}_pack")
        evts.append(checkout_completed(user_id=user, item=life["pack"], customer=customer,
                                       payment_intent=charge["payment_intent"], session_id=f"cs_test_{tag}_pack",
                                       created=now - 8 * DAY, event_id=f"evt_{tag}_cs_pack"))
        refunded = int(amount * life["refund_share"])
        if refunded:
            evts.append(charge_refunded(amount=amount, amount_refunded=refunded, created=now - 4 * DAY,
                                        event_id=f"evt_{tag}_refund", **charge))
        if life["dispute"] and refunded < amount:
            dispute = dict(dispute_id=f"dp_{tag}", amount=amount - refunded, **charge)
            evts.append(dispute_event("charge.dispute.created", created=now - 3 * DAY, event_id=f"evt_{tag}_dp1",
                                      **dispute))
            if life["dispute"] != "open":
                evts.append(dispute_event("charge.dispute.closed", status=life["dispute"], created=now - 2 * DAY,
                                          event_id=f"evt_{tag}_dp2", **dispute))
    if life.get("invoice_reversal"):
        evts += invoice_reversal_events(life, tag=tag, now=now)
    if life["cancel"]:
        evts.append(subscription_event("customer.subscription.deleted", created=now - 60, price=current_price,
                                       period_start=period_start, period_end=period_end, status="canceled",
                                       event_id=f"evt_{tag}_deleted", **ids))
    return evts


def reversed_invoice(life: dict, tag: str) -> tuple[str, str, int]:
    """(invoice id, payment intent, amount) of the invoice a reversal concerns: the latest period's."""
    return f"in_{tag}_{2 if life['renewal'] else 1}", f"pi_{tag}_inv", PLAN_AMOUNTS[life["tier"]]


def invoice_reversal_events(life: dict, *, tag: str, now: int) -> list[dict]:
    _invoice, payment_intent, amount = reversed_invoice(life, tag)
    charge = dict(charge_id=f"ch_{tag}_inv", payment_intent=payment_intent)
    kind = life["invoice_reversal"]
    if kind.startswith("refund"):
        refunded = amount if kind == "refund_all" else amount // 2
        return [charge_refunded(amount=amount, amount_refunded=refunded, created=now - 3 * DAY - 600,
                                event_id=f"evt_{tag}_inv_refund", **charge)]
    dispute = dict(dispute_id=f"dp_{tag}_inv", amount=amount, **charge)
    evts = [dispute_event("charge.dispute.created", created=now - 3 * DAY - 300, event_id=f"evt_{tag}_inv_dp1",
                          **dispute)]
    if kind != "dispute_open":
        evts.append(dispute_event("charge.dispute.closed", status=kind.split("_")[1], created=now - 2 * DAY - 300,
                                  event_id=f"evt_{tag}_inv_dp2", **dispute))
    return evts


def register_invoice_payment(fake_stripe, life: dict, tag: str) -> None:
    """Stripe's invoice payments list links the invoice to the PaymentIntent its charge belongs to."""
    invoice, payment_intent, amount = reversed_invoice(life, tag)
    fake_stripe.state.add_invoice_payment(invoice=invoice, payment_intent=payment_intent, amount_paid=amount)


def breakdown_by_source_and_expiry(rows: list[dict]) -> list[tuple]:
    """Credits per (source, expiry, frozen). Whether a period's allowance sits in one lot or in a base lot plus
    an upgrade top-up depends on which event came first; what the customer holds, and until when, may not."""
    totals: dict[tuple, int] = {}
    for row in rows:
        key = (row["source"], row["expires_at"] or "", row["frozen"])
        totals[key] = totals.get(key, 0) + row["credits"]
    return sorted((*key, credits) for key, credits in totals.items() if credits)


def ledger_state(user_id: str) -> dict:
    """What the ledger says about the customer, with the example's own ids taken out."""
    with db.read_session() as session:
        summary = ledger.account_summary(session, user_id).as_dict()
    return {
        "balance": summary["balance"], "spendable": summary["spendable_balance"], "tier": summary["tier"],
        "status": summary["subscription_status"], "flagged": summary["flagged"],
        "flag_reason": summary["flag_reason"], "period_end": summary["current_period_end"],
        "breakdown": breakdown_by_source_and_expiry(summary["breakdown"]),
    }


def deliver_all(client, evts: list[dict]) -> None:
    for evt in evts:
        response = deliver(client, evt)
        assert response.status_code == 200, response.text


def retag(evts: list[dict], old: str, new: str) -> list[dict]:
    return [json.loads(json.dumps(evt).replace(old, new)) for evt in evts]


@PROPERTY_SETTINGS
@given(life=lives(), data=st.data())
def test_any_order_and_duplication_of_a_customers_events_gives_the_in_order_ledger(fake_stripe, sidecar, life, data):
    n = next(_example)
    now = int(time.time())
    for tag in (f"ord{n}x", f"shf{n}x"):
        register_invoice_payment(fake_stripe, life, tag)
    in_order = life_events(life, tag=f"ord{n}x", now=now)
    deliver_all(sidecar, in_order)
    expected = ledger_state(f"user_ord{n}x")

    same = retag(in_order, f"ord{n}x", f"shf{n}x")
    order = data.draw(st.permutations(range(len(same))), label="order")
    repeats = data.draw(st.lists(st.integers(0, len(same) - 1), max_size=len(same)), label="redelivered")
    stream = [same[i] for i in order]
    for position, i in enumerate(repeats):
        stream.insert((position * 7 + i) % (len(stream) + 1), same[i])
    deliver_all(sidecar, stream)
    assert ledger_state(f"user_shf{n}x") == expected


# --- malformed deliveries ------------------------------------------------------------------------

TABLES = (StripeEvent, Account, LedgerEntry, Payment, Subscription, Dispute, CheckoutLink)


def row_counts() -> dict[str, int]:
    with db.read_session() as session:
        return {model.__name__: session.execute(select(func.count()).select_from(model)).scalar_one()
                for model in TABLES}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)


def a_valid_event(n: int) -> dict:
    return checkout_completed(user_id=f"user_bad{n}", item="pack_100", event_id=f"evt_bad{n}")


@st.composite
def malformed_deliveries(draw) -> tuple[bytes, dict]:
    n = next(_example)
    valid = encode(a_valid_event(n))
    kind = draw(st.sampled_from(["random_bytes", "random_json_signed", "broken_event_signed", "bad_header",
                                 "wrong_secret", "stale", "tampered", "other_mode"]))
    if kind == "random_bytes":
        body = draw(st.binary(max_size=300))
        return body, {"Stripe-Signature": signed_headers(body.decode("latin-1"))["Stripe-Signature"]}
    if kind == "random_json_signed":
        body = json.dumps(draw(json_values))
        return body.encode(), signed_headers(body)
    if kind == "broken_event_signed":  # an event with one required field removed or of the wrong kind
        evt = a_valid_event(n)
        field = draw(st.sampled_from(["id", "type", "created", "data"]))
        if draw(st.booleans()):
            del evt[field]
        else:
            evt[field] = draw(json_values.filter(lambda v: not isinstance(v, dict) or field != "data"))
        if field == "id" and isinstance(evt.get("id"), str) and evt["id"].startswith("evt_"):
            evt["id"] = "x" + evt["id"]
        body = encode(evt)
        return body.encode(), signed_headers(body)
    if kind == "bad_header":
        header = draw(st.one_of(st.just(""), st.text(max_size=80).filter(lambda s: "\n" not in s and "\r" not in s),
                                st.builds(lambda t, v: f"t={t},v1={v}", st.integers(), st.text(
                                    alphabet="0123456789abcdef", max_size=64))))
        return valid.encode(), {"Stripe-Signature": header.encode("utf-8")}  # raw bytes: non-ASCII too
    if kind == "wrong_secret":
        return valid.encode(), signed_headers(valid, "whsec_" + draw(st.text("abcdef0123456789", min_size=8,
                                                                             max_size=32)))
    if kind == "stale":
        age = draw(st.integers(301, 10 * 365 * DAY))
        return valid.encode(), signed_headers(valid, timestamp=int(time.time()) - age)
    if kind == "tampered":
        tampered = valid.replace("pack_100", draw(st.sampled_from(["pack_1000", "pack_10", "business"])))
        return tampered.encode(), signed_headers(valid)
    evt = a_valid_event(n)
    evt["livemode"] = True  # a live-mode event while the configured mode is not live
    body = encode(evt)
    return body.encode(), signed_headers(body)


@PROPERTY_SETTINGS
@given(delivery=malformed_deliveries())
def test_malformed_bodies_and_headers_get_a_4xx_and_write_nothing(sidecar, delivery):
    body, headers = delivery
    before = row_counts()
    response = sidecar.post(URL, content=body, headers={"Content-Type": "application/json", **headers})
    assert 400 <= response.status_code < 500, response.text
    assert "error" in response.json()
    assert row_counts() == before


@PROPERTY_SETTINGS
@given(event_type=st.sampled_from(EVENT_TYPES), garbage=st.dictionaries(
    st.sampled_from(["id", "customer", "metadata", "mode", "payment_status", "lines", "parent", "items",
                     "subscription", "status", "amount", "amount_refunded", "payment_intent", "charge",
                     "billing_reason", "created", "client_reference_id", "amount_total"]),
    json_values, max_size=8))
def test_signed_events_with_garbage_inside_never_get_a_5xx_nor_touch_the_ledger(sidecar, event_type, garbage):
    n = next(_example)
    evt = event(event_type, garbage, id=f"evt_garbage{n}")
    body = encode(evt)
    entries_before = row_counts()["LedgerEntry"]
    response = sidecar.post(URL, content=body.encode(), headers=signed_headers(body))
    assert response.status_code == 200, response.text
    with db.read_session() as session:
        stored = session.get(StripeEvent, evt["id"])
    assert stored is not None and stored.status in ("needs_attention", "ignored", "processed")
    assert row_counts()["LedgerEntry"] == entries_before


# --- cases the properties found, kept as plain tests ---------------------------------------------

@pytest.mark.parametrize("closed", [None, "won", "lost"])
def test_a_refund_delivered_after_a_dispute_opened_on_the_rest_ends_as_in_order(sidecar, closed):
    """Pack bought, a quarter refunded, then a dispute on the rest; the dispute's event arrives first and
    holds the whole pack. The refund must then take its credits from the hold, not leave a debt."""
    life = {"tier": "business", "renewal": False, "upgrade": None, "pack": "pack_100", "refund_share": 0.25,
            "dispute": closed or "open", "cancel": False}
    now = int(time.time())
    deliver_all(sidecar, life_events(life, tag="regA", now=now))
    expected = ledger_state("user_regA")
    assert expected["balance"] == 2000 + (75 if closed == "won" else 0)
    evts = life_events(life, tag="regB", now=now)
    refund = next(e for e in evts if e["type"] == "charge.refunded")
    deliver_all(sidecar, [e for e in evts if e is not refund] + [refund])
    assert ledger_state("user_regB") == expected


def test_refunding_the_first_invoice_after_an_upgrade_reported_first_takes_back_only_its_share(fake_stripe, sidecar):
    life = {"tier": "starter", "renewal": False, "renewal_retry": False, "upgrade": "professional", "pack": None,
            "refund_share": 0, "dispute": None, "cancel": False, "invoice_reversal": "refund_half"}
    now = int(time.time())
    for tag in ("upgA", "upgB"):
        register_invoice_payment(fake_stripe, life, tag)
    deliver_all(sidecar, life_events(life, tag="upgA", now=now))
    expected = ledger_state("user_upgA")
    # 100 + round(400 x 25/30) = 333 top-up (issue 11: in proportion to the time left), less half of the 100
    assert expected["balance"] == 383
    evts = life_events(life, tag="upgB", now=now)
    upgrade_first = [evts[0], evts[4], evts[2], evts[3], evts[1], *evts[5:]]
    deliver_all(sidecar, upgrade_first)
    assert ledger_state("user_upgB") == expected


def test_a_refund_delivered_between_a_failed_renewal_and_its_paid_retry_applies_once_paid(fake_stripe, sidecar):
    """Found by the property above: the refund found the renewal's payment recorded as failed, with nothing
    granted yet; the retry's grant must then take the refunded share back."""
    life = {"tier": "starter", "renewal": True, "renewal_retry": True, "upgrade": "professional", "pack": None,
            "refund_share": 0, "dispute": None, "cancel": False, "invoice_reversal": "refund_half"}
    now = int(time.time())
    for tag in ("rtyA", "rtyB"):
        register_invoice_payment(fake_stripe, life, tag)
    deliver_all(sidecar, life_events(life, tag="rtyA", now=now))
    expected = ledger_state("user_rtyA")
    assert expected["balance"] == 383  # 100 + 333 top-up for 25 of 30 days, less half of the renewal's 100
    evts = life_events(life, tag="rtyB", now=now)
    deliver_all(sidecar, [evts[i] for i in (0, 1, 2, 3, 4, 5, 13, 7, 8, 9, 10, 11, 12, 6)])
    assert ledger_state("user_rtyB") == expected
