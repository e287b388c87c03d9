"""Operator dashboard home: `streamlit run Home.py`. Every page runs the sign-in gate first."""
import streamlit as st

from billing_core import reports
from billing_core.catalog import PLANS
from billing_core.formatting import age
from dashboard_ui import data
from dashboard_ui.common import money, start_page, when

identity, settings = start_page("Billing console")
url = settings.database_url

with data.read(url) as session:
    overview = reports.overview(session, settings=settings)
outstanding, measured_at = data.credits_outstanding(url)
subs, revenue, events = overview.subscriptions, overview.revenue_30d, overview.events

row = st.columns(4)
row[0].metric("MRR", money(subs.mrr_cents), help="Active and past-due subscriptions × their plan's monthly price")
row[1].metric("Revenue, last 30 days", money(revenue.net_cents),
              help=f"{revenue.payments:,} payments: {money(revenue.gross_cents)} collected, "
                   f"{money(revenue.refunded_cents + revenue.disputed_lost_cents)} refunded or lost in disputes")
row[2].metric("Credits outstanding", f"{outstanding:,}",
              help=f"Worth {money(reports.credits_worth_cents(outstanding))} at $0.06 per credit (the 1000-credit "
                   "pack's price; up to $0.10 at the 100-credit pack's). Recomputed every five minutes.")
row[3].metric("Outstanding credits worth", money(reports.credits_worth_cents(outstanding)),
              help="At $0.06 per credit, the lowest price a customer pays for pack credits")

row = st.columns(4)
row[0].metric("Accounts", f"{overview.accounts:,}")
row[1].metric("Flagged accounts", f"{overview.flagged_accounts:,}",
              help="Open dispute or negative balance: spending is paused")
row[2].metric("Events needing attention", f"{events['needs_attention']:,}")
row[3].metric("Failed events", f"{events['failed']:,}")

st.subheader("Active subscribers by tier")
tiers = st.columns(len(PLANS) + 1)
for column, plan in zip(tiers, PLANS):
    column.metric(plan.name, f"{subs.active_by_tier[plan.key]:,}", help=f"{money(plan.amount_cents)} a month")
tiers[-1].metric("Past due / unpaid", f"{subs.past_due:,}")

st.subheader("Webhook health")
health = overview.webhook
if health.last_received_at is None:
    st.write("No webhook event has arrived yet.")
else:
    st.write(f"Last event from Stripe: **{when(health.last_received_at, settings)}** "
             f"({age(health.last_received_at, now=overview.now)}).")
if health.warning:
    st.warning(health.warning, icon=":material/warning:")
elif not settings.stripe_configured:
    st.caption("Stripe is not configured, so no events are expected.")

st.caption(f"Times in {settings.operator_timezone}. Credits outstanding as of {when(measured_at, settings)}.")
