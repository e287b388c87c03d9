"""The sign-in gate every page runs first: nothing with data renders before it lets the operator in.

With an `[auth]` section in `.streamlit/secrets.toml` it uses Streamlit's OIDC (`st.login`,
`st.user`) and maps the email to a role (ADMIN_EMAILS / SUPPORT_EMAILS); otherwise it checks a
local operator account (name + password, salted scrypt hash) in the database in use.
"""
from __future__ import annotations

import time

import streamlit as st

from billing_core import db
from billing_core.demo import DEMO_OPERATOR
from billing_core.operators import Identity, active_identity, authenticate, role_for_email
from billing_core.settings import Settings

SESSION_KEY = "operator_identity"
FAILURES_KEY = "sign_in_failures"
MAX_FAILURES = 5
FAILURE_WINDOW_SECONDS = 300


def oidc_configured() -> bool:
    try:
        return "auth" in st.secrets
    except Exception:  # no secrets.toml at all
        return False


def current_identity() -> Identity | None:
    identity = st.session_state.get(SESSION_KEY)
    return identity if isinstance(identity, Identity) else None


def sign_out() -> None:
    st.session_state.pop(SESSION_KEY, None)
    if oidc_configured():
        st.logout()


def require_operator(settings: Settings) -> Identity:
    """The signed-in operator; otherwise renders the sign-in page and stops the script."""
    if oidc_configured():
        return _require_oidc(settings)
    return _require_local(settings)


def _require_oidc(settings: Settings) -> Identity:
    user = st.user.to_dict()
    if not user.get("is_logged_in"):
        st.title("Sign in")
        st.write("This console uses your organisation's single sign-on.")
        st.button("Sign in", type="primary", on_click=st.login)
        st.stop()
    email = str(user.get("email") or "")
    role = role_for_email(email, settings)
    if role is None:
        st.title("No access")
        st.error(f"{email or 'This account'} is not in ADMIN_EMAILS or SUPPORT_EMAILS; ask an admin to add it.")
        st.button("Sign out", on_click=st.logout)
        st.stop()
    identity = Identity(name=email.lower(), role=role)
    st.session_state[SESSION_KEY] = identity
    return identity


def _require_local(settings: Settings) -> Identity:
    identity = current_identity()
    if identity is not None:
        with db.read_session() as session:
            refreshed = active_identity(session, identity.name)  # role changes and disabling apply at once
        if refreshed is not None:
            st.session_state[SESSION_KEY] = refreshed
            return refreshed
        st.session_state.pop(SESSION_KEY, None)
    _sign_in_form(settings)
    st.stop()


def _is_demo_operator(name: str) -> bool:
    return name.strip().lower() == DEMO_OPERATOR[0].lower()


def _sign_in_form(settings: Settings) -> None:
    st.title("Sign in")
    if settings.demo_mode:
        name, password = DEMO_OPERATOR
        st.info(f"Demo mode: sign in as **{name}** with password **{password}**.")
    with st.form("sign_in"):
        name = st.text_input("User name", key="sign_in_name")
        password = st.text_input("Password", type="password", key="sign_in_password")
        submitted = st.form_submit_button("Sign in", type="primary")
    if not submitted:
        st.caption("Operators are created with `python -m billing_core add-operator NAME --role admin|support`.")
        return
    now = time.monotonic()
    failures = [t for t in st.session_state.get(FAILURES_KEY, []) if now - t < FAILURE_WINDOW_SECONDS]
    if len(failures) >= MAX_FAILURES:
        st.error("Too many failed sign-ins; wait a few minutes and try again.")
        return
    identity = None
    if settings.demo_mode or not _is_demo_operator(name):  # its password is public: demo database only
        with db.read_session() as session:
            operator = authenticate(session, name=name, password=password)
            identity = Identity(name=operator.name, role=operator.role) if operator else None
    if identity is None:
        st.session_state[FAILURES_KEY] = failures + [now]
        st.error("Wrong user name or password.")
        return
    st.session_state.pop(FAILURES_KEY, None)
    st.session_state[SESSION_KEY] = identity
    st.rerun()
