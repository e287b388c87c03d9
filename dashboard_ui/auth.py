"""The sign-in gate every page runs first: nothing with data renders before it lets the operator in.

With an `[auth]` section in `.streamlit/secrets.toml` it uses Streamlit's OIDC (`st.login`,
`st.user`) and maps the email to a role (ADMIN_EMAILS / SUPPORT_EMAILS); otherwise it checks a
local operator account (name + password, salted scrypt hash) in the database in use.
"""
from __future__ import annotations

import threading
import time

import streamlit as st

from billing_core import db
from demo_data import DEMO_OPERATOR
from billing_core.operators import Identity, active_identity, authenticate, role_for_email
from billing_core.settings import Settings

SESSION_KEY = "operator_identity"
MAX_FAILURES = 5
FAILURE_WINDOW_SECONDS = 300  # 5 failures within it lock the name for as long again

# Failed sign-ins per lower-cased user name (unknown names too), kept process-wide: Streamlit serves
# every browser session from this one process, and a page reload starts a fresh st.session_state.
_failures: dict[str, list[float]] = {}
_locked_until: dict[str, float] = {}
_failures_lock = threading.Lock()
_MAX_TRACKED_NAMES = 10_000  # guessed names must not grow the dicts without bound


def _throttled(name: str, now: float) -> bool:
    with _failures_lock:
        return _locked_until.get(name, 0.0) > now


def _record_failure(name: str, now: float) -> None:
    with _failures_lock:
        if len(_failures) >= _MAX_TRACKED_NAMES:
            _prune(now)
        recent = [t for t in _failures.get(name, []) if now - t < FAILURE_WINDOW_SECONDS] + [now]
        _failures[name] = recent
        if len(recent) >= MAX_FAILURES:
            _locked_until[name] = now + FAILURE_WINDOW_SECONDS
            _failures.pop(name)


def _prune(now: float) -> None:
    for name in [n for n, times in _failures.items() if now - times[-1] >= FAILURE_WINDOW_SECONDS]:
        del _failures[name]
    for name in [n for n, until in _locked_until.items() if until <= now]:
        del _locked_until[name]


def _forget_failures(name: str) -> None:
    with _failures_lock:
        _failures.pop(name, None)


def reset_sign_in_throttle() -> None:
    with _failures_lock:
        _failures.clear()
        _locked_until.clear()


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
    throttle_key = (name or "").strip().lower()
    if _throttled(throttle_key, now):
        st.error("Too many failed sign-ins; wait a few minutes and try again.")
        return
    identity = None
    if settings.demo_mode or not _is_demo_operator(name):  # its password is public: demo database only
        with db.read_session() as session:
            operator = authenticate(session, name=name, password=password)
            identity = Identity(name=operator.name, role=operator.role) if operator else None
    if identity is None:
        _record_failure(throttle_key, now)
        st.error("Wrong user name or password.")
        return
    _forget_failures(throttle_key)
    st.session_state[SESSION_KEY] = identity
    st.rerun()
