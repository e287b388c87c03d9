"""Where each field lives in Stripe's payloads, and the checks every stored value passes.

Pure functions over the event's JSON: no database, no settings, no Stripe calls.

Two layouts reach us. Accounts on API 2025-03 or later send today's; accounts on an older default version
send the earlier one (`stripe listen` forwards the account's default version), so every reader tries
today's place first, then the older one:

| what | today (2025-03+) | before 2025-03 |
|---|---|---|
| invoice's subscription | `parent.subscription_details.subscription` | `subscription` |
| invoice's subscription metadata | `parent.subscription_details.metadata` | `subscription_details.metadata` |
| invoice line's price | `pricing.price_details.price` | `price` (or `plan`) |
| invoice line's subscription | `parent.subscription_item_details.subscription` | `subscription` |
| invoice line is a proration | `parent.subscription_item_details.proration` | `proration` |
| invoice's payment | `payments.data[].payment` (only when expanded) | `payment_intent`, `charge` |
| subscription's period end | `items.data[0].current_period_end` | `current_period_end` |
| subscription's price | `items.data[0].price` | `items.data[0].price` or `plan` |

A value that will be stored is checked (`as_amount`, `as_epoch`, `as_text`, `as_currency`, `id_of`); a bad
one raises NeedsAttention naming the field, so the event waits for a person instead of failing forever.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from .models import from_epoch, utcnow

# Bounds that every stored value fits on SQLite and PostgreSQL alike (varchar lengths, BIGINT, datetime).
MAX_ID_CHARS = 100
MAX_AMOUNT = 10**12  # minor units: far above any real payment, far below BIGINT
MAX_EPOCH = 253402300799  # 9999-12-31T23:59:59Z, the last second a datetime holds
MAX_USER_ID_CHARS = 200
MAX_EMAIL_CHARS = 320


class NeedsAttention(Exception):
    """The event can't be applied without a person (unknown user, unknown price, unknown payment)."""

    def __init__(self, reason: str, *, user_id: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.user_id = user_id  # recorded on the event when known, so the Customers page finds it


# --- checked readers -------------------------------------------------------------------------

def dig(obj: Any, *path: str | int) -> Any:
    """obj[a][b][c], or None when any step is missing or of the wrong kind."""
    for step in path:
        if isinstance(step, int):
            if not isinstance(obj, list) or not -len(obj) <= step < len(obj):
                return None
        elif not isinstance(obj, dict):
            return None
        obj = obj[step] if isinstance(step, int) else obj.get(step)
    return obj


def printable(value: Any, limit: int = 1000) -> str:
    """Text safe for an error column or a log line: non-printable characters (NUL, lone surrogates,
    escapes) replaced, so a customer-controlled value can't break the database or forge log lines."""
    text = value if isinstance(value, str) else repr(value)
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def shown(value: Any) -> str:
    """A short, safe rendering of a value for a needs-attention reason."""
    text = printable(value, 40)
    return text + "..." if len(value if isinstance(value, str) else repr(value)) > 40 else text


def id_of(value: Any) -> str | None:
    """A Stripe reference: either an id string or an expanded object carrying `id`. None when absent;
    NeedsAttention when it is a string that can't be a Stripe id (too long, not printable ASCII)."""
    if isinstance(value, dict):
        value = value.get("id")
    if not isinstance(value, str) or not value:
        return None
    if len(value) > MAX_ID_CHARS or not (value.isascii() and value.isprintable()) or " " in value:
        raise NeedsAttention(f"malformed Stripe id {shown(value)}: an id is at most {MAX_ID_CHARS} printable "
                             "ASCII characters")
    return value


def lenient_id(value: Any) -> str | None:
    """id_of for code outside a handler (prefetch, related ids): a malformed id is simply no id."""
    try:
        return id_of(value)
    except NeedsAttention:
        return None


def required_id(obj: dict, prefix: str, what: str) -> str:
    value = id_of(obj)
    if not value or not value.startswith(prefix):
        raise NeedsAttention(f"{what} has no valid id (expected {prefix}...)")
    return value


def as_int(value: Any, default: int = 0) -> int:
    """A number only compared, never stored (a line's amount); anything else is `default`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        return default
    return int(value)


def as_amount(value: Any, *, what: str) -> int:
    """An amount in minor units that will be stored: 0 when absent, NeedsAttention when not 0..MAX_AMOUNT."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_AMOUNT:
        raise NeedsAttention(f"{what} {shown(value)} is not an amount in minor units (0 to {MAX_AMOUNT})")
    return value


def as_epoch(value: Any, *, what: str) -> int | None:
    """A Unix time that will be stored or turned into a datetime: None when absent or 0."""
    if value is None or (value == 0 and not isinstance(value, bool)):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_EPOCH:
        raise NeedsAttention(f"{what} {shown(value)} is not a Unix time")
    return value


def moment_of(value: Any, *, what: str) -> datetime:
    """A Stripe `created` as a datetime (now when absent)."""
    return from_epoch(as_epoch(value, what=what)) or utcnow()


def as_text(value: Any, *, what: str, max_len: int) -> str | None:
    """A string that will be stored: None when absent or empty, NeedsAttention when not printable text
    of at most `max_len` characters (the column's length on PostgreSQL)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > max_len or not value.isprintable():
        raise NeedsAttention(f"{what} {shown(value)} is not text of at most {max_len} printable characters")
    return value


def as_currency(value: Any, *, default: str) -> str:
    if value is None or value == "":
        return default
    if not isinstance(value, str) or len(value) != 3 or not value.isascii() or not value.isalpha():
        raise NeedsAttention(f"currency {shown(value)} is not a three-letter currency code")
    return value.lower()


def dicts(value: Any) -> list[dict]:
    """The objects of a list field (lines, line items); anything else in it, or a non-list, is skipped."""
    return [found for found in value if isinstance(found, dict)] if isinstance(value, list) else []


def metadata_user(obj: Any) -> str | None:
    """`metadata.user_id` of an object (checkout session, subscription, invoice, its subscription details)."""
    value = dig(obj, "metadata", "user_id")
    if not isinstance(value, str) or not value.strip():
        return None
    return as_text(value.strip(), what="metadata.user_id", max_len=MAX_USER_ID_CHARS)


def metadata_item(obj: Any) -> str | None:
    """`metadata.item`: the catalog key our checkout put on a session and its subscription."""
    value = dig(obj, "metadata", "item")
    return value if isinstance(value, str) and value else None


# --- checkout sessions -----------------------------------------------------------------------

def checkout_explicit_user(checkout_session: dict) -> str | None:
    """The user a session names itself: metadata.user_id, else client_reference_id."""
    return metadata_user(checkout_session) or as_text(checkout_session.get("client_reference_id"),
                                                      what="client_reference_id", max_len=MAX_USER_ID_CHARS)


def checkout_email(checkout_session: dict) -> str | None:
    return as_text(dig(checkout_session, "customer_details", "email") or checkout_session.get("customer_email"),
                   what="customer email", max_len=MAX_EMAIL_CHARS)


def checkout_line_prices(checkout_session: dict) -> list[str | None]:
    """The price ids of a session's line items (present only when the session was retrieved with them)."""
    return [id_of(dig(line, "price")) for line in dicts(dig(checkout_session, "line_items", "data"))]


# --- subscriptions ---------------------------------------------------------------------------

def subscription_price(sub: dict) -> Any:
    """The (first) item's price object or id; very old versions also carry a top-level `plan`."""
    return dig(sub, "items", "data", 0, "price") or dig(sub, "plan")


def subscription_period_end(sub: dict) -> int | None:
    """Today on the item; before 2025-03 on the subscription itself."""
    found = dig(sub, "items", "data", 0, "current_period_end") or sub.get("current_period_end")
    return as_epoch(found, what="current_period_end")


def subscription_period_start(sub: dict) -> int | None:
    """Today on the item; before 2025-03 on the subscription itself."""
    found = dig(sub, "items", "data", 0, "current_period_start") or sub.get("current_period_start")
    return as_epoch(found, what="current_period_start")


def previous_subscription_price(previous_attributes: dict) -> Any:
    """The price a `customer.subscription.updated` replaced, when it changed."""
    return dig(previous_attributes, "items", "data", 0, "price") or dig(previous_attributes, "plan")


def previous_period_end(previous_attributes: dict) -> int:
    """The period end an update replaced (0 when it didn't change); compared only, never stored."""
    return (as_int(dig(previous_attributes, "items", "data", 0, "current_period_end"))
            or as_int(previous_attributes.get("current_period_end")))


# --- invoices --------------------------------------------------------------------------------

def invoice_subscription_id(invoice: dict) -> str | None:
    found = (id_of(dig(invoice, "parent", "subscription_details", "subscription"))
             or id_of(invoice.get("subscription")))
    if found:
        return found
    for line in dicts(dig(invoice, "lines", "data")):
        found = line_subscription_id(line)
        if found:
            return found
    return None


def invoice_subscription_metadata(invoice: dict) -> dict:
    """The subscription's metadata as the invoice carries it (our checkout puts user_id and item there)."""
    found = dig(invoice, "parent", "subscription_details", "metadata")
    if not isinstance(found, dict):
        found = dig(invoice, "subscription_details", "metadata")
    return found if isinstance(found, dict) else {}


def invoice_user(invoice: dict) -> str | None:
    """The user an invoice names: its subscription's metadata.user_id, else its own."""
    return metadata_user({"metadata": invoice_subscription_metadata(invoice)}) or metadata_user(invoice)


def invoice_checkout_item(invoice: dict) -> str | None:
    return metadata_item({"metadata": invoice_subscription_metadata(invoice)})


def invoice_lines(invoice: dict) -> list[dict]:
    return dicts(dig(invoice, "lines", "data"))


def invoice_payment_refs(invoice: dict) -> tuple[str | None, str | None]:
    """(payment intent id, charge id) that paid the invoice, when the payload says: an older version's
    `payment_intent` / `charge`, or today's `payments` list when it was expanded. Webhooks on today's
    version carry neither; Stripe's invoice payments list links them then (see handlers.refunds)."""
    payment_intent, charge = lenient_id(invoice.get("payment_intent")), lenient_id(invoice.get("charge"))
    for record in dicts(dig(invoice, "payments", "data")):
        payment = record.get("payment") if isinstance(record.get("payment"), dict) else {}
        payment_intent = payment_intent or lenient_id(payment.get("payment_intent"))
        charge = charge or lenient_id(payment.get("charge"))
    return payment_intent, charge


def line_price_object(line: dict) -> Any:
    return dig(line, "pricing", "price_details", "price") or line.get("price") or dig(line, "plan")


def line_price(line: dict) -> str | None:
    return id_of(line_price_object(line))


def line_subscription_id(line: dict) -> str | None:
    return id_of(dig(line, "parent", "subscription_item_details", "subscription")) or id_of(line.get("subscription"))


def line_is_proration(line: dict) -> bool:
    return bool(dig(line, "parent", "subscription_item_details", "proration") or line.get("proration")
                or dig(line, "parent", "invoice_item_details", "proration"))


def line_period_end(line: dict) -> int | None:
    return as_epoch(dig(line, "period", "end"), what="invoice line period end")


def line_period_start(line: dict) -> int | None:
    return as_epoch(dig(line, "period", "start"), what="invoice line period start")


# --- charges and disputes --------------------------------------------------------------------

def charge_refs(obj: dict) -> tuple[str | None, str | None]:
    """(charge id, payment intent id) of a charge or a dispute object."""
    charge_id = lenient_id(obj) if obj.get("object") == "charge" else lenient_id(obj.get("charge"))
    return charge_id, lenient_id(obj.get("payment_intent"))


def related_ids(obj: dict) -> set[str]:
    """The Stripe ids an event's object records or links (itself, its customer, subscription, invoice,
    payment intent, charge): a waiting event mentioning one of them may be resolvable now."""
    found = {lenient_id(obj.get(name)) for name in ("id", "customer", "subscription", "payment_intent", "invoice",
                                                    "charge")}
    if obj.get("object") == "invoice":
        try:
            found.add(invoice_subscription_id(obj))
        except NeedsAttention:
            pass
        found.update(invoice_payment_refs(obj))
    return {ident for ident in found if ident and "_" in ident.strip("_")}
