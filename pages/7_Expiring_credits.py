"""Expiring credits: subscription credits that will expire unspent, day by day, and who holds the most."""
from datetime import datetime

import pandas as pd
import streamlit as st

from billing_core import expiring
from billing_core.formatting import zone
from dashboard_ui import data
from dashboard_ui.common import start_page, table, when

TOP_ACCOUNTS = 50
identity, settings = start_page("Expiring credits", icon=":material/hourglass_bottom:")
url = settings.database_url

with data.read(url) as session:  # aggregated in SQL; only the accounts shown are read
    week = expiring.expiring_credits(session, days=7, tz_name=settings.operator_timezone, limit=TOP_ACCOUNTS)
    month = expiring.expiring_credits(session, days=30, tz_name=settings.operator_timezone, limit=TOP_ACCOUNTS)

cols = st.columns(4)
cols[0].metric("Expiring in 7 days", f"{week.total:,} credits")
cols[1].metric("Accounts, 7 days", f"{week.account_count:,}")
cols[2].metric("Expiring in 30 days", f"{month.total:,} credits")
cols[3].metric("Accounts, 30 days", f"{month.account_count:,}")

days = st.radio("Window", (7, 30), index=1, horizontal=True, format_func=lambda d: f"Next {d} days",
                key="expiring_days")
report = week if days == 7 else month
st.markdown(f"#### Credits expiring unspent each day, next {days} days")
chart = pd.DataFrame({"Credits expiring": [d["credits"] for d in report.by_day]},
                     index=pd.Index([d["day"].isoformat() for d in report.by_day], name="Day"))
st.bar_chart(chart, y="Credits expiring", height=260)

st.markdown(f"#### Accounts with the most credits about to expire, next {days} days")
if not report.accounts:
    st.write("No subscription credits expire in this window.")
else:
    table([{"User": r["user_id"], "Credits expiring": r["credits"], "First expiry": when(r["expires_at"], settings)}
           for r in report.accounts[:TOP_ACCOUNTS]], key="expiring_table")
    today = datetime.now(zone(settings.operator_timezone)).date()
    st.download_button(f"Download CSV ({report.account_count:,} accounts)", on_click="ignore",
                       data=lambda: data.expiring_csv(url, days, settings.operator_timezone),
                       file_name=f"expiring-credits-{days}d-{today.isoformat()}.csv", mime="text/csv",
                       key="expiring_csv")
st.caption(f"Subscription credits left in periods that end in the window (packs and adjustments never expire). "
           f"Days in {settings.operator_timezone}. Also: `python -m billing_core expiring --days {days} --json`.")
