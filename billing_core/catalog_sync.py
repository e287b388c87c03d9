"""The catalog in Stripe: create the products and prices once (found again by lookup key), write
their IDs into config/.env, and check the configured prices against Stripe.

The catalog also owns the customer portal configuration (found again by its metadata): customers switch
among the three plans, upgrades are invoiced at once (`always_invoice`, so an upgrade's top-up stands on
money collected at the change), downgrades are scheduled for the period's end, and cancellation takes
effect at the period's end.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import stripe

from .catalog import CATALOG, PLANS, CatalogItem
from .settings import PRICE_SETTINGS, Problem, Settings, get_settings
from .stripe_client import (StripeNotConfigured, describe_stripe_error, get_stripe_client, make_stripe_client,
                            stripe_errors)

PRODUCT_ID_PREFIX = "devops_agent_"  # products get fixed ids, so a rerun after a failure finds them again


@dataclass(frozen=True)
class SyncedPrice:
    item: str
    price_id: str
    created: bool
    note: str = ""  # why a new price was created although one had the lookup key
    product_id: str = ""


def price_drift(price, item: CatalogItem) -> list[str]:
    """How a Stripe price (a StripeObject or a dict) differs from the catalog item (empty when it matches)."""
    price = _as_dict(price)
    drift = []
    if not price.get("active"):
        drift.append("is archived (inactive)")
    recurring = price.get("recurring") or {}
    if item.kind == "plan":
        if price.get("type") != "recurring":
            drift.append("is a one-time price, the catalog says monthly recurring")
        elif recurring.get("interval") != "month" or int(recurring.get("interval_count") or 1) != 1:
            drift.append(f"recurs every {recurring.get('interval_count', 1)} {recurring.get('interval')}(s), "
                         "the catalog says monthly")
    elif price.get("type") != "one_time":
        drift.append("is a recurring price, the catalog says one-time")
    if price.get("unit_amount") != item.amount_cents:
        drift.append(f"costs {price.get('unit_amount')} (minor units), the catalog says {item.amount_cents}")
    if (price.get("currency") or "").lower() != item.currency:
        drift.append(f"is in {price.get('currency')}, the catalog says {item.currency}")
    return drift


def _as_dict(obj) -> dict:
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)  # StripeObject is not a dict in stripe 16


def _price_params(item: CatalogItem, product_id: str, *, transfer: bool) -> dict:
    params = {"product": product_id, "unit_amount": item.amount_cents, "currency": item.currency,
              "lookup_key": item.lookup_key, "metadata": {"item": item.key, "credits": str(item.credits)},
              "nickname": item.name}
    if item.kind == "plan":
        params["recurring"] = {"interval": "month", "interval_count": 1}
    if transfer:
        params["transfer_lookup_key"] = True
    return params


def _ensure_product(client: stripe.StripeClient, item: CatalogItem) -> str:
    product_id = PRODUCT_ID_PREFIX + item.key
    try:
        product = client.v1.products.retrieve(product_id)
    except stripe.InvalidRequestError as exc:
        if exc.code != "resource_missing":
            raise
        product = client.v1.products.create(params={
            "id": product_id, "name": f"DevOps Agent {item.name}",
            "metadata": {"item": item.key, "credits": str(item.credits), "kind": item.kind}})
        return product.id
    if not product.active:
        client.v1.products.update(product_id, params={"active": True})
    return product.id


def sync_catalog(client: stripe.StripeClient | None = None) -> list[SyncedPrice]:
    """Make Stripe hold one active price per catalog item under its lookup key; a second run creates nothing."""
    client = client or get_stripe_client()
    items = list(CATALOG.values())
    results = []
    with stripe_errors("syncing the catalog with Stripe"):
        listed = client.v1.prices.list(params={"lookup_keys": [i.lookup_key for i in items], "limit": 100})
        by_lookup_key = {p.lookup_key: p for p in listed.data}
        for item in items:
            existing = by_lookup_key.get(item.lookup_key)
            drift = price_drift(existing, item) if existing is not None else []
            if existing is not None and not drift:
                results.append(SyncedPrice(item.key, existing.id, created=False, product_id=_id(existing.product)))
                continue
            product_id = _ensure_product(client, item)
            price = client.v1.prices.create(params=_price_params(item, product_id, transfer=existing is not None))
            note = f"replaces {existing.id}, which {'; '.join(drift)}" if existing is not None else ""
            results.append(SyncedPrice(item.key, price.id, created=True, note=note, product_id=_id(price.product)))
    return results


def _id(value) -> str:
    """An id, or the `id` of an expanded object."""
    if isinstance(value, str):
        return value
    return str(_as_dict(value).get("id") or "") if value is not None else ""


_ENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=")


def write_env_prices(path: str | Path, price_ids: dict[str, str]) -> Path:
    """Set STRIPE_PRICE_* in an env file, keeping every other line as it was (atomic replace)."""
    path = Path(path)
    wanted = {PRICE_SETTINGS[key]: value for key, value in price_ids.items()}
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    written = set()
    out = []
    for line in lines:
        match = _ENV_LINE.match(line)
        name = match.group(1) if match else None
        if name in wanted:
            if name not in written:
                out.append(f"{name}={wanted[name]}\n")
                written.add(name)
            continue  # a duplicate assignment of the same name would override ours
        out.append(line)
    missing = [name for name in wanted if name not in written]
    if missing:
        if out and not out[-1].endswith("\n"):
            out[-1] += "\n"
        out.extend(f"{name}={wanted[name]}\n" for name in missing)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".env.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write("".join(out))
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def check_prices_against_stripe(settings: Settings | None = None, *, client=None) -> list[Problem]:
    """Each configured price checked against Stripe; drift is reported by item."""
    settings = settings or get_settings()
    try:
        client = client or make_stripe_client(settings)
    except StripeNotConfigured as exc:
        return [Problem("error", "STRIPE_SECRET_KEY", f"--stripe: {exc}")]
    problems = []
    for item in CATALOG.values():
        price_id = settings.price_id(item.key)
        if not price_id.startswith("price_"):
            continue  # missing or malformed: check_config already says so
        try:
            price = _as_dict(client.v1.prices.retrieve(price_id))
        except stripe.InvalidRequestError as exc:
            if exc.code == "resource_missing":
                problems.append(Problem("error", item.price_setting, f"{item.key}: price {price_id} does not exist "
                                        f"in this Stripe account ({settings.stripe_mode} mode)"))
            else:
                problems.append(Problem("error", item.price_setting,
                                        f"{item.key}: {describe_stripe_error(exc, settings=settings)}"))
            continue
        except stripe.StripeError as exc:  # auth, network, rate limit: the same for every price
            problems.append(Problem("error", "STRIPE_SECRET_KEY", f"--stripe: "
                                    f"{describe_stripe_error(exc, settings=settings)}"))
            break
        for drift in price_drift(price, item):
            problems.append(Problem("error", item.price_setting, f"{item.key}: price {price_id} {drift}"))
        if bool(price.get("livemode")) != settings.livemode:
            price_mode = "live" if price.get("livemode") else "test"
            problems.append(Problem("error", item.price_setting, f"{item.key}: price {price_id} is a {price_mode}-"
                                    f"mode price but STRIPE_SECRET_KEY is a {settings.stripe_mode}-mode key"))
    return problems



# --- the customer portal configuration ------------------------------------------------------

PORTAL_METADATA = {"managed_by": "billing_core", "purpose": "plan_changes"}
PORTAL_SETTING = "customer portal"  # what check-config names for portal problems (there is no setting)


@dataclass(frozen=True)
class PlanPrice:
    item: str
    product_id: str
    price_id: str


@dataclass(frozen=True)
class SyncedPortal:
    configuration_id: str
    action: str  # "created", "updated" or "unchanged"
    drift: tuple[str, ...] = ()  # what an update corrected


def portal_params(plan_prices: list[PlanPrice], settings: Settings) -> dict:
    """The customer portal configuration for the catalog's plans: a pure function of the plan prices."""
    return {
        "business_profile": {"headline": "DevOps Agent: change or cancel your plan"},
        "default_return_url": settings.base_url,
        "features": {
            "subscription_update": {
                "enabled": True,
                "default_allowed_updates": ["price"],
                "products": [{"product": p.product_id, "prices": [p.price_id]} for p in plan_prices],
                "proration_behavior": "always_invoice",
                "schedule_at_period_end": {"conditions": [{"type": "decreasing_item_amount"}]},
            },
            "subscription_cancel": {"enabled": True, "mode": "at_period_end"},
            "payment_method_update": {"enabled": True},
            "invoice_history": {"enabled": True},
        },
        "metadata": dict(PORTAL_METADATA),
    }


