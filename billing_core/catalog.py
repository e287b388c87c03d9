"""What we sell: three monthly plans and four one-time credit packs."""
from __future__ import annotations

from dataclasses import dataclass

from .settings import PRICE_SETTINGS, Settings


class UnknownItem(ValueError):
    pass


class UnknownPrice(ValueError):
    pass


@dataclass(frozen=True)
class CatalogItem:
    key: str
    name: str
    kind: str  # "plan" (monthly subscription) or "pack" (one-time)
    credits: int
    amount_cents: int
    currency: str
    lookup_key: str

    @property
    def recurring(self) -> bool:
        return self.kind == "plan"

    @property
    def price_setting(self) -> str:
        return PRICE_SETTINGS[self.key]


PLANS = (
    CatalogItem("starter", "Starter", "plan", 100, 999, "usd", "starter_monthly"),
    CatalogItem("professional", "Professional", "plan", 500, 2999, "usd", "professional_monthly"),
    CatalogItem("business", "Business", "plan", 2000, 9999, "usd", "business_monthly"),
)
PACKS = (
    CatalogItem("pack_100", "100 credits", "pack", 100, 1000, "usd", "pack_100"),
    CatalogItem("pack_250", "250 credits", "pack", 250, 2000, "usd", "pack_250"),
    CatalogItem("pack_500", "500 credits", "pack", 500, 3500, "usd", "pack_500"),
    CatalogItem("pack_1000", "1000 credits", "pack", 1000, 6000, "usd", "pack_1000"),
)
CATALOG: dict[str, CatalogItem] = {item.key: item for item in PLANS + PACKS}
TIERS = tuple(p.key for p in PLANS)


def get_item(key: str) -> CatalogItem:
    try:
        return CATALOG[key]
    except KeyError:
        raise UnknownItem(f"unknown item {key!r}; choose one of: {', '.join(CATALOG)}") from None


def price_id_for(key: str, settings: Settings) -> str:
    item = get_item(key)
    price_id = settings.price_id(key)
    if not price_id:
        raise UnknownPrice(f"no price configured for {item.key}: set {item.price_setting} in config/.env "
                           "or run `python -m billing_core sync-catalog --write-env`")
    return price_id


def item_for_price(price_id: str, settings: Settings) -> CatalogItem:
    for key, configured in settings.price_ids.items():
        if configured and configured == price_id:
            return CATALOG[key]
    raise UnknownPrice(f"price {price_id!r} is not one of the configured catalog prices")


def find_item_for_price(price_id: str | None, settings: Settings) -> CatalogItem | None:
    if not price_id:
        return None
    try:
        return item_for_price(price_id, settings)
    except UnknownPrice:
        return None


def allowance(tier: str) -> int:
    """Monthly credits for a plan key; 0 for 'none'."""
    item = CATALOG.get(tier)
    return item.credits if item and item.kind == "plan" else 0
