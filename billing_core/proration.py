"""Credits follow money on a plan change: how much of the period was left, and what that is worth in credits.

Pure arithmetic over what Stripe reports; no database, no Stripe calls.

Stripe prorates a mid-period plan change with two invoice lines for the rest of the period: a credit for
the unused time on the old price (negative amount) and a charge for the remaining time on the new price
(positive amount). Each line's `period` runs from the change to the period's end, and its amount is the
full price times the fraction of the period left, rounded to a cent. So the fraction left is
`amount / full price` of a line, taken from the line with the larger full price (the smaller rounding
error); when the period's start is known, `(period.end - period.start) / (period length)` is used instead
because it carries no rounding at all.

A subscription event has no proration lines: the fraction is taken from the change time (the event's
`created`) against the item's `current_period_start` / `current_period_end`.

    top-up    = round((new allowance - old allowance) x fraction left)            (an upgrade)
    take-back = round((old allowance - new allowance) x fraction left),
                never more than the period's subscription credits still unspent  (a mid-period downgrade)

Rounding is to the nearest credit, halves up.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Iterable


class ProrationError(ValueError):
    """Stripe's proration can't be read; the message names what is missing or malformed."""


@dataclass(frozen=True)
class ProrationLine:
    """One proration line of an invoice, reduced to what the arithmetic needs."""
    price_id: str | None
    amount: int  # minor units; negative for the credit for unused time
    period_start: int
    period_end: int
    full_amount: int | None = None  # the price's amount for a whole period x quantity, when known

    @property
    def is_credit(self) -> bool:
        return self.amount < 0


def round_half_up(value: Fraction) -> int:
    """The nearest whole number, halves away from zero (credits are never split)."""
    sign = -1 if value < 0 else 1
    magnitude = abs(value)
    return sign * ((2 * magnitude.numerator + magnitude.denominator) // (2 * magnitude.denominator))


def clamp_fraction(value: Fraction) -> Fraction:
    return min(Fraction(1), max(Fraction(0), value))


def fraction_at(*, changed_at: int, period_start: int, period_end: int) -> Fraction:
    """The part of [period_start, period_end) still ahead at `changed_at` (0 to 1)."""
    if period_end <= period_start:
        raise ProrationError(f"the period {period_start}..{period_end} is empty or reversed")
    return clamp_fraction(Fraction(period_end - changed_at, period_end - period_start))


def fraction_from_lines(lines: Iterable[ProrationLine], *, period_start: int | None = None) -> Fraction:
    """The fraction of the period left at the change, from an invoice's proration lines.

    With the period's start known, from the lines' own period (exact). Otherwise from the line whose full
    price is largest: |amount| / full price (Stripe rounded the amount to a cent)."""
    lines = list(lines)
    if not lines:
        raise ProrationError("the invoice has no proration lines")
    if period_start is not None:
        line = max(lines, key=lambda found: found.period_end - found.period_start)
        if line.period_end > period_start:
            return fraction_at(changed_at=line.period_start, period_start=period_start, period_end=line.period_end)
    priced = [line for line in lines if line.full_amount and line.full_amount > 0]
    if not priced:
        raise ProrationError("no proration line names a price with a known amount, and the period's start "
                             "is unknown")
    line = max(priced, key=lambda found: found.full_amount)
    return clamp_fraction(Fraction(abs(line.amount), line.full_amount))


def topup(*, old_allowance: int, new_allowance: int, fraction: Fraction) -> int:
    """Credits an upgrade adds for the rest of the period (0 for a move down or sideways)."""
    if new_allowance <= old_allowance:
        return 0
    return round_half_up((new_allowance - old_allowance) * clamp_fraction(fraction))


def takeback(*, old_allowance: int, new_allowance: int, fraction: Fraction, unspent: int) -> int:
    """Credits a mid-period downgrade takes back: never more than the period's subscription credits still
    unspent (pack and adjustment credits are not the caller's to count here)."""
    if new_allowance >= old_allowance:
        return 0
    wanted = round_half_up((old_allowance - new_allowance) * clamp_fraction(fraction))
    return max(0, min(wanted, unspent))


def change_credits(*, old_allowance: int, new_allowance: int, fraction: Fraction, unspent: int) -> int:
    """The signed effect of one change on the period's subscription credits: + top-up or - take-back."""
    if new_allowance > old_allowance:
        return topup(old_allowance=old_allowance, new_allowance=new_allowance, fraction=fraction)
    return -takeback(old_allowance=old_allowance, new_allowance=new_allowance, fraction=fraction, unspent=unspent)


# --- reading Stripe's proration lines (current and pre-2025-03 layouts) -------------------------

def _dig(obj: Any, *path: str) -> Any:
    for step in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(step)
    return obj


def is_proration(line: dict) -> bool:
    """Current layout: `parent.subscription_item_details.proration` (or `invoice_item_details`);
    older layouts: a top-level `proration: true`."""
    return bool(_dig(line, "parent", "subscription_item_details", "proration")
                or _dig(line, "parent", "invoice_item_details", "proration") or line.get("proration"))


def line_price_id(line: dict) -> str | None:
    price = _dig(line, "pricing", "price_details", "price") or line.get("price") or line.get("plan")
    if isinstance(price, dict):
        price = price.get("id")
    return price if isinstance(price, str) and price else None


def _whole(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProrationError(f"proration line {what} {value!r} is not a whole number")
    return value


def proration_lines(invoice: dict, *, full_amount_of: Callable[[str | None], int | None] = lambda _: None
                    ) -> list[ProrationLine]:
    """The invoice's proration lines; `full_amount_of(price_id)` gives a price's whole-period amount."""
    lines = _dig(invoice, "lines", "data")
    found = []
    for line in lines if isinstance(lines, list) else []:
        if not isinstance(line, dict) or not is_proration(line):
            continue
        price_id = line_price_id(line)
        quantity = line.get("quantity") if isinstance(line.get("quantity"), int) else 1
        full = full_amount_of(price_id)
        found.append(ProrationLine(
            price_id=price_id, amount=_whole(line.get("amount"), "amount"),
            period_start=_whole(_dig(line, "period", "start"), "period.start"),
            period_end=_whole(_dig(line, "period", "end"), "period.end"),
            full_amount=full * max(quantity, 1) if full else None))
    return found


def changes(lines: Iterable[ProrationLine]) -> list[list[ProrationLine]]:
    """Proration lines grouped by change (one change's lines share their period), earliest change first;
    an invoice sweeping up pending prorations can carry several changes."""
    grouped: dict[tuple[int, int], list[ProrationLine]] = {}
    for line in lines:
        grouped.setdefault((line.period_start, line.period_end), []).append(line)
    return [grouped[key] for key in sorted(grouped)]
