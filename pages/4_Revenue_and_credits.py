"""Revenue & credits: MRR (as Stripe defines it) with new and churned MRR, cash collected by day and month,
subscribers by tier, credit flows, balances and the credit liability. Money per currency, never added."""
from collections import defaultdict
from datetime import timedelta

import pandas as pd
import plotly.express as px
import streamlit as st

from billing_core import reports
from billing_core.catalog import PLANS
from billing_core.formatting import minor_unit_digits
from dashboard_ui import data
from dashboard_ui.common import money, start_page

identity, settings = start_page("Revenue & credits")
url, tz_name = settings.database_url, settings.operator_timezone
now = data.this_minute()
days = st.segmented_control("Daily cash over", (30, 90, 365), default=90, format_func=lambda d: f"{d} days",
                            key="rev_days") or 90


KIND_COLORS = {"plan": "#2563eb", "pack": "#93c5fd", "other": "#9ca3af"}
FLOW_COLORS = {"granted": "#16a34a", "spent": "#2563eb", "expired": "#f59e0b", "clawed back": "#dc2626"}
MRR_COLORS = {"active": "#2563eb", "past due": "#f59e0b", "new": "#16a34a", "churned": "#dc2626"}
CASH = "net of refunds and lost disputes"


def chart(figure, key: str) -> None:
    figure.update_layout(margin=dict(l=10, r=10, t=40, b=10), legend_title_text="")
    st.plotly_chart(figure, key=key, width="stretch")


def in_currency(rows: list[dict], currency: str, columns: tuple[str, ...]) -> pd.DataFrame:
    """The rows of one currency, amounts in its major unit (a column named after the currency)."""
    frame = pd.DataFrame([r for r in rows if r["currency"] == currency])
    scale = 10 ** minor_unit_digits(currency)
    for column in columns:
        if not frame.empty:
            frame[column] = frame[column] / scale
    return frame


series = data.revenue(url, days, tz_name, now)
daily, monthly, mrr, subs = series["daily"], series["monthly"], series["mrr"], series["subscriptions"]
flows = data.credit_flows(url, (now - timedelta(days=365)).replace(minute=0), tz_name)
distribution = data.balance_distribution(url)
outstanding, _ = data.credits_outstanding(url)

weight = defaultdict(int)
for row in monthly:
    weight[row["currency"]] += abs(row["net_cents"])
for row in mrr:
    weight[row["currency"]] += abs(row["mrr_cents"])
currencies = sorted(weight, key=lambda c: (-weight[c], c)) or ["usd"]
currency = currencies[0]
if len(currencies) > 1:
    currency = st.segmented_control("Currency", currencies, default=currencies[0], format_func=str.upper,
                                    key="rev_currency") or currencies[0]
    st.caption("Amounts in different currencies are never added: each chart shows one currency.")
code = currency.upper()

left, right = st.columns(2)
with left:
    frame = in_currency(mrr, currency, ("mrr_cents",))
    now_mrr = money(subs.mrr.get(currency, 0), currency)
    if frame.empty:
        st.info("No subscription has been billed yet.")
    else:
        frame["series"] = frame["state"].map({"active": "active", "past_due": "past due"})
        chart(px.line(frame, x="period", y="mrr_cents", color="series", markers=True, color_discrete_map=MRR_COLORS,
                      title=f"MRR at month end (now {now_mrr})",
                      labels={"period": "month", "mrr_cents": code}), "mrr")
with right:
    frame = in_currency([r for r in mrr if r["state"] == "active"], currency, ("new_cents", "churned_cents"))
    if frame.empty:
        st.info("No new or churned MRR yet.")
    else:
        moves = pd.concat([frame.assign(movement="new", amount=frame["new_cents"]),
                           frame.assign(movement="churned", amount=-frame["churned_cents"])])
        chart(px.bar(moves, x="period", y="amount", color="movement", barmode="relative",
                     color_discrete_map=MRR_COLORS, title="New and churned MRR by month",
                     labels={"period": "month", "amount": code}), "mrr_moves")

left, right = st.columns(2)
with left:
    frame = in_currency(daily, currency, ("net_cents",))
    if frame.empty:
        st.info("No cash collected in this period.")
    else:
        chart(px.bar(frame, x="period", y="net_cents", color="kind", color_discrete_map=KIND_COLORS,
                     category_orders={"kind": ["plan", "pack", "other"]},
                     title=f"Cash collected by day, last {days} days ({CASH})",
                     labels={"period": "day", "net_cents": code}), "rev_daily")
with right:
    frame = in_currency(monthly, currency, ("net_cents",))
    if frame.empty:
        st.info("No cash collected in the last 12 months.")
    else:
        chart(px.bar(frame, x="period", y="net_cents", color="kind", color_discrete_map=KIND_COLORS,
                     category_orders={"kind": ["plan", "pack", "other"]},
                     title=f"Cash collected by month ({CASH})",
                     labels={"period": "month", "net_cents": code}), "rev_monthly")

left, right = st.columns(2)
with left:
    tiers = pd.DataFrame([{"tier": plan.name, "status": status, "subscribers": subs.count(plan.key, (status,))}
                          for plan in PLANS for status in ("active", "trialing", "past_due", "unpaid")])
    tiers = tiers[tiers["subscribers"] > 0]
    if tiers.empty:
        st.info("No subscribers yet.")
    else:
        chart(px.bar(tiers, x="tier", y="subscribers", color="status", title="Subscribers by tier"), "tiers")
with right:
    frame = pd.DataFrame(flows)
    if frame.empty:
        st.info("No credit movements in the last 12 months.")
    else:
        chart(px.bar(frame, x="period", y="credits", color="flow", barmode="group", color_discrete_map=FLOW_COLORS,
                     title="Credits granted, spent, expired and clawed back per month",
                     labels={"period": "month"}), "flows")


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


left, right = st.columns(2)
with left:
    chart(px.bar(pd.DataFrame(distribution), x="bucket", y="accounts", title="Accounts by balance (credits)"),
          "balances")
with right:
    frame = outstanding_by_month(flows, outstanding)
    if frame.empty:
        st.info("No credit movements in the last 12 months.")
    else:
        chart(px.line(frame, x="period", y="USD", markers=True, hover_data=["credits"],
                      title="Outstanding credit liability at month end (USD at $0.06/credit)",
                      labels={"period": "month"}), "liability")
st.metric("Outstanding credit liability", f"{outstanding:,} credits",
          delta=f"worth {money(reports.credits_worth_cents(outstanding))} at $0.06/credit", delta_color="off")
st.caption(f"Months and days in {tz_name}. MRR: the monthly amount of the subscriptions active at each month's "
           "end (this month: now), as billed for their period, discounts and upgrades applied; past-due "
           "subscriptions apart. Cash collected: payments by creation date, net of refunds and lost disputes. "
           "Revenue is recomputed every minute; credit flows, balances and the liability every five minutes "
           "(at once after an adjustment made here).")
