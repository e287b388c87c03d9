"""CLI: checkout-link, portal-link, sync-catalog (registered by cli.build_parser)."""
from __future__ import annotations

import json
import sys

from . import db
from .catalog import CATALOG
from .settings import get_settings


def cmd_checkout_link(args) -> int:
    from .checkout import create_checkout_link

    settings = get_settings()
    db.ensure_schema_current(settings.database_url)
    link = create_checkout_link(user_id=args.user, item=args.item, email=args.email, operator=args.operator,
                                settings=settings, engine=db.get_engine(settings.database_url))
    if args.json:
        sys.stdout.write(json.dumps(link.as_dict(), sort_keys=True) + "\n")
        return 0
    print(link.url)
    again = " (issued earlier in this window; the same link)" if link.reused else ""
    print(f"checkout link for {link.user_id}: {link.item}, session {link.session_id}, "
          f"expires {link.expires_at.isoformat()}{again}", file=sys.stderr)
    return 0


def cmd_portal_link(args) -> int:
    from .checkout import create_portal_link

    settings = get_settings()
    db.ensure_schema_current(settings.database_url)
    print(create_portal_link(user_id=args.user, settings=settings, engine=db.get_engine(settings.database_url)))
    return 0


def cmd_sync_catalog(args) -> int:
    from .catalog_sync import plan_prices_of, sync_catalog, sync_portal_configuration, write_env_prices

    settings = get_settings()
    results = sync_catalog()
    for row in results:
        what = "created" if row.created else "exists "
        note = f"  ({row.note})" if row.note else ""
        print(f"{what} {CATALOG[row.item].price_setting}={row.price_id}{note}")
    created = sum(r.created for r in results)
    print(f"{created} price(s) created, {len(results) - created} already in Stripe ({settings.stripe_mode} mode)")
    portal = sync_portal_configuration(plan_prices_of(results), settings=settings)
    corrected = f" (corrected: it {'; it '.join(portal.drift)})" if portal.drift else ""
    print(f"customer portal configuration {portal.configuration_id}: {portal.action}{corrected}")
    if args.write_env:
        path = write_env_prices(settings.env_file, {r.item: r.price_id for r in results})
        print(f"wrote {len(results)} price IDs to {path}")
    else:
        print("add these lines to config/.env, or rerun with --write-env")
    return 0


def register(sub) -> None:
    p = sub.add_parser("checkout-link", help="a Stripe Checkout link for a user and a plan or credit pack")
    p.add_argument("user")
    p.add_argument("item", help=", ".join(CATALOG))
    p.add_argument("--email", help="prefill the customer's email (when no Stripe customer is known)")
    p.add_argument("--operator", help="who issues the link (recorded)")
    p.add_argument("--json", action="store_true", help="print url, session_id, expires_at, item, user_id")
    p.set_defaults(func=cmd_checkout_link)

    p = sub.add_parser("portal-link", help="a Stripe customer portal link (plan changes, cancellation)")
    p.add_argument("user")
    p.set_defaults(func=cmd_portal_link)

    p = sub.add_parser("sync-catalog", help="create the plans' and packs' products and prices in Stripe")
    p.add_argument("--write-env", action="store_true", help="write the price IDs into config/.env")
    p.set_defaults(func=cmd_sync_catalog)
