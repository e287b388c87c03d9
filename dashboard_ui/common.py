"""What every page does first (`start_page`), the mode banner, and small display helpers."""
from __future__ import annotations

import logging

import pandas as pd
import streamlit as st

from billing_core import db, formatting
from billing_core.operators import Identity
from billing_core.settings import Settings, get_settings, mask_url_password

from .auth import current_identity, require_operator, sign_out

log = logging.getLogger(__name__)

_checked_schemas: set[str] = set()


def start_page(title: str, *, icon: str = ":material/payments:") -> tuple[Identity, Settings]:
    """Page config, schema check, mode banner and the sign-in gate; returns the signed-in operator."""
    st.set_page_config(page_title=f"{title} · Billing console", page_icon=icon, layout="wide")
    settings = get_settings()
    _require_current_schema(settings)
    mode_banner(settings)
    identity = require_operator(settings)
    with st.sidebar:
        st.caption(f"Signed in as **{formatting.escape_markdown(identity.name)}** ({identity.role})")
        st.button("Sign out", on_click=sign_out, key="sidebar_sign_out")
    st.title(title)
    return identity, settings


def _require_current_schema(settings: Settings) -> None:
    url = settings.database_url
    if url in _checked_schemas:
        return
    try:
        db.ensure_schema_current(url)
    except db.SchemaOutOfDate as exc:
        st.error(f"The dashboard can't start: {exc}.")
        st.code("python -m billing_core init-db", language="bash")
        st.stop()
    except Exception as exc:  # unreachable database: details (without the password) to the log and operators only
        masked = mask_url_password(url)
        log.error("can't reach the database %s: %s: %s", masked, type(exc).__name__,
                  str(exc).replace(url, masked))
        if current_identity() is None:
            st.error("The dashboard can't reach its database; see the server log.")
        else:
            st.error(f"The dashboard can't reach the database {masked}: {type(exc).__name__}.")
        st.stop()
    _checked_schemas.add(url)


def mode_banner(settings: Settings) -> None:
    mode = settings.stripe_mode
    if settings.demo_mode:
        st.info("**DEMO MODE** · sample data in data/demo.db · Stripe is not configured, no real money moves",
                icon=":material/science:")
    elif mode == "test":
        st.warning("**TEST MODE** · Stripe test keys · no real money moves", icon=":material/build:")
    elif mode == "live":
        st.error("**LIVE MODE** · real customers and real money", icon=":material/error:")
    elif mode == "invalid":
        st.error("**STRIPE KEY NOT RECOGNISED** · STRIPE_SECRET_KEY must start with sk_test_, sk_live_, rk_test_ or "
                 "rk_live_ · see Settings", icon=":material/error:")
    else:
        st.warning("**NO STRIPE KEY** · Stripe actions are off", icon=":material/warning:")


def money(cents: int | None, currency: str = "usd") -> str:
    return formatting.money(cents, currency)


def money_metric(column, label: str, amounts: dict[str, int], *, help: str | None = None) -> None:
    """A money figure that is never added across currencies: the largest currency's amount as the metric
    (its code in the label when there are several) and the others in a caption under it."""
    shown = sorted(((c, v) for c, v in amounts.items() if v), key=lambda item: (-abs(item[1]), item[0]))
    if not shown:
        column.metric(label, money(0), help=help)
        return
    (currency, value), others = shown[0], shown[1:]
    column.metric(f"{label} ({currency.upper()})" if others else label, money(value, currency), help=help)
    if others:
        column.caption("and " + formatting.money_by_currency(dict(others)))


def when(value, settings: Settings, *, seconds: bool = False) -> str:
    return formatting.when(value, settings.operator_timezone, seconds=seconds)


def table(rows: list[dict], *, columns: dict[str, str] | None = None, key: str | None = None,
          height: int | None = None) -> None:
    """A read-only table; `columns` picks and renames (source key -> label)."""
    frame = pd.DataFrame(rows)
    if columns and not frame.empty:
        frame = frame[[c for c in columns if c in frame.columns]].rename(columns=columns)
    kwargs = {"height": height} if height else {}
    st.dataframe(frame, hide_index=True, width="stretch", key=key, **kwargs)


def pager(key: str, *, total: int | None, page_size: int) -> int:
    """A page-number input; returns the offset."""
    pages = max(1, -(-total // page_size)) if total is not None else 10_000
    left, right = st.columns([1, 5], vertical_alignment="bottom")
    page = left.number_input("Page", min_value=1, max_value=pages, value=1, step=1, key=key)
    if total is not None:
        right.caption(f"of {pages:,} · {total:,} rows, {page_size} a page")
    return (int(page) - 1) * page_size
