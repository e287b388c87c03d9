"""Controls shared by pages: the refund panel (Payments, Customers) and the dry-run preview of an event
(Webhook events). Thin: every decision is billing_core's (refunds, previews)."""
from __future__ import annotations

import logging
import uuid
from decimal import Decimal, InvalidOperation

import streamlit as st

from billing_core import db, refunds
from billing_core.formatting import escape_markdown as md, minor_unit_digits
from billing_core.operators import Identity
from billing_core.previews import Preview, describe
from billing_core.settings import Settings
from billing_core.stripe_client import StripeProblem

from . import data
from .common import money, table, when

log = logging.getLogger("billing_core.dashboard")


# --- event previews -------------------------------------------------------------------------------

def show_preview(preview: Preview) -> None:
    """The diff an event would make, as the operator reads it; nothing was committed."""
    status = f"{md(preview.status_before or 'new')} → **{md(preview.status_after)}**"
    st.markdown(f"**Dry run of {md(preview.event_id)}** ({md(preview.event_type)}): status {status}. "
                "Nothing was changed.")
    if preview.reason_after:
        st.warning(f"It would still need attention: {md(preview.reason_after)}")
    if not preview.changes_anything:
        st.caption("Replaying it would change nothing.")
    if preview.accounts:
        table([{"Account": a.user_id, "Balance before": a.balance_before, "Balance after": a.balance_after,
                "Tier": a.tier_before if a.tier_before == a.tier_after else f"{a.tier_before} → {a.tier_after}",
                "Flagged after": "yes" if a.flagged_after else "no"} for a in preview.accounts],
              key=f"preview_accounts_{preview.event_id}")
    entries = [{"Account": a.user_id, "Credits": f"{e['credits']:+,}", "Kind": e["kind"], "Reason": e["reason"] or ""}
               for a in preview.accounts for e in a.entries]
    if entries:
        st.markdown("Ledger entries it would add")
        table(entries, key=f"preview_entries_{preview.event_id}")
    if preview.changes:
        st.markdown("Fields it would change")
        table([{"Table": c.table, "Row": c.row_id, "Field": c.field,
                "Before": "—" if c.before is None else str(c.before), "After": str(c.after)}
               for c in preview.changes], key=f"preview_changes_{preview.event_id}")
    with st.expander("As text"):
        st.code("\n".join(describe(preview)), language=None)


# --- refunds --------------------------------------------------------------------------------------

def parse_money(text: str, currency: str) -> int:
    """An amount typed in the currency's major units ('12.50') as minor units (1250)."""
    try:
        value = Decimal(str(text).strip().replace(",", ""))
    except InvalidOperation:
        raise refunds.RefundRefused(f"the amount must be a number like 12.50, not {text!r}") from None
    digits = minor_unit_digits(currency)
    minor = value * 10 ** digits
    if minor != minor.to_integral_value() or minor <= 0:
        raise refunds.RefundRefused(f"the amount must be a positive amount in {currency.upper()} with at most "
                                    f"{digits} decimals, not {text!r}")
    return int(minor)


def _label(row: dict, settings: Settings) -> str:
    return (f"{row['ref']} · {row['user_id'] or 'no user'} · {money(row['amount_cents'], row['currency'])} "
            f"({money(row['left_cents'], row['currency'])} left) · {when(row['created_at'], settings)}")


