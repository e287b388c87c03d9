"""Money from integer minor units and times in the operator's timezone, as the dashboard shows them."""
from __future__ import annotations

import re
from datetime import datetime, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

CURRENCY_SYMBOLS = {"usd": "$", "eur": "€", "gbp": "£"}
ZERO_DECIMAL = {"jpy", "krw", "vnd", "clp", "isk", "ugx", "xaf", "xof"}


def money(cents: int | None, currency: str = "usd") -> str:
    """`$1,234.50` from 123450 cents; negative amounts as `-$12.00`."""
    if cents is None:
        return "—"
    currency = (currency or "usd").lower()
    sign = "-" if cents < 0 else ""
    cents = abs(int(cents))
    symbol = CURRENCY_SYMBOLS.get(currency)
    amount = f"{cents:,}" if currency in ZERO_DECIMAL else f"{cents // 100:,}.{cents % 100:02d}"
    return f"{sign}{symbol}{amount}" if symbol else f"{sign}{amount} {currency.upper()}"


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
