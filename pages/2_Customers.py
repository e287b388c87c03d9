"""Customers: find an account, see why its balance is what it is, adjust it; admins approve or reject support
adjustments that went past the daily cap (maker-checker)."""
import re
import uuid

import streamlit as st

from billing_core import approvals, db, ledger, refunds, reports, second_subscription
from billing_core.catalog import PLANS
from billing_core.formatting import escape_markdown as md
from billing_core.formatting import money_by_currency
from billing_core.operators import OperatorError, adjustment_limit
from billing_core.stripe_client import StripeProblem
from dashboard_ui import data
from dashboard_ui.common import money, pager, start_page, table, when
from dashboard_ui.support_tools import refund_panel, refund_requests_table

TIMELINE_PAGE = 50
PLAN_NAMES = {plan.key: plan.name for plan in PLANS}
identity, settings = start_page("Customers")
url = settings.database_url


def request_row(r) -> dict:
    return {"Request": f"#{r.id}", "Requested": when(r.requested_at, settings), "By": r.requested_by,
            "User": r.user_id, "Credits": f"{r.credits:+,}", "Reason": r.reason}


def decide(request_id: int, approve: bool, why: str) -> None:
    try:
        with db.write_session(db.get_engine(url)) as session:
            outcome = approvals.decide(session, identity=identity, request_id=request_id, approve=approve, reason=why)
    except (OperatorError, ledger.LedgerError) as exc:
        st.error(md(str(exc)))
        return
    data.clear_cached_aggregates()
    request = outcome.request
    st.session_state["request_done"] = (f"Request #{request.id} {request.status}: {request.credits:+,} credits for "
                                        f"{request.user_id}, asked by {request.requested_by}.")
    st.rerun()


with data.read(url) as session:
    waiting = approvals.pending_requests(session, requested_by=None if identity.is_admin else identity.name)
if waiting:
    st.markdown("#### Adjustment requests waiting for an admin" if identity.is_admin else
                "#### Your adjustment requests waiting for an admin")
    table([request_row(r) for r in waiting], key="pending_requests")
    if identity.is_admin:
        choices = {r.id: r for r in waiting}
        with st.form("decide_request", clear_on_submit=True):
            request_id = st.selectbox("Request", list(choices), key="decide_pick",
                                      format_func=lambda i: f"#{i} · {choices[i].credits:+,} credits · "
                                                            f"{choices[i].user_id} · by {choices[i].requested_by}")
            why = st.text_input("Why (recorded with the decision)", key="decide_reason")
            left, right = st.columns(2)
            approve = left.form_submit_button("Approve and apply", type="primary")
            reject = right.form_submit_button("Reject")
        if approve or reject:
            decide(request_id, approve, why)
if st.session_state.get("request_done"):
    st.success(md(st.session_state.pop("request_done")))

query = st.text_input("Search by user id, email or Stripe customer id", value=st.query_params.get("user", ""),
                      key="customer_query", placeholder="user_123, someone@example.com or cus_…")
if not query.strip():
    st.caption("Type a user id, an email or a Stripe customer id (cus_…); prefixes work too.")
    st.stop()

with data.read(url) as session:
    matches = reports.search_accounts(session, query)
if not matches:
    st.warning(f"No account matches {md(repr(query.strip()))}.")
    st.stop()
labels = {m["user_id"]: f"{m['user_id']} · {m['email'] or 'no email'}" + (" · FLAGGED" if m["flagged"] else "")
          for m in matches}
user_id = st.selectbox(f"{len(matches)} matching account(s)", list(labels), format_func=labels.get,
                       key="customer_pick")

with data.read(url) as session:
    overview = reports.account_overview(session, user_id=user_id)
    total_events = reports.timeline_length(session, user_id=user_id)

st.subheader(md(user_id))  # untrusted: `![](https://…)` as a user id must stay text
if overview["flagged"]:
    st.error(f"Flagged: {md(overview['flag_reason'])}. Spending is paused until this is resolved.",
             icon=":material/flag:")
# Three short figures: at 1,280 px five columns cut values like "1,542 credits" and "Professional" short.
cols = st.columns(3)
cols[0].metric("Balance (credits)", f"{overview['balance']:,}")
cols[1].metric("Spendable now", f"{overview['spendable_balance']:,}", help="Credits the agent can spend now")
cols[2].metric("Tier", PLAN_NAMES.get(overview["tier"], overview["tier"] or "none"))
period_end = when(overview["current_period_end"], settings) if overview["current_period_end"] else "—"
cancel = " · cancels at period end" if overview["cancel_at_period_end"] else ""
st.caption(f"Subscription {md(overview['subscription_status'] or 'none')} · period ends {period_end}{cancel}")
st.caption(f"Email {md(overview['email'] or '—')} · Stripe customer {md(overview['stripe_customer_id'] or '—')} · "
           f"{overview['payments']} payments, {money_by_currency(overview['net_paid'], empty=money(0))} net")
st.download_button("Download full ledger (CSV)", key="ledger_csv", mime="text/csv", on_click="ignore",
                   data=lambda: data.customer_ledger_csv(url, user_id, settings.operator_timezone),
                   file_name=f"ledger-{re.sub(r'[^A-Za-z0-9_.-]', '_', user_id)}.csv",
                   help="Every ledger entry of this account, oldest first, times in your timezone")

with data.read(url) as session:
    second_candidate = second_subscription.has_second_candidate(session, user_id=user_id)