def refund_panel(*, identity: Identity, settings: Settings, payments: list[dict], key: str) -> None:
    """Choose a payment and the whole amount or a part, see the clawback preview, confirm.
    `payments` come from refunds.refundable_payments."""
    st.markdown("#### Refund")
    if not refunds.may_refund(identity, settings):
        st.caption("Only an admin may refund (support operators may when SUPPORT_CAN_REFUND=true).")
        return
    if not payments:
        st.caption("No payment here has anything left to refund.")
        return
    by_ref = {row["ref"]: row for row in payments}
    ref = st.selectbox("Payment", list(by_ref), format_func=lambda r: _label(by_ref[r], settings),
                       key=f"{key}_pick")
    row = by_ref[ref]
    whole = st.radio("Amount", ("whole", "part"), horizontal=True, key=f"{key}_whole",
                     format_func=lambda w: (f"Everything left ({money(row['left_cents'], row['currency'])})"
                                            if w == "whole" else "Part of it"))
    typed = "" if whole == "whole" else st.text_input(f"Amount to refund ({row['currency'].upper()})",
                                                      key=f"{key}_amount", placeholder="12.50")
    reason = st.text_input("Reason (kept in the refund's metadata in Stripe)", key=f"{key}_reason",
                           placeholder="customer asked, ticket #123")
    request = (ref, whole, typed.strip(), reason.strip())
    if st.button("Preview refund", key=f"{key}_preview"):
        try:
            amount = None if whole == "whole" else parse_money(typed, row["currency"])
            st.session_state[f"{key}_outcome"] = (request, refunds.preview_refund(
                payment_ref=ref, amount=amount, engine=db.get_engine(settings.database_url), settings=settings))
        except refunds.RefundRefused as exc:
            st.error(md(str(exc)))
    shown = st.session_state.get(f"{key}_outcome")
    if shown and shown[0] == request:
        _confirm(shown[1], identity=identity, settings=settings, reason=reason, key=key)
    if st.session_state.get(f"{key}_done"):
        st.success(md(st.session_state.pop(f"{key}_done")))


def _confirm(outcome: refunds.RefundOutcome, *, identity: Identity, settings: Settings, reason: str,
             key: str) -> None:
    data_ = outcome.as_dict()
    cols = st.columns(4)
    cols[0].metric("Refund", money(outcome.amount, outcome.currency))
    cols[1].metric("Credits taken back", f"{data_['credits_taken_back']:,}")
    cols[2].metric("Balance before", f"{data_['balance_before']:,}")
    cols[3].metric("Balance after", f"{data_['balance_after']:,}")
    if data_["balance_after"] < 0 or data_["flagged_after"]:
        st.warning(f"{md(outcome.user_id)} would go to {data_['balance_after']:,} credits and be flagged: spending "
                   "pauses until the balance is back above zero.")
    st.caption("Credits are taken back when Stripe reports the refund (charge.refunded), by the ledger's rules: "
               "in proportion to the amount refunded, from the credits this payment granted.")
    confirmed = st.checkbox("I confirm this refund", key=f"{key}_confirm")
    if st.button("Refund in Stripe", type="primary", key=f"{key}_go", disabled=not confirmed):
        token = st.session_state.setdefault(f"{key}_token", uuid.uuid4().hex)
        try:
            refunds.check_refund_allowed(identity, settings)
            done = refunds.create_refund(payment_ref=outcome.payment, amount=outcome.amount, reason=reason,
                                         operator=identity.name, request=token, settings=settings,
                                         engine=db.get_engine(settings.database_url))
        except (refunds.RefundRefused, StripeProblem, ValueError) as exc:
            st.error(md(str(exc)))
            return
        log.info("operator %s refunded %s %s of %s: %s", identity.name, done.amount, done.currency, done.payment,
                 done.refund)
        for name in ("outcome", "token", "amount", "reason", "confirm", "whole"):
            st.session_state.pop(f"{key}_{name}", None)
        data.clear_cached_aggregates()
        st.session_state[f"{key}_done"] = (
            f"Refund {done.refund} of {money(done.amount, done.currency)} was already made for this request; nothing "
            "more was refunded." if done.made_earlier else
            f"Refund {done.refund} of {money(done.amount, done.currency)} created in Stripe; pending until Stripe "
            f"reports it, then {done.credits_taken_back:,} credits are taken back.")
        st.rerun()


def refund_requests_table(rows: list[dict], settings: Settings, *, key: str) -> None:
    if not rows:
        return
    st.markdown("Refunds made from the console")
    table([{"When": when(r["created_at"], settings), "Refund": r["refund"], "User": r["user_id"] or "",
            "Amount": money(r["amount_cents"], r["currency"]), "Status": r["status"], "Operator": r["operator"],
            "Reason": r["reason"]} for r in rows], key=key)
