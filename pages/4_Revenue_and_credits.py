"""Revenue & credits: revenue by day and month, MRR, subscribers by tier, credit flows, balances."""
from collections import defaultdict
from datetime import timedelta

import pandas as pd
import plotly.express as px
import streamlit as st

from billing_core import reports
from billing_core.catalog import PLANS
from dashboard_ui import data
from dashboard_ui.common import money, start_page

identity, settings = start_page("Revenue & credits")
url, tz_name = settings.database_url, settings.operator_timezone
now = data.this_minute()
days = st.segmented_control("Daily revenue over", (30, 90, 365), default=90, format_func=lambda d: f"{d} days",
                            key="rev_days") or 90


KIND_COLORS = {"plan": "#2563eb", "pack": "#93c5fd", "other": "#9ca3af"}
FLOW_COLORS = {"granted": "#16a34a", "spent": "#2563eb", "expired": "#f59e0b", "clawed back": "#dc2626"}


def chart(figure, key: str) -> None:
    figure.update_layout(margin=dict(l=10, r=10, t=40, b=10), legend_title_text="")
    st.plotly_chart(figure, key=key, width="stretch")


def dollars(rows: list[dict], column: str = "net_cents") -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["USD"] = frame[column] / 100
    return frame


series = data.revenue(url, days, tz_name, now)
daily, monthly, subs = series["daily"], series["monthly"], series["subscriptions"]
flows = data.credit_flows(url, (now - timedelta(days=365)).replace(minute=0), tz_name)
distribution = data.balance_distribution(url)
outstanding, _ = data.credits_outstanding(url)

left, right = st.columns(2)
with left:
    frame = dollars(daily)
    if frame.empty:
        st.info("No revenue in this period.")
    else:
        chart(px.bar(frame, x="period", y="USD", color="kind", title=f"Net revenue by day, last {days} days",
                     color_discrete_map=KIND_COLORS, category_orders={"kind": ["plan", "pack", "other"]},
                     labels={"period": "day"}), "rev_daily")
with right:
    frame = dollars(monthly)
    if frame.empty:
        st.info("No revenue in the last 12 months.")
    else:
        chart(px.bar(frame, x="period", y="USD", color="kind", title="Net revenue by month",
                     color_discrete_map=KIND_COLORS, category_orders={"kind": ["plan", "pack", "other"]},
                     labels={"period": "month"}), "rev_monthly")

left, right = st.columns(2)
with left:
    frame = dollars([r for r in monthly if r["kind"] == "plan"])
    if frame.empty:
        st.info("No subscription revenue yet.")
    else:
        chart(px.line(frame, x="period", y="USD", markers=True,
                      title=f"MRR over time (plan revenue per month; now {money(subs.mrr_cents)})",
                      labels={"period": "month"}), "mrr")
with right:
    tiers = pd.DataFrame([{"tier": plan.name, "status": status, "subscribers": subs.count(plan.key, (status,))}
                          for plan in PLANS for status in ("active", "trialing", "past_due", "unpaid")])
    tiers = tiers[tiers["subscribers"] > 0]
    if tiers.empty:
        st.info("No subscribers yet.")
    else:
        chart(px.bar(tiers, x="tier", y="subscribers", color="status", title="Subscribers by tier"), "tiers")

left, right = st.columns(2)
with left:
    frame = pd.DataFrame(flows)
    if frame.empty:
        st.info("No credit movements in the last 12 months.")
    else:
        chart(px.bar(frame, x="period", y="credits", color="flow", barmode="group", color_discrete_map=FLOW_COLORS,
                     title="Credits granted, spent, expired and clawed back per month",
                     labels={"period": "month"}), "flows")
with right:
    chart(px.bar(pd.DataFrame(distribution), x="bucket", y="accounts", title="Accounts by balance (credits)"),
          "balances")

def outstanding_by_month(flows: list[dict], outstanding_now: int) -> pd.DataFrame:
    """Credits outstanding at each month's end: the running total of granted - spent - expired - clawed back,
    anchored so the last month ends at today's figure (credits granted before the window are included)."""
    sign = {"granted": 1, "spent": -1, "expired": -1, "clawed back": -1}
    net = defaultdict(int)
    for row in flows:
        net[row["period"]] += sign[row["flow"]] * row["credits"]
    periods = sorted(net)
    after, ends = 0, {}
    for period in reversed(periods):
        ends[period] = outstanding_now - after
        after += net[period]
    return pd.DataFrame([{"period": p, "credits": ends[p], "USD": reports.credits_worth_cents(ends[p]) / 100}
                         for p in periods])


frame = outstanding_by_month(flows, outstanding)
if frame.empty:
    st.info("No credit movements in the last 12 months.")
else:
    chart(px.line(frame, x="period", y="USD", markers=True, hover_data=["credits"],
                  title="Outstanding credit liability at month end (USD at $0.06/credit)",
                  labels={"period": "month"}), "liability")
st.metric("Outstanding credit liability", f"{outstanding:,} credits",
          delta=f"worth {money(reports.credits_worth_cents(outstanding))} at $0.06/credit", delta_color="off")
st.caption(f"Months and days in {tz_name}. Revenue is recomputed every minute; credit flows, balances and "
           "the liability every five minutes (at once after an adjustment made here).")
