"""Operator dashboard home: `streamlit run Home.py`. Every page runs the sign-in gate first."""
import streamlit as st

from billing_core import reports
from billing_core.catalog import PLANS
from billing_core.formatting import age, money_by_currency
from dashboard_ui import data
from dashboard_ui.common import money, money_metric, start_page, when

identity, settings = start_page("Billing console")
url = settings.database_url

with data.read(url) as session:
    overview = reports.overview(session, settings=settings)
outstanding, measured_at = data.credits_outstanding(url)
subs, events = overview.subscriptions, overview.events
cash = {t.currency: t.net_cents for t in overview.revenue_30d}

# Three figures a row: at 1,280 px a fourth column cuts amounts like $1,272,020.09 short.
row = st.columns(3)
money_metric(row[0], "MRR", subs.mrr,
             help="Monthly amount of the active subscriptions as billed for their current period (discounts "
                  "and upgrades applied); past-due subscriptions are counted apart")
money_metric(row[1], "Past-due MRR", subs.past_due_mrr,
             help=f"{subs.past_due:,} past-due or unpaid subscriptions: their monthly amount, not in MRR")
money_metric(row[2], "Cash, 30 days", cash,
             help="Collected by payments in the last 30 days, net of refunds and lost disputes: "
                  + "; ".join(f"{t.payments:,} payments, {money(t.gross_cents, t.currency)} collected, "
                              f"{money(t.refunded_cents + t.disputed_lost_cents, t.currency)} refunded or lost"
                              for t in overview.revenue_30d))

row = st.columns(3)
row[0].metric("Credits outstanding", f"{outstanding:,}",
              help="The sum of every balance. Recomputed every five minutes.")
row[1].metric("Credits worth", money(reports.credits_worth_cents(outstanding)),
              help="At $0.06 per credit (the 1000-credit pack's price; up to $0.10 at the 100-credit pack's)")
row[2].metric("Accounts", f"{overview.accounts:,}")

row = st.columns(3)
row[0].metric("Flagged accounts", f"{overview.flagged_accounts:,}",
              help="Open dispute or negative balance: spending is paused")
row[1].metric("Events to look at", f"{events['needs_attention']:,}", help="Webhook events needing attention")
row[2].metric("Failed events", f"{events['failed']:,}")

st.subheader("Active subscribers by tier")
tiers = st.columns(len(PLANS) + 1)
for column, plan in zip(tiers, PLANS):
    column.metric(plan.name, f"{subs.active_by_tier[plan.key]:,}", help=f"{money(plan.amount_cents)} a month")
tiers[-1].metric("Past due", f"{subs.past_due:,}", help="Past due or unpaid")

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

st.caption(f"Times in {settings.operator_timezone}. Credits outstanding as of {when(measured_at, settings)}. "
           f"MRR now: {money_by_currency(subs.mrr, empty=money(0))}; money is never added across currencies.")
