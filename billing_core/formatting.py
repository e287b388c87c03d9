"""Money from integer minor units and times in the operator's timezone, as the dashboard shows them."""
from __future__ import annotations

import re
from datetime import datetime, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel.numbers import format_currency, get_currency_precision

MONEY_LOCALE = "en_US"


def minor_unit_digits(currency: str) -> int:
    """How many digits a currency's minor unit has (USD 2, JPY 0, KWD 3), from CLDR through babel."""
    return get_currency_precision((currency or "usd").upper())


def money(cents: int | None, currency: str = "usd") -> str:
    """An amount in minor units in its currency's own format: `$1,234.50` from 123450 USD cents, `¥500`
    from 500 JPY, `-$12.00` for negative amounts."""
    if cents is None:
        return "—"
    code = (currency or "usd").upper()
    amount = Decimal(int(cents)).scaleb(-minor_unit_digits(code))
    return format_currency(amount, code, locale=MONEY_LOCALE)


def money_by_currency(amounts: dict[str, int] | None, *, empty: str = "—") -> str:
    """Amounts in several currencies side by side, never added: `$12.00 · €3.50` (largest first)."""
    shown = sorted(((c, v) for c, v in (amounts or {}).items() if v), key=lambda item: (-abs(item[1]), item[0]))
    return " · ".join(money(value, currency) for currency, value in shown) or empty


def zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def local_time(value: datetime | int | str | None, tz_name: str | None) -> datetime | None:
    """A stored time (datetime, epoch seconds or ISO text) in the operator's timezone."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, (int, float)):
        value = datetime.fromtimestamp(value, timezone.utc)
    return as_utc(value).astimezone(zone(tz_name))


def when(value: datetime | int | str | None, tz_name: str | None, *, seconds: bool = False) -> str:
    """`2026-11-27 09:15 CET` in the operator's timezone; `—` for nothing."""
    local = local_time(value, tz_name)
    if local is None:
        return "—"
    return local.strftime("%Y-%m-%d %H:%M:%S %Z" if seconds else "%Y-%m-%d %H:%M %Z")


def age(value: datetime | None, *, now: datetime) -> str:
    """How long ago, in words: `3 min ago`, `5 h ago`, `2 days ago`."""
    if value is None:
        return "never"
    seconds = int((now - as_utc(value)).total_seconds())
    if seconds < 0:
        return "just now"
    if seconds < 90:
        return f"{seconds} s ago"
    if seconds < 90 * 60:
        return f"{seconds // 60} min ago"
    if seconds < 48 * 3600:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} days ago"


def credits(value: int | None) -> str:
    return "—" if value is None else f"{int(value):,}"


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:&=^\"'%@/])")


def escape_markdown(text) -> str:
    """Untrusted text (a user id, an email, a reason) made inert inside Streamlit Markdown: every ASCII
    punctuation character backslash-escaped (CommonMark allows that for all of them), so no image, link,
    emphasis, HTML, `:color[...]` directive or `$` formula can form; line breaks become spaces."""
    text = "" if text is None else str(text)
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(text.splitlines()))
