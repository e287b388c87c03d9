"""The catalog in Stripe: create the products and prices once (found again by lookup key), write
their IDs into config/.env, and check the configured prices against Stripe."""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import stripe

from .catalog import CATALOG, CatalogItem
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
                results.append(SyncedPrice(item.key, existing.id, created=False))
                continue
            product_id = _ensure_product(client, item)
            price = client.v1.prices.create(params=_price_params(item, product_id, transfer=existing is not None))
            note = f"replaces {existing.id}, which {'; '.join(drift)}" if existing is not None else ""
            results.append(SyncedPrice(item.key, price.id, created=True, note=note))
    return results


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

