"""Settings: configuration problems (secrets masked), catalog against Stripe, the webhook URL."""
import streamlit as st

from billing_core.catalog import CATALOG
from billing_core.settings import check_config, mask_secret, mask_url_password
from dashboard_ui.common import money, start_page, table

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
    ("SUPPORT_DAILY_ADJUSTMENT_CAP", f"{settings.support_daily_adjustment_cap:,} credits in 24 hours"),
    ("SESSION_IDLE_MINUTES", f"{settings.session_idle_minutes} minutes"),
    ("DASHBOARD_ADDRESS", settings.dashboard_address),
    ("DASHBOARD_TRUSTED_PROXIES", str(settings.dashboard_trusted_proxies)),
    ("BILLING_API_TOKENS", ", ".join(f"{name} {mask_secret(token)}" for name, token in settings.api_tokens.items())
     or "(not set)"),
    ("API_HOST / API_PORT", "{}:{}".format(*settings.api_listener) if settings.api_listener_separate
     else "(the webhook listener)"),
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

st.caption("Operators, their sign-ins and the changes made to them: the Operators page (admins).")
