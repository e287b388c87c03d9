"""Settings: configuration problems (secrets masked), catalog against Stripe, the webhook URL."""
import streamlit as st
from sqlalchemy import select

from billing_core.catalog import CATALOG
from billing_core.models import Operator
from billing_core.settings import check_config, mask_secret, mask_url_password
from dashboard_ui import data
from dashboard_ui.common import money, start_page, table, when

WEBHOOK_PATH = "/api/stripe/webhook"
identity, settings = start_page("Settings")

st.markdown("#### Configuration")
mode = "demo (no Stripe key, data/demo.db)" if settings.demo_mode else settings.stripe_mode
st.write(f"Mode **{mode}** · configuration from `{settings.env_file}` · database "
         f"`{mask_url_password(settings.database_url)}` · times in {settings.operator_timezone}")
table([{"Setting": name, "Value": value} for name, value in (
    ("STRIPE_SECRET_KEY", mask_secret(settings.stripe_secret_key)),
    ("STRIPE_PUBLISHABLE_KEY", mask_secret(settings.stripe_publishable_key)),
    ("STRIPE_WEBHOOK_SECRET", ", ".join(mask_secret(s) for s in settings.webhook_secrets) or "(not set)"),
    ("BILLING_API_TOKEN", mask_secret(settings.billing_api_token)),
    ("BASE_URL", settings.base_url),
    ("STRIPE_API_BASE", settings.stripe_api_base or "(Stripe)"),
    ("SUBSCRIPTION_CREDITS_ROLLOVER", str(settings.subscription_credits_rollover).lower()),
    ("CHECKOUT_LINK_EXPIRY_HOURS", str(settings.checkout_link_expiry_hours)),
    ("SUPPORT_ADJUSTMENT_LIMIT", f"{settings.support_adjustment_limit:,} credits"),
    ("SUPPORT_CAN_REFUND", str(settings.support_can_refund).lower()),
)], key="settings_values")

problems = check_config(settings)
errors = [p for p in problems if p.level == "error"]
if not problems:
    st.success("check-config: no problems found.")
else:
    (st.error if errors else st.warning)(f"check-config: {len(errors)} error(s), "
                                         f"{len(problems) - len(errors)} warning(s)")
    table([{"Level": p.level, "Setting": p.setting, "Problem": p.message} for p in problems], key="problems")

st.markdown("#### Catalog")
table([{"Item": item.key, "Name": item.name, "Kind": item.kind, "Price": money(item.amount_cents),
        "Credits": item.credits, "Price ID": settings.price_id(item.key) or "(not set)",
        "Setting": item.price_setting} for item in CATALOG.values()], key="catalog")
if settings.stripe_configured:
    if st.button("Check prices against Stripe", key="check_stripe"):
        from billing_core.catalog_sync import check_prices_against_stripe

        with st.spinner("Asking Stripe…"):
            drift = check_prices_against_stripe(settings)
        if drift:
            table([{"Setting": p.setting, "Problem": p.message} for p in drift], key="drift")
        else:
            st.success("Every configured price matches the catalog in Stripe.")
else:
    st.caption("Stripe is not configured: the catalog can't be checked against Stripe. "
               "`python -m billing_core sync-catalog --write-env` creates the prices once a key is set.")

st.markdown("#### Webhooks")
local = f"localhost:{settings.webhook_port}{WEBHOOK_PATH}"
st.write("For local testing, forward Stripe's events to the sidecar:")
st.code(f"stripe listen --forward-to {local}", language="bash")
st.write("In production, add this endpoint in the Stripe dashboard (Developers → Webhooks):")
st.code(f"{settings.base_url}{WEBHOOK_PATH}", language=None)

if identity.is_admin:
    st.markdown("#### Operators")
    with data.read(settings.database_url) as session:
        operators = session.execute(select(Operator.name, Operator.role, Operator.disabled, Operator.created_at)
                                    .order_by(Operator.name).limit(200)).all()
    table([{"Name": o.name, "Role": o.role, "Disabled": "yes" if o.disabled else "",
            "Created": when(o.created_at, settings)} for o in operators], key="operators")
    st.caption("Add one with `python -m billing_core add-operator NAME --role admin|support`.")