if second_candidate:
    st.markdown("#### Second subscription")
    st.warning("More than one subscription is known for this user. One plan per user: a second live "
               "subscription grants nothing, and its events wait under Webhook events (needs attention).")
    if not identity.is_admin:
        st.caption("Ask an admin to cancel and refund the newer subscription.")
    else:
        with st.form("cancel_second"):
            confirm_second = st.checkbox("I confirm: cancel the newer live subscription in Stripe now and refund "
                                         "its latest payment in full", key="cancel_second_confirm")
            cancel_second = st.form_submit_button("Cancel and refund the newer subscription")
        if cancel_second and not confirm_second:
            st.error("Tick the confirmation box to cancel and refund the newer subscription.")
        elif cancel_second:
            try:
                outcome = second_subscription.cancel_and_refund_newer(
                    user_id=user_id, operator=identity.name, settings=settings, engine=db.get_engine(url))
            except (second_subscription.SecondSubscriptionError, StripeProblem) as exc:
                st.error(md(str(exc)))
            else:
                st.success(outcome.message())  # Stripe ids and an amount only

st.markdown("#### Balance by source and expiry")
if overview["breakdown"]:
    table([{**row, "expires_at": when(row["expires_at"], settings) if row["expires_at"] else "never",
            "frozen": "frozen (past due)" if row["frozen"] else ""} for row in overview["breakdown"]],
          columns={"source": "Source", "credits": "Credits", "granted": "Granted", "expires_at": "Expires",
                   "frozen": "", "subscription_id": "Subscription"}, key="breakdown")
else:
    st.write("No credits held.")

st.markdown("#### Timeline")
offset = pager("timeline_page", total=total_events, page_size=TIMELINE_PAGE)
with data.read(url) as session:
    rows = reports.customer_timeline(session, user_id=user_id, limit=TIMELINE_PAGE, offset=offset)


def describe(row: dict) -> str:
    category, kind = row["category"], row["kind"]
    if category == "payment":
        return f"payment {kind}: {row['detail']}"
    if category == "refund":
        return f"refunded or lost in dispute: {row['detail']}"
    if category == "link":
        return f"checkout link for {row['detail']} ({kind})"
    if category == "dispute":
        return f"dispute {row['detail']} ({kind})"
    return kind.replace("_", " ")


table([{"When": when(r["at"], settings), "What": describe(r),
        "Credits": f"{r['credits']:+,}" if r["credits"] is not None else "",
        "Amount": money(r["amount_cents"], r["currency"] or "usd") if r["amount_cents"] is not None else "",
        "Detail": (r["detail"] if r["category"] == "ledger" else r["ref"]) or "",
        "Expires": when(r["expires_at"], settings) if r["expires_at"] else "",
        "Operator": r["operator"] or ""} for r in rows], key="timeline")

with data.read(url) as session:
    refundable = refunds.refundable_payments(session, user_id=user_id)
    refund_rows = refunds.refund_requests(session, user_id=user_id)
refund_panel(identity=identity, settings=settings, payments=refundable, key="cust_refund")
refund_requests_table(refund_rows, settings, key="cust_refunds_table")

st.markdown("#### Manual adjustment")
limit = adjustment_limit(identity.role, settings)
st.caption("Whole credits: positive adds credits that never expire, negative takes credits away. "
           + (f"As support you may adjust at most {limit:,} credits at a time and "
              f"{settings.support_daily_adjustment_cap:,} within 24 hours; beyond that the adjustment waits for "
              "an admin's approval." if limit is not None else ""))
ADJUST_FIELDS = ("adjust_credits", "adjust_reason", "adjust_negative", "adjust_confirm")
# One idempotency key per filled-in form: a second submit of the same adjustment (a double click, a rerun
# interrupted after the write) is recognised by the ledger and not applied twice.
ADJUST_KEY_STATE = f"adjust_source_key:{user_id}"
adjust_key = st.session_state.setdefault(ADJUST_KEY_STATE, f"adjust:ui:{uuid.uuid4().hex}")
with st.form("adjustment", clear_on_submit=True):
    credits = st.number_input("Credits", value=0, step=1, format="%d", key="adjust_credits")
    reason = st.text_input("Reason", key="adjust_reason", placeholder="goodwill after an outage, ticket #123")
    allow_negative = st.checkbox("Allow the balance to go below zero", key="adjust_negative",
                                 disabled=not identity.is_admin)
    confirmed = st.checkbox("I confirm this adjustment", key="adjust_confirm")
    submitted = st.form_submit_button("Apply adjustment", type="primary")
if submitted:
    if not confirmed:
        st.error("Tick the confirmation box to apply the adjustment.")
    else:
        try:
            with db.write_session(db.get_engine(url)) as session:
                outcome = approvals.adjust_or_request(
                    session, identity=identity, user_id=user_id, credits=int(credits), reason=reason,
                    settings=settings, allow_negative=allow_negative, source_key=adjust_key)
                new_balance = ledger.balance(session, user_id)
        except (OperatorError, ledger.LedgerError) as exc:
            st.error(md(str(exc)))
        else:
            data.clear_cached_aggregates()
            if outcome.request is not None:
                done = (f"Over your 24-hour cap of {settings.support_daily_adjustment_cap:,} credits: request "
                        f"#{outcome.request.id} ({int(credits):+,} credits for {user_id}) waits for an admin's "
                        "approval.")
            elif outcome.entries:
                done = (f"Adjusted {user_id} by {int(credits):+,} credits as {identity.name}; the balance is now "
                        f"{new_balance:,}.")
            else:
                done = f"This adjustment was already applied; the balance is {new_balance:,}."
            st.session_state["adjust_done"] = done
            for key in (*ADJUST_FIELDS, ADJUST_KEY_STATE):  # an empty form and a fresh key for the next one
                st.session_state.pop(key, None)
            st.rerun()
if st.session_state.get("adjust_done"):
    st.success(md(st.session_state.pop("adjust_done")))
