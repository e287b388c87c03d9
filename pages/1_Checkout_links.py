"""Checkout links: pick an account (or a new user id), a plan or pack, and get a Stripe Checkout link."""
import streamlit as st

from billing_core import db, reports
from billing_core.catalog import CATALOG, PACKS, PLANS
from billing_core.formatting import escape_markdown as md
from billing_core.checkout import CheckoutRefused, create_checkout_link
from billing_core.stripe_client import StripeProblem
from dashboard_ui import data
from dashboard_ui.common import money, start_page, table, when

identity, settings = start_page("Checkout links")
url = settings.database_url

if not settings.stripe_configured:
    st.info("Stripe is not configured, so no links can be made here"
            + (" in demo mode" if settings.demo_mode else "")
            + ". Set STRIPE_SECRET_KEY (a test key sk_test_…) and the price IDs in config/.env, "
              "then run `python -m billing_core check-config`.", icon=":material/power_off:")

st.markdown("#### Who pays")
query = st.text_input("User id or email", key="link_query", placeholder="user_123 or someone@example.com")
user_id, email = "", ""
NEW_ACCOUNT = ""  # never a user id
if query.strip():
    typed = query.strip()
    with data.read(url) as session:
        matches = reports.search_accounts(session, typed, limit=10)
    exact = [m["user_id"] for m in matches
             if typed in (m["user_id"], m["stripe_customer_id"]) or (m["email"] or "").lower() == typed.lower()]
    new_label = f"New account with user id {typed!r}"
    options = [m["user_id"] for m in matches] + ([NEW_ACCOUNT] if "@" not in typed else [])
    labels = {m["user_id"]: f"{m['user_id']} · {m['email'] or 'no email'}" for m in matches}
    if options:
        # Only an exact match is pre-selected: a prefix match is someone else (demo_user_001 vs demo_user_0010).
        default = exact[0] if len(exact) == 1 else NEW_ACCOUNT if NEW_ACCOUNT in options and not exact else None
        picked = st.selectbox("Account", options, index=None if default is None else options.index(default),
                              format_func=lambda o: labels.get(o, new_label), placeholder="Choose the account",
                              key=f"link_account:{typed}")  # a new query starts from its own default
        if picked == NEW_ACCOUNT:
            user_id = typed
            email = st.text_input("Email for the new account (optional)", key="link_email")
        elif picked is not None:
            user_id = picked
    else:
        st.warning("No account has that email; type the DevOps Agent user id instead to create one.")

st.markdown("#### What they buy")
describe = {item.key: (f"{item.name} · {money(item.amount_cents)}/month · {item.credits:,} credits a month"
                       if item.kind == "plan" else f"{item.name} · {money(item.amount_cents)} once")
            for item in PLANS + PACKS}
item_key = st.radio("Plan or pack", list(describe), format_func=describe.get, key="link_item", horizontal=False)

clicked = st.button("Generate link", type="primary", disabled=not (user_id and settings.stripe_configured),
                    key="link_generate")
if clicked:
    try:
        with st.spinner("Asking Stripe for a Checkout Session…"):
            issued = create_checkout_link(user_id=user_id, item=item_key, operator=identity.name,
                                          email=email or None, settings=settings,
                                          engine=db.get_engine(settings.database_url))
    except (CheckoutRefused, StripeProblem, ValueError) as exc:
        st.error(md(str(exc)))  # may quote the typed user id or a Stripe message
    else:
        st.session_state["issued_link"] = issued

issued = st.session_state.get("issued_link")
if issued is not None and (issued.user_id, issued.item) != (user_id, item_key):
    st.session_state.pop("issued_link")  # a link shown next to another account or item would be sent by mistake
    issued = None
if issued is not None:
    reused = " (the link already issued in the last minutes, reused)" if issued.reused else ""
    st.success(f"Checkout link for **{md(issued.user_id)}** · {CATALOG[issued.item].name}{reused}")
    st.code(issued.url, language=None)
    cols = st.columns([1, 3])
    cols[0].link_button("Open link", issued.url)
    cols[1].caption(f"Expires {when(issued.expires_at, settings)}. Copy it with the button at the right "
                    "of the box and send it to the customer.")

st.markdown("#### Recent links")
only_this = st.checkbox("Only this account", value=False, key="links_only_user", disabled=not user_id)
with data.read(url) as session:
    links = reports.recent_links(session, user_id=user_id if only_this and user_id else None, limit=50)
table([{"Created": when(link["created_at"], settings), "User": link["user_id"],
        "Item": CATALOG[link["item"]].name if link["item"] in CATALOG else link["item"], "Status": link["status"],
        "Expires": when(link["expires_at"], settings), "Completed": when(link["completed_at"], settings),
        "Operator": link["operator"] or "", "Link": link["url"]} for link in links], key="recent_links")
