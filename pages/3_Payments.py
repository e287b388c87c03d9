"""Payments: history with filters, totals (refunds shown), CSV download, refunds with a clawback preview."""
from datetime import date, datetime, time, timedelta

import streamlit as st

from billing_core import refunds, reports
from billing_core.catalog import CATALOG
from billing_core.formatting import zone
from dashboard_ui import data
from dashboard_ui.common import money, money_metric, pager, start_page, table, when
from dashboard_ui.support_tools import refund_panel, refund_requests_table

PAGE_SIZE = 50
STATUSES = ("paid", "partially_refunded", "refunded", "disputed", "unpaid", "failed")
identity, settings = start_page("Payments")
url = settings.database_url
tz = zone(settings.operator_timezone)
today = datetime.now(tz).date()

cols = st.columns([2, 1.3, 1.2, 1.5])
picked = cols[0].date_input("Date range", value=(today - timedelta(days=30), today), key="pay_dates",
                            max_value=today + timedelta(days=1))
items = {"": "All items", "plan": "All plans", "pack": "All packs", **{k: i.name for k, i in CATALOG.items()}}
item = cols[1].selectbox("Plan or pack", list(items), format_func=items.get, key="pay_item")
status = cols[2].selectbox("Status", ("",) + STATUSES, format_func=lambda s: s or "All statuses", key="pay_status")
user = cols[3].text_input("User id", key="pay_user")


def utc_bounds(picked) -> tuple[datetime | None, datetime | None]:
    """The picked local dates as UTC instants: [first day 00:00, day after the last day 00:00)."""
    days = list(picked) if isinstance(picked, (tuple, list)) else [picked]
    days = [d for d in days if isinstance(d, date)]
    if not days:
        return None, None
    first, last = days[0], days[-1]
    return (datetime.combine(first, time(), tz), datetime.combine(last + timedelta(days=1), time(), tz))


start, end = utc_bounds(picked)
filters = reports.PaymentFilter(start=start, end=end, item=item or None, status=status or None,
                                user_id=user.strip() or None)
with data.read(url) as session:
    totals = reports.payments_totals(session, filters=filters)

count = sum(t.count for t in totals)
# Three figures a row: at 1,280 px five columns cut amounts like $12,345,678.90 short.
top, bottom = st.columns(3), st.columns(3)
top[0].metric("Payments", f"{count:,}")
for column, label, field in ((top[1], "Collected", "amount_cents"), (top[2], "Net", "net_cents"),
                             (bottom[1], "Refunded", "refunded_cents"),
                             (bottom[2], "Lost in disputes", "disputed_lost_cents")):
    money_metric(column, label, {t.currency: getattr(t, field) for t in totals})

offset = pager("pay_page", total=count, page_size=PAGE_SIZE)
with data.read(url) as session:
    rows = reports.payments_page(session, filters=filters, limit=PAGE_SIZE, offset=offset)
    refundable = refunds.refundable_payments(session, payment_ids=[r["id"] for r in rows])  # the refund panel's
    requests = refunds.refund_requests(session, payment_ids=[r["id"] for r in rows])
pending = {r["payment_id"] for r in requests if r["status"] == "pending"}
table([{"When": when(r["created_at"], settings), "User": r["user_id"] or "",
        "Item": CATALOG[r["item"]].name if r["item"] in CATALOG else (r["item"] or ""),
        "Status": r["status"] + (" · refund pending" if r["id"] in pending else ""),
        "Amount": money(r["amount_cents"], r["currency"]),
        "Refunded": money(r["amount_refunded"], r["currency"]) if r["amount_refunded"] else "",
        "Lost in dispute": money(r["amount_disputed_lost"], r["currency"]) if r["amount_disputed_lost"] else "",
        "Credits": r["credits_granted"], "Source": r["source"],
        "Stripe": r["checkout_session_id"] or r["invoice_id"] or ""} for r in rows], key="payments_table")


def csv_for_download() -> str:
    with data.read(url) as session:
        return reports.payments_csv(session, filters=filters, tz_name=settings.operator_timezone)


st.download_button(f"Download CSV ({min(count, reports.MAX_CSV_ROWS):,} rows)", data=csv_for_download,
                   file_name=f"payments-{today.isoformat()}.csv", mime="text/csv", key="pay_csv",
                   disabled=count == 0)
if count > reports.MAX_CSV_ROWS:
    st.caption(f"The CSV holds the newest {reports.MAX_CSV_ROWS:,} payments of this filter; narrow the dates for more.")
st.caption(f"Dates and times in {settings.operator_timezone}. Collected counts payments that were paid; "
           "net is collected minus refunds and disputes lost.")

refund_panel(identity=identity, settings=settings, payments=refundable, key="pay_refund")
refund_requests_table(requests, settings, key="pay_refunds_table")
