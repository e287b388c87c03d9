"""`python -m billing_core ...`: every refusal prints one line on stderr and exits non-zero;
`--json` prints exactly one JSON object on stdout."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from . import (checkout_cli, db, ledger, operators_cli, reconcile_cli, support_cli,  # commands kept beside their code
               systemd_units, webhooks_cli)
from .cli_common import CommandError
from .models import utcnow
from .settings import check_config, get_settings, mask_url_password

log = logging.getLogger("billing_core")


EXIT_MISMATCHES = 3  # check-ledger found lots or totals that don't match the entries


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default prints the whole usage block
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, default=str, sort_keys=True) + "\n")


def _ready_database(url: str | None = None) -> str:
    url = url or get_settings().database_url
    db.ensure_schema_current(url)
    return url


# --- commands -----------------------------------------------------------------------------

def cmd_init_db(args) -> int:
    url = args.database_url or get_settings().database_url
    revision = db.migrate(url)
    print(f"database {mask_url_password(url)} is at the latest schema ({revision})")
    return 0


def cmd_check_config(args) -> int:
    settings = get_settings()
    problems = check_config(settings)
    endpoint_lines = []
    if args.stripe:
        from .api_versions import check_webhook_endpoints
        from .catalog_sync import check_portal_against_stripe, check_prices_against_stripe
        price_problems = check_prices_against_stripe(settings)
        problems += price_problems
        if not any(p.setting == "STRIPE_SECRET_KEY" for p in price_problems):  # no key: said once already
            problems += check_portal_against_stripe(settings)
        endpoints = check_webhook_endpoints(settings)
        endpoint_lines, problems = endpoints.lines(), problems + endpoints.problems
    found: list[str] = []
    if args.database:
        found, database_problems = _check_database(settings, args)
        problems += database_problems
    errors = [p for p in problems if p.level == "error"]
    mode = "demo mode (no Stripe key, data/demo.db)" if settings.demo_mode else f"{settings.stripe_mode} mode"
    print(f"configuration from {settings.env_file}: {mode}")
    for line in endpoint_lines + found:
        print(f"  {line}")
    for problem in problems:
        print(f"  {problem}")
    if not problems:
        print("  no problems found")
    print(f"{len(errors)} error(s), {len(problems) - len(errors)} warning(s)")
    return 1 if errors else 0


def _check_database(settings, args):
    from dataclasses import replace

    from .connection_budget import check_database

    for name, low in (("processes", 1), ("workers", 1), ("dashboards", 0)):
        value = getattr(args, name)
        if value is not None and not low <= value <= 10_000:
            raise CommandError(f"--{name} must be between {low} and 10000, not {value}")
    if args.workers:
        settings = replace(settings, webhook_workers=args.workers)
    return check_database(settings, processes=args.processes, dashboards=args.dashboards)


def cmd_demo_data(args) -> int:
    from demo_data import fill_demo_database  # outside the domain core; imported only for this command

    summary = fill_demo_database(database_url=args.database_url, scale=args.scale, if_empty=args.if_empty)
    print(summary)
    return 0


def cmd_balance(args) -> int:
    _ready_database()
    with db.read_session() as session:
        summary = ledger.account_summary(session, args.user)
    data = summary.as_dict()
    if args.json:
        _print_json(data)
        return 0
    print(f"{data['user_id']}: {data['balance']} credits ({data['spendable_balance']} spendable), "
          f"tier {data['tier']}, subscription {data['subscription_status'] or 'none'}"
          + (f", FLAGGED: {data['flag_reason']}" if data["flagged"] else ""))
    for row in data["breakdown"]:
        expiry = f"expires {row['expires_at']}" if row["expires_at"] else "never expires"
        frozen = " (frozen: subscription past due)" if row["frozen"] else ""
        print(f"  {row['credits']:>8} {row['source']:<13} {expiry}{frozen}")
    return 0


def cmd_adjust(args) -> int:
    _ready_database()
    credits = ledger.parse_credits(args.credits, allow_negative=True)
    with db.write_session() as session:
        ledger.adjust(session, user_id=args.user, credits=credits, reason=args.reason, operator=args.operator,
                      allow_negative=args.allow_negative)
        new_balance = ledger.balance(session, ledger.check_user_id(args.user))
    print(f"adjusted {args.user.strip()} by {credits:+d} credits; balance is now {new_balance}")
    return 0


def cmd_consume(args) -> int:
    _ready_database()
    credits = ledger.parse_credits(args.credits, allow_negative=False)
    with db.write_session() as session:
        result = ledger.consume(session, user_id=args.user, credits=credits, reference=args.reference)
    if args.json:
        _print_json(result.as_dict() | {"replayed": result.replayed})
    else:
        again = " (already applied earlier; nothing more spent)" if result.replayed else ""
        print(f"spent {result.credits} credits of {result.user_id}; balance is now {result.balance}{again}")
    return 0


def cmd_check_ledger(args) -> int:
    from .ledger_check import check_ledger, format_check

    _ready_database()
    with db.read_session() as session:
        result = check_ledger(session)
    if args.json:
        _print_json(result.as_dict())
    else:
        print(format_check(result))
    return 0 if result.ok else EXIT_MISMATCHES


LAPSED_BATCH = 200  # accounts per write transaction: short turns for the write lock


def cmd_close_lapsed(args) -> int:
    _ready_database()
    engine = db.get_engine()
    now = utcnow()
    with db.read_session(engine) as session:
        users = ledger.users_with_lapsed_lots(session, now=now)
    lots = credits = 0
    for start in range(0, len(users), LAPSED_BATCH):
        with db.write_session(engine) as session:
            for user_id in users[start:start + LAPSED_BATCH]:
                closed, lapsed = ledger.close_lapsed_lots(session, user_id=user_id, now=now)
                lots, credits = lots + closed, credits + lapsed
    if args.json:
        _print_json({"accounts": len(users), "lots_closed": lots, "credits_lapsed": credits})
    else:
        print(f"closed {lots:,} expired lot(s) of {len(users):,} account(s); {credits:,} unspent credits had lapsed "
              "(balances were already without them)")
    return 0


# --- parser -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m billing_core", description="DevOps Agent billing console")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("init-db", help="bring the database to the latest schema")
    p.add_argument("--database-url", help="a database other than the configured one")
    p.set_defaults(func=cmd_init_db)

    p = sub.add_parser("check-config", help="report every configuration problem at once")
    p.add_argument("--stripe", action="store_true", help="also check each configured price and the customer portal "
                   "configuration against Stripe, and list the webhook endpoints (API version, events)")
    p.add_argument("--database", action="store_true",
                   help="also connect to the database: schema, and on PostgreSQL whether every process's pool fits "
                        "the server's max_connections")
    p.add_argument("--processes", type=int, default=1,
                   help="with --database: sidecar processes using this database, on all hosts (default 1)")
    p.add_argument("--workers", type=int, help="with --database: workers per sidecar (default WEBHOOK_WORKERS)")
    p.add_argument("--dashboards", type=int, default=1,
                   help="with --database: dashboard processes using this database (default 1)")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("demo-data", help="fill the demo database (data/demo.db) with sample customers")
    p.add_argument("--scale", choices=("small", "large"), default="small")
    p.add_argument("--database-url", help="fill this database instead of data/demo.db")
    p.add_argument("--if-empty", action="store_true", help="do nothing when demo accounts already exist")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("balance", help="a user's balance and what it is made of")
    p.add_argument("user")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_balance)

    p = sub.add_parser("adjust", help="add or remove credits by hand (a reason is required)")
    p.add_argument("user")
    p.add_argument("credits", help="whole credits, e.g. 50 or -20")
    p.add_argument("--reason", required=True)
    p.add_argument("--operator", required=True)
    p.add_argument("--allow-negative", action="store_true", help="allow the balance to go below zero")
    p.set_defaults(func=cmd_adjust)

    p = sub.add_parser("consume", help="spend credits once per reference")
    p.add_argument("user")
    p.add_argument("credits")
    p.add_argument("--reference", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_consume)

    p = sub.add_parser("check-ledger", help="check the credit lots and account totals against the ledger entries",
                       description="Verify that each credit lot's remaining and held credits equal the sum of its "
                                   "entries and that each account's balance and debt equal its open lots and its "
                                   "entries without a lot. Reports every mismatch and repairs nothing. Exit code 0: "
                                   "all match; 3: mismatches listed; 1: refused or failed.")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_check_ledger)

    p = sub.add_parser("close-lapsed", help="close expired credit lots of accounts nobody has written to since",
                       description="Close every open credit lot whose expiry time has passed, as the account's next "
                                   "write would. Balances don't change (reads already leave such lots out); the open "
                                   "lots and their index stay to the lots that count. Safe to run at any time, e.g. "
                                   "daily.")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_close_lapsed)

    for module in (checkout_cli, webhooks_cli, reconcile_cli, operators_cli, systemd_units, support_cli):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (CommandError, ledger.LedgerError, db.SchemaOutOfDate, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for the operator; details with -v
        log.debug("unexpected error", exc_info=True)
        print(f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": "),
              file=sys.stderr)
        return 1
