"""billing_core.proration: the fraction of the period left and the credits a plan change is worth."""
from fractions import Fraction

import pytest
from hypothesis import given, strategies as st

from billing_core.proration import (ProrationError, ProrationLine, change_credits, changes, fraction_at,
                                    fraction_from_lines, is_proration, proration_lines, round_half_up, takeback,
                                    topup)

DAY = 86400
START = 1_767_225_600  # 2026-01-01T00:00:00Z
END = START + 30 * DAY
PRICES = {"price_starter": 999, "price_business": 9999}


def stripe_line(*, price, amount, start, end=END, layout="current", quantity=1):
    line = {"object": "line_item", "amount": amount, "currency": "usd", "quantity": quantity,
            "period": {"start": start, "end": end}}
    if layout == "current":
        line["pricing"] = {"type": "price_details", "price_details": {"price": price, "product": "prod_x"},
                           "unit_amount_decimal": str(abs(amount))}
        line["parent"] = {"type": "subscription_item_details", "subscription_item_details": {
            "subscription": "sub_1", "subscription_item": "si_1", "proration": True,
            "proration_details": {"credited_items": None}, "invoice_item": None}}
    else:  # before 2025-03: price and proration at the top level
        line.update(price={"id": price, "object": "price", "unit_amount": PRICES[price]}, proration=True,
                    subscription="sub_1", type="subscription")
    return line


def upgrade_invoice(changed_at, layout="current"):
    left = Fraction(END - changed_at, END - START)
    return {"object": "invoice", "lines": {"data": [
        stripe_line(price="price_starter", amount=-round_half_up(999 * left), start=changed_at, layout=layout),
        stripe_line(price="price_business", amount=round_half_up(9999 * left), start=changed_at, layout=layout),
    ]}}


def test_worked_example_upgrade_day_10_then_downgrade_day_20():
    up = fraction_at(changed_at=START + 10 * DAY, period_start=START, period_end=END)
    down = fraction_at(changed_at=START + 20 * DAY, period_start=START, period_end=END)
    assert (up, down) == (Fraction(2, 3), Fraction(1, 3))
    assert topup(old_allowance=100, new_allowance=2000, fraction=up) == 1267  # 1266.67
    assert takeback(old_allowance=2000, new_allowance=100, fraction=down, unspent=10_000) == 633  # 633.33
    assert 100 + 1267 - 633 == 734


@pytest.mark.parametrize("layout", ["current", "pre-2025-03"])
def test_fraction_from_stripe_proration_lines_in_both_layouts(layout):
    lines = proration_lines(upgrade_invoice(START + 10 * DAY, layout), full_amount_of=PRICES.get)
    assert [line.is_credit for line in lines] == [True, False]
    assert [line.price_id for line in lines] == ["price_starter", "price_business"]
    by_amount = fraction_from_lines(lines)
    assert abs(by_amount - Fraction(2, 3)) < Fraction(1, 9999)
    assert topup(old_allowance=100, new_allowance=2000, fraction=by_amount) == 1267
    assert fraction_from_lines(lines, period_start=START) == Fraction(2, 3)  # exact from the periods


def test_only_proration_lines_are_read():
    invoice = upgrade_invoice(START + 15 * DAY)
    regular = stripe_line(price="price_business", amount=9999, start=END, end=END + 30 * DAY)
    regular["parent"]["subscription_item_details"]["proration"] = False
    invoice["lines"]["data"].append(regular)
    assert not is_proration(regular)
    assert len(proration_lines(invoice, full_amount_of=PRICES.get)) == 2


def test_quantity_scales_the_full_amount():
    line = stripe_line(price="price_business", amount=2 * 5000, start=START + 15 * DAY, quantity=2)
    [read] = proration_lines({"lines": {"data": [line]}}, full_amount_of=PRICES.get)
    assert read.full_amount == 19998
    assert abs(fraction_from_lines([read]) - Fraction(1, 2)) < Fraction(1, 9999)


@pytest.mark.parametrize("percent_elapsed, expected", [(0, 1900), (50, 950), (99, 19)])
def test_upgrade_at_0_50_and_99_percent_of_the_period(percent_elapsed, expected):
    changed_at = START + (END - START) * percent_elapsed // 100
    fraction = fraction_from_lines(proration_lines(upgrade_invoice(changed_at), full_amount_of=PRICES.get))
    assert topup(old_allowance=100, new_allowance=2000, fraction=fraction) == expected


def test_takeback_never_exceeds_unspent_subscription_credits():
    assert takeback(old_allowance=2000, new_allowance=100, fraction=Fraction(1, 2), unspent=300) == 300
    assert takeback(old_allowance=2000, new_allowance=100, fraction=Fraction(1, 2), unspent=0) == 0
    assert takeback(old_allowance=100, new_allowance=2000, fraction=Fraction(1, 2), unspent=500) == 0
    assert topup(old_allowance=2000, new_allowance=100, fraction=Fraction(1, 2)) == 0


def test_change_credits_is_signed():
    assert change_credits(old_allowance=100, new_allowance=500, fraction=Fraction(1, 2), unspent=0) == 200
    assert change_credits(old_allowance=500, new_allowance=100, fraction=Fraction(1, 2), unspent=999) == -200


def test_rounding_is_to_the_nearest_credit_halves_up():
    assert [round_half_up(Fraction(n, 2)) for n in (1, 3, 5)] == [1, 2, 3]
    assert round_half_up(Fraction(4, 3)) == 1 and round_half_up(Fraction(5, 3)) == 2
    assert round_half_up(Fraction(-3, 2)) == -2


def test_fraction_is_clamped_to_the_period():
    assert fraction_at(changed_at=START - DAY, period_start=START, period_end=END) == 1
    assert fraction_at(changed_at=END + DAY, period_start=START, period_end=END) == 0


def test_unreadable_prorations_are_named():
    with pytest.raises(ProrationError, match="empty or reversed"):
        fraction_at(changed_at=START, period_start=END, period_end=START)
    with pytest.raises(ProrationError, match="no proration lines"):
        fraction_from_lines([])
    with pytest.raises(ProrationError, match="known amount"):
        fraction_from_lines([ProrationLine("price_x", 500, START, END)])
    bad = stripe_line(price="price_starter", amount=12, start=START)
    bad["amount"] = "12"
    with pytest.raises(ProrationError, match="amount '12' is not a whole number"):
        proration_lines({"lines": {"data": [bad]}})


def test_lines_of_several_changes_are_grouped_by_change():
    first = proration_lines(upgrade_invoice(START + 5 * DAY), full_amount_of=PRICES.get)
    second = proration_lines(upgrade_invoice(START + 9 * DAY), full_amount_of=PRICES.get)
    assert changes(second + first) == [first, second]


@given(elapsed=st.integers(min_value=0, max_value=30 * DAY), old=st.sampled_from([100, 500, 2000]),
       new=st.sampled_from([100, 500, 2000]))
def test_an_upgrade_and_its_immediate_reversal_cancel_out(elapsed, old, new):
    fraction = fraction_at(changed_at=START + elapsed, period_start=START, period_end=END)
    there = change_credits(old_allowance=old, new_allowance=new, fraction=fraction, unspent=10**6)
    back = change_credits(old_allowance=new, new_allowance=old, fraction=fraction, unspent=10**6)
    assert there + back == 0
    assert abs(there) <= abs(new - old)
