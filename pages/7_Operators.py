"""Operators (admins only): accounts and their lifecycle, recent sign-ins (failed and successful), the audit trail."""
import streamlit as st

from billing_core import db, signin
from billing_core.formatting import escape_markdown as md
from billing_core.operators import (ROLES, OperatorError, check_admin, check_password, hash_password, list_operators,
                                    operator_audit, reset_password, set_disabled, set_role)
from dashboard_ui import data
from dashboard_ui.common import start_page, table, when

identity, settings = start_page("Operators")
url = settings.database_url
if not identity.is_admin:
    st.info("Only an admin may manage operators and see sign-in attempts.")
    st.stop()

with data.read(url) as session:
    operators = list_operators(session)
    counts = signin.attempt_counts(session)
    attempts = signin.recent_attempts(session, limit=200)
    audit = operator_audit(session, limit=200)

table([{"Name": o["name"], "Role": o["role"], "Status": "disabled" if o["disabled"] else "enabled",
        "Created": when(o["created_at"], settings), "Password hash": o["hash"]} for o in operators], key="operators")
st.caption("From a shell: `python -m billing_core list-operators`, `disable-operator`, `enable-operator`, "
           "`reset-password --password-stdin`, `set-role`, `add-operator`.")

st.markdown("#### Change an operator")
names = [o["name"] for o in operators]
by_name = {o["name"]: o for o in operators}
picked = st.selectbox("Operator", names, index=None, placeholder="Choose an operator", key="op_pick")


def apply(change, done: str) -> None:
    """Run one change in a write transaction as the signed-in admin; report it after the rerun."""
    try:
        check_admin(identity, "manage operators")
        with db.write_session(db.get_engine(url)) as session:
            change(session)
    except OperatorError as exc:
        st.error(md(str(exc)))
    else:
        st.session_state["op_done"] = done
        st.rerun()


if picked:
    current = by_name[picked]
    left, middle, right = st.columns(3)
    with left:
        if current["disabled"]:
            if st.button("Enable", key="op_enable"):
                apply(lambda s: set_disabled(s, name=picked, disabled=False, changed_by=identity.name),
                      f"{picked} is enabled.")
        elif st.button("Disable (signs them out)", key="op_disable", disabled=picked == identity.name):
            apply(lambda s: set_disabled(s, name=picked, disabled=True, changed_by=identity.name),
                  f"{picked} is disabled and signed out on their next click.")
    with middle:
        role = st.selectbox("Role", ROLES, index=ROLES.index(current["role"]), key=f"op_role:{picked}")
        if st.button("Change role", key="op_set_role", disabled=role == current["role"]):
            apply(lambda s: set_role(s, name=picked, role=role, changed_by=identity.name),
                  f"{picked} is now {role}.")
    with right:
        with st.form("op_reset", clear_on_submit=True):
            new_password = st.text_input("New password", type="password", key="op_new_password")
            reset = st.form_submit_button("Reset password")
        if reset:
            try:
                new_hash = hash_password(check_password(new_password))  # ~0.3 s, before the write transaction
            except OperatorError as exc:
                st.error(md(str(exc)))
            else:
                apply(lambda s: reset_password(s, name=picked, new_hash=new_hash, changed_by=identity.name),
                      f"The password of {picked} is reset.")
if st.session_state.get("op_done"):
    st.success(md(st.session_state.pop("op_done")))

st.markdown("#### Sign-in attempts")
st.caption(f"Last 24 hours: {counts['failed']:,} failed, {counts['succeeded']:,} successful. Failed sign-ins "
           "back off per user name and per client address; a client without failures is never held back.")
only_failed = st.checkbox("Only failed attempts", key="op_only_failed")
table([{"When": when(a["at"], settings, seconds=True), "User name": a["name"], "Client address": a["client_address"],
        "Result": a["result"]} for a in attempts if not only_failed or a["result"] == "failed"], key="sign_ins")

st.markdown("#### Changes to operators")
table([{"When": when(a["at"], settings, seconds=True), "Operator": a["operator"], "Change": a["action"],
        "Detail": a["detail"], "By": a["changed_by"]} for a in audit], key="operator_audit")