def portal_drift(configuration, plan_prices: list[PlanPrice]) -> list[str]:
    """How a portal configuration differs from what the catalog needs (empty when it matches)."""
    configuration = _as_dict(configuration)
    features = configuration.get("features") or {}
    update = features.get("subscription_update") or {}
    cancel = features.get("subscription_cancel") or {}
    drift = []
    if not configuration.get("active"):
        drift.append("is inactive")
    if not update.get("enabled"):
        drift.append("does not let customers switch plans")
    elif "price" not in (update.get("default_allowed_updates") or []):
        drift.append("does not let customers change their plan's price")
    offered = {p.get("product"): sorted(p.get("prices") or []) for p in update.get("products") or []}
    wanted = {p.product_id: [p.price_id] for p in plan_prices}
    if offered != wanted:
        names = {p.product_id: p.item for p in plan_prices}
        drift.append(f"offers {_offer_text(offered, names)}, the catalog's plans are {_offer_text(wanted, names)}")
    if update.get("proration_behavior") != "always_invoice":
        drift.append(f"prorates plan changes with {update.get('proration_behavior')!r}, the catalog needs "
                     "'always_invoice' (upgrades invoiced at once)")
    conditions = {c.get("type") for c in (update.get("schedule_at_period_end") or {}).get("conditions") or []}
    if "decreasing_item_amount" not in conditions:
        drift.append("applies downgrades at once, the catalog schedules them for the period's end")
    if not cancel.get("enabled"):
        drift.append("does not let customers cancel")
    elif cancel.get("mode") != "at_period_end":
        drift.append(f"cancels {cancel.get('mode')}, the catalog cancels at the period's end")
    return drift


