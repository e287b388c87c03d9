"""Revenue & credits: MRR (as Stripe defines it) with new and churned MRR, cash collected by day and month,
subscribers by tier, credit flows, balances and the credit liability. Money per currency, never added."""
from collections import defaultdict
from datetime import timedelta

import streamlit as st

from billing_core import reports
from billing_core.catalog import PLANS
from billing_core.formatting import minor_unit_digits
from dashboard_ui import data
from dashboard_ui.charts import chart, figure
from dashboard_ui.common import money, start_page

identity, settings = start_page("Revenue & credits")
url, tz_name = settings.database_url, settings.operator_timezone
now = data.this_minute()
days = st.segmented_control("Daily cash over", (30, 90, 365), default=90, format_func=lambda d: f"{d} days",
                            key="rev_days") or 90

KINDS = ["plan", "pack", "other"]
KIND_COLORS = {"plan": "#2563eb", "pack": "#93c5fd", "other": "#9ca3af"}
FLOW_COLORS = {"granted": "#16a34a", "spent": "#2563eb", "expired": "#f59e0b", "clawed back": "#dc2626"}
MRR_COLORS = {"active": "#2563eb", "past due": "#f59e0b", "new": "#16a34a", "churned": "#dc2626"}
CASH = "net of refunds and lost disputes"


def in_currency(rows: list[dict], currency: str, *columns: str) -> list[dict]:
    """The rows of one currency, amounts in its major unit."""
    scale = 10 ** minor_unit_digits(currency)
    return [{**row, **{c: row[c] / scale for c in columns}} for row in rows if row["currency"] == currency]


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
    rows = [{**r, "series": r["state"].replace("_", " ")} for r in in_currency(mrr, currency, "mrr_cents")]
    if not rows:
        st.info("No subscription has been billed yet.")
    else:
        chart(figure(rows, kind="line", x="period", y="mrr_cents", color="series", colors=MRR_COLORS,
                     order=["active", "past due"], x_title="month", y_title=code,
                     title=f"MRR at month end (now {money(subs.mrr.get(currency, 0), currency)})"), "mrr")
with right:
    active = in_currency([r for r in mrr if r["state"] == "active"], currency, "new_cents", "churned_cents")
    moves = ([{"period": r["period"], "movement": "new", "amount": r["new_cents"]} for r in active]
             + [{"period": r["period"], "movement": "churned", "amount": -r["churned_cents"]} for r in active])
    if not moves:
        st.info("No new or churned MRR yet.")
    else:
        chart(figure(moves, kind="bar", x="period", y="amount", color="movement", colors=MRR_COLORS,
                     barmode="relative", x_title="month", y_title=code, title="New and churned MRR by month"),
              "mrr_moves")

left, right = st.columns(2)
with left:
    rows = in_currency(daily, currency, "net_cents")
    if not rows:
        st.info("No cash collected in this period.")
    else:
        chart(figure(rows, kind="bar", x="period", y="net_cents", color="kind", colors=KIND_COLORS, order=KINDS,
                     x_title="day", y_title=code, title=f"Cash collected by day, last {days} days ({CASH})"),
              "rev_daily")
with right:
    rows = in_currency(monthly, currency, "net_cents")
    if not rows:
        st.info("No cash collected in the last 12 months.")
    else:
        chart(figure(rows, kind="bar", x="period", y="net_cents", color="kind", colors=KIND_COLORS, order=KINDS,
                     x_title="month", y_title=code, title=f"Cash collected by month ({CASH})"), "rev_monthly")

left, right = st.columns(2)
with left:
    tiers = [{"tier": plan.name, "status": status, "subscribers": subs.count(plan.key, (status,))}
             for plan in PLANS for status in ("active", "trialing", "past_due", "unpaid")]
    tiers = [t for t in tiers if t["subscribers"] > 0]
    if not tiers:
        st.info("No subscribers yet.")
    else:
        chart(figure(tiers, kind="bar", x="tier", y="subscribers", color="status", title="Subscribers by tier"),
              "tiers")
with right:
    if not flows:
        st.info("No credit movements in the last 12 months.")
    else:
        chart(figure(flows, kind="bar", x="period", y="credits", color="flow", colors=FLOW_COLORS, barmode="group",
                     x_title="month", title="Credits granted, spent, expired and clawed back per month"), "flows")


def outstanding_by_month(flows: list[dict], outstanding_now: int) -> list[dict]:
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
    return [{"period": p, "credits": ends[p], "USD": reports.credits_worth_cents(ends[p]) / 100} for p in periods]


left, right = st.columns(2)
with left:
    chart(figure(distribution, kind="bar", x="bucket", y="accounts", x_title="credits",
                 title="Accounts by balance (credits)"), "balances")
with right:
    liability = outstanding_by_month(flows, outstanding)
    if not liability:
        st.info("No credit movements in the last 12 months.")
    else:
        chart(figure(liability, kind="line", x="period", y="USD", hover="credits", x_title="month",
                     title="Outstanding credit liability at month end (USD at $0.06/credit)"), "liability")
st.metric("Outstanding credit liability", f"{outstanding:,} credits",
          delta=f"worth {money(reports.credits_worth_cents(outstanding))} at $0.06/credit", delta_color="off")
st.caption(f"Months and days in {tz_name}. MRR: the monthly amount of the subscriptions active at each month's "
           "end (this month: now), as billed for their period, discounts and upgrades applied; past-due "
           "subscriptions apart. Cash collected: payments by creation date, net of refunds and lost disputes. "
           "Revenue is recomputed every minute; credit flows, balances and the liability every five minutes "
           "(at once after an adjustment made here).")
