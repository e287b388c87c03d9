"""The sign-in gate every page runs first: nothing with data renders before it lets the operator in.

With an `[auth]` section in `.streamlit/secrets.toml` it uses Streamlit's OIDC (`st.login`,
`st.user`) and maps the email to a role (ADMIN_EMAILS / SUPPORT_EMAILS); otherwise it checks a
local operator account (name + password, salted scrypt hash) in the database in use.
"""
from __future__ import annotations

import time
from datetime import timedelta

import streamlit as st

from billing_core import db, signin
from billing_core.models import utcnow
from billing_core.operators import Identity, active_identity, role_for_email
from demo_data import DEMO_OPERATOR
from billing_core.settings import Settings

SESSION_KEY = "operator_identity"
ACTIVITY_KEY = "operator_last_activity"
IDLE_NOTICE_KEY = "operator_idle_notice"
SSO_RECORDED_KEY = "operator_sso_recorded"  # the (email, let in) this browser session's sign-in was recorded as


def _now():
    """The sign-in throttle's clock (tests replace it)."""
    return utcnow()


def client_address(settings: Settings) -> str | None:
    """The browser's address: as Streamlit saw it, or behind DASHBOARD_TRUSTED_PROXIES proxies, from their
    X-Forwarded-For. None in AppTest."""
    try:
        peer, forwarded = st.context.ip_address, st.context.headers.get("X-Forwarded-For")
    except Exception:
        return None
    return signin.client_address_from(peer, forwarded, settings.dashboard_trusted_proxies)


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
    st.session_state.pop(SSO_RECORDED_KEY, None)
    st.session_state.pop(ACTIVITY_KEY, None)
    if oidc_configured():
        st.logout()


def require_operator(settings: Settings) -> Identity:
    """The signed-in operator; otherwise renders the sign-in page and stops the script."""
    _sign_out_when_idle(settings)
    identity = _require_oidc(settings) if oidc_configured() else _require_local(settings)
    st.session_state[ACTIVITY_KEY] = time.monotonic()
    return identity


def _sign_out_when_idle(settings: Settings) -> None:
    """SESSION_IDLE_MINUTES without a rerun (any click or input) signs the operator out."""
    last = st.session_state.get(ACTIVITY_KEY)
    if last is None or current_identity() is None and not oidc_configured():
        return
    if time.monotonic() - last > settings.session_idle_minutes * 60:
        st.session_state[IDLE_NOTICE_KEY] = settings.session_idle_minutes
        sign_out()


def _require_oidc(settings: Settings) -> Identity:
    user = st.user.to_dict()
    if not user.get("is_logged_in"):
        st.title("Sign in")
        st.write("This console uses your organisation's single sign-on.")
        st.button("Sign in", type="primary", on_click=st.login)
        st.stop()
    email = str(user.get("email") or "")
    if user.get("email_verified") is not True:  # an unverified address could be anybody's
        _record_single_sign_on(settings, email, let_in=False)
        st.title("No access")
        st.error("Your identity provider has not verified this account's email address, so it can't be "
                 "matched to ADMIN_EMAILS or SUPPORT_EMAILS. Verify it with the provider, then sign in again.")
        st.button("Sign out", on_click=st.logout)
        st.stop()
    role = role_for_email(email, settings)
    _record_single_sign_on(settings, email, let_in=role is not None)
    if role is None:
        st.title("No access")
        st.error("This account is not in ADMIN_EMAILS or SUPPORT_EMAILS; ask an admin to add it.")
        st.text(email)
        st.button("Sign out", on_click=st.logout)
        st.stop()
    identity = Identity(name=email.lower(), role=role)
    st.session_state[SESSION_KEY] = identity
    return identity


def _record_single_sign_on(settings: Settings, email: str, *, let_in: bool) -> None:
    """Once per browser session and outcome, so the sign-in log shows identity-provider sign-ins too."""
    outcome = (email.lower(), let_in)
    if st.session_state.get(SSO_RECORDED_KEY) == outcome:
        return
    signin.record_single_sign_on(email=email, client_address=client_address(settings), success=let_in)
    st.session_state[SSO_RECORDED_KEY] = outcome


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
    idle = st.session_state.pop(IDLE_NOTICE_KEY, None)
    if idle:
        st.info(f"You were signed out after {idle} minutes without activity.")
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
    # The demo operator's password is public: it signs in only in the demo database.
    refuse = not settings.demo_mode and _is_demo_operator(name)
    result = signin.sign_in(name=name, password=password, client_address=client_address(settings),
                            url=settings.database_url, now=_now(), refuse=refuse)
    if result.throttled:
        st.error(f"Too many failed sign-ins; try again in {_duration(result.retry_after)}.")
        return
    if result.identity is None:
        st.error("Wrong user name or password.")
        return
    st.session_state[SESSION_KEY] = result.identity
    st.session_state[ACTIVITY_KEY] = time.monotonic()
    st.rerun()


def _duration(wait: timedelta) -> str:
    seconds = max(1, int(wait.total_seconds() + 0.999))
    if seconds < 120:
        return f"{seconds} seconds"
    return f"{-(-seconds // 60)} minutes"