def _offer_text(offer: dict, names: dict[str, str]) -> str:
    """Plans by name in catalog order, then products the catalog doesn't know, by id."""
    order = list(names)
    ranked = sorted(offer.items(), key=lambda pair: (order.index(pair[0]) if pair[0] in names else len(order),
                                                     str(pair[0])))
    return "; ".join(f"{names.get(product, product)} ({', '.join(prices)})" for product, prices in ranked) or "none"


def _digest(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:32]


def find_portal_configuration(client: stripe.StripeClient) -> dict | None:
    """The configuration sync-catalog made (by its metadata), newest first; inactive ones too."""
    params: dict = {"limit": 100}
    while True:
        page = client.v1.billing_portal.configurations.list(params=params)
        for configuration in page.data:
            found = _as_dict(configuration)
            metadata = found.get("metadata") or {}
            if all(metadata.get(key) == value for key, value in PORTAL_METADATA.items()):
                return found
        if not page.has_more or not page.data:
            return None
        params = {"limit": 100, "starting_after": page.data[-1].id}


def sync_portal_configuration(plan_prices: list[PlanPrice], *, client: stripe.StripeClient | None = None,
                              settings: Settings | None = None) -> SyncedPortal:
    """Create the catalog's portal configuration, or update the one found by its metadata when it drifted."""
    settings = settings or get_settings()
    client = client or get_stripe_client()
    params = portal_params(plan_prices, settings)
    with stripe_errors("syncing the customer portal configuration with Stripe", settings=settings):
        found = find_portal_configuration(client)
        if found is None:
            created = client.v1.billing_portal.configurations.create(
                params=params, options={"idempotency_key": f"portal-configuration-{_digest(params)}"})
            return SyncedPortal(created.id, "created")
        drift = portal_drift(found, plan_prices)
        if found.get("default_return_url") != settings.base_url:
            drift.append(f"returns customers to {found.get('default_return_url')}, BASE_URL is {settings.base_url}")
        if not drift:
            return SyncedPortal(found["id"], "unchanged")
        update = {**params, "active": True}
        client.v1.billing_portal.configurations.update(
            found["id"], params=update,
            options={"idempotency_key": f"portal-configuration-{found['id']}-{_digest(update)}"})
        return SyncedPortal(found["id"], "updated", tuple(drift))


def plan_prices_of(results: list[SyncedPrice]) -> list[PlanPrice]:
    by_item = {row.item: row for row in results}
    return [PlanPrice(plan.key, by_item[plan.key].product_id, by_item[plan.key].price_id) for plan in PLANS]


def check_portal_against_stripe(settings: Settings | None = None, *, client=None) -> list[Problem]:
    """The portal configuration sync-catalog made, checked against the configured plan prices."""
    settings = settings or get_settings()
    try:
        client = client or make_stripe_client(settings)
    except StripeNotConfigured as exc:
        return [Problem("error", "STRIPE_SECRET_KEY", f"--stripe: {exc}")]
    try:
        plan_prices = []
        for plan in PLANS:
            price_id = settings.price_id(plan.key)
            if not price_id.startswith("price_"):
                return []  # check_config already names the missing plan price; nothing to compare with
            try:
                price = _as_dict(client.v1.prices.retrieve(price_id))
            except stripe.InvalidRequestError as exc:
                if exc.code == "resource_missing":
                    return []  # check_prices_against_stripe reports the missing price
                raise
            plan_prices.append(PlanPrice(plan.key, _id(price.get("product")), price_id))
        found = find_portal_configuration(client)
    except stripe.StripeError as exc:
        return [Problem("error", PORTAL_SETTING, f"--stripe: {describe_stripe_error(exc, settings=settings)}")]
    if found is None:
        return [Problem("error", PORTAL_SETTING, "Stripe holds no portal configuration made by sync-catalog, so "
                        "portal-link can't offer plan changes; run: python -m billing_core sync-catalog")]
    return [Problem("error", PORTAL_SETTING, f"configuration {found['id']} {drift}")
            for drift in portal_drift(found, plan_prices)]
