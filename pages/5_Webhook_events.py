"""Webhook events: filterable list, payload view, the needs-attention queue, replay of failed events."""
import json
from datetime import datetime, time, timedelta

import streamlit as st

from billing_core import reports
from billing_core.formatting import escape_markdown as md, zone
from billing_core.operators import check_admin, OperatorError
from dashboard_ui import data
from dashboard_ui.common import pager, start_page, table, when
from dashboard_ui.actions import replay_failed_events, reprocess_event

PAGE_SIZE = 50
identity, settings = start_page("Webhook events")
url = settings.database_url

with data.read(url) as session:
    counts = reports.event_status_counts(session)
    types = reports.event_types(session)
    queue = reports.events_page(session, filters=reports.EventFilter(status="needs_attention"), limit=20)

row = st.columns(len(counts))
for column, (status, count) in zip(row, counts.items()):
    column.metric(status.replace("_", " ").capitalize(), f"{count:,}")

st.markdown("#### Needs attention")
if not queue:
    st.write("Nothing needs attention.")
for event in queue:
    with st.expander(f"{md(event['type'])} · {md(event['id'])} · {when(event['received_at'], settings)}"):
        if event["error"]:
            st.text(event["error"])  # untrusted (it may quote a user id or a Stripe message): plain text only
        else:
            st.caption("No error recorded.")
        if event["assigned_user_id"]:
            st.caption(f"Assigned to {md(event['assigned_user_id'])}")
        with st.form(f"reprocess_{event['id']}"):
            assigned = st.text_input("Assign to user id", value=event["assigned_user_id"] or event["user_id"] or "",
                                     key=f"assign_{event['id']}")
            go = st.form_submit_button("Assign and reprocess", disabled=not identity.is_admin)
        if go:
            try:
                check_admin(identity, "reprocess events")
                outcome = reprocess_event(event["id"], assigned_user_id=assigned.strip() or None,
                                          operator=identity.name)
            except (OperatorError, ValueError, LookupError) as exc:
                st.error(md(str(exc)))
            else:
                data.clear_cached_aggregates()
                level = "success" if outcome.startswith(("processed", "ignored")) else "warning"
                st.session_state["events_done"] = (level, f"Reprocessed {event['id']}: {outcome}")
                st.rerun()
if not identity.is_admin:
    st.caption("Only an admin may reprocess or replay events.")

failed = counts.get("failed", 0)
if st.button(f"Replay {failed:,} failed event(s)", disabled=not (identity.is_admin and failed),
             key="replay_failed"):
    try:
        check_admin(identity, "replay failed events")
        outcome = replay_failed_events(operator=identity.name)
    except (OperatorError, ValueError) as exc:
        st.error(md(str(exc)))
    else:
        data.clear_cached_aggregates()
        st.session_state["events_done"] = ("success", f"Replayed failed events: {outcome}")
        st.rerun()
if st.session_state.get("events_done"):
    level, message = st.session_state.pop("events_done")
    (st.success if level == "success" else st.warning)(md(message))

st.markdown("#### All events")
cols = st.columns([1.2, 2, 1.5, 2])
status = cols[0].selectbox("Status", ("",) + reports.EVENT_STATUSES, format_func=lambda s: s or "All", key="ev_status")
event_type = cols[1].selectbox("Type", [""] + types, format_func=lambda t: t or "All types", key="ev_type")
user = cols[2].text_input("User id", key="ev_user")
tz = zone(settings.operator_timezone)
today = datetime.now(tz).date()
picked = cols[3].date_input("Received", value=(), key="ev_dates", max_value=today + timedelta(days=1))
days = [d for d in (picked if isinstance(picked, (tuple, list)) else [picked]) if d]
start = datetime.combine(days[0], time(), tz) if days else None
end = datetime.combine(days[-1] + timedelta(days=1), time(), tz) if days else None
filters = reports.EventFilter(status=status or None, type=event_type or None, user_id=user.strip() or None,
                              start=start, end=end)
with data.read(url) as session:
    total = reports.events_count(session, filters=filters)
offset = pager("ev_page", total=total, page_size=PAGE_SIZE)
with data.read(url) as session:
    events = reports.events_page(session, filters=filters, limit=PAGE_SIZE, offset=offset)
table([{"Received": when(e["received_at"], settings, seconds=True), "Type": e["type"], "Status": e["status"],
        "Event": e["id"], "User": e["user_id"] or e["assigned_user_id"] or "", "Attempts": e["attempts"],
        "Source": e["source"], "Error": (e["error"] or "")[:200]} for e in events], key="events_table")

if events:
    chosen = st.selectbox("Show the payload of", [e["id"] for e in events], key="ev_payload_pick")
    with data.read(url) as session:
        detail = reports.event_detail(session, chosen)
    if detail:
        st.caption(f"{md(detail['type'])} · API version {md(detail['api_version'] or '—')} · "
                   f"{'live' if detail['livemode'] else 'test'} mode · created {when(detail['created'], settings)}")
        try:
            st.json(json.loads(detail["payload"]), expanded=2)
        except ValueError:
            st.code(detail["payload"][:20_000], language=None)
