"""CLI: `refund`, `expiring`, and `replay EVENT_ID --dry-run` (registered by cli.build_parser).

    python -m billing_core refund PAYMENT [--amount CENTS] [--reason TEXT] --operator NAME [--dry-run] [--json]
    python -m billing_core expiring --days 7 [--json]
"""
from __future__ import annotations

import json
import sys

from . import db
from .cli_common import CommandError
from .settings import get_settings


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, default=str, sort_keys=True) + "\n")


def _one_line(outcome) -> str:
    data = outcome.as_dict()
    money = f"{data['amount']} {data['currency'].upper()} cents"
    flag = " and flagged" if data["flagged_after"] else ""
    head = (f"refund {data['refund']} of {money} of {data['payment']} created; pending until Stripe's "
            "charge.refunded arrives" if data["refund"] else f"dry run: refunding {money} of {data['payment']}")
    return (f"{head}: takes back {data['credits_taken_back']} credits of {data['user_id']}, balance "
            f"{data['balance_before']} -> {data['balance_after']}{flag}")


def cmd_refund(args) -> int:
    from .refunds import RefundRefused, create_refund, parse_amount, preview_refund
    from .stripe_client import StripeProblem

    settings = get_settings()
    db.ensure_schema_current(settings.database_url)
    engine = db.get_engine(settings.database_url)
    try:
        amount = parse_amount(args.amount)
        if args.dry_run:
            outcome = preview_refund(payment_ref=args.payment, amount=amount, engine=engine, settings=settings)
        else:
            outcome = create_refund(payment_ref=args.payment, amount=amount, reason=args.reason,
                                    operator=args.operator, engine=engine, settings=settings)
    except (RefundRefused, StripeProblem) as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        _print_json(outcome.as_dict())
    else:
        print(_one_line(outcome))
    return 0


def cmd_expiring(args) -> int:
    from .expiring import expiring_credits

    settings = get_settings()
    db.ensure_schema_current(settings.database_url)
    with db.read_session(db.get_engine(settings.database_url)) as session:
        report = expiring_credits(session, days=args.days, tz_name=settings.operator_timezone)
    if args.json:
        _print_json(report.as_dict())
        return 0
    print(f"{report.total:,} subscription credits of {report.account_count:,} account(s) expire unspent "
          f"in the next {report.days} day(s)")
    for row in report.accounts[:args.limit]:
        print(f"  {row['credits']:>10,}  {row['user_id']}  first on {row['expires_at'].strftime('%Y-%m-%d %H:%M')} UTC")
    return 0


def cmd_replay_dry_run(args) -> int:
    """replay EVENT_ID... --dry-run: what reprocessing would change; nothing is committed."""
    from .events import UnknownEvent
    from .previews import describe, preview_event

    if args.failed:
        raise CommandError("--dry-run previews named events; it can't be combined with --failed")
    if not args.event_ids:
        raise CommandError("give the EVENT_ID to preview")
    settings = get_settings()
    db.ensure_schema_current(settings.database_url)
    engine = db.get_engine(settings.database_url)
    previews = []
    for event_id in args.event_ids:
        try:
            previews.append(preview_event(event_id.strip(), assigned_user_id=args.user, engine=engine,
                                          settings=settings))
        except UnknownEvent as exc:
            raise CommandError(str(exc)) from None
    if args.json:
        _print_json(previews[0].as_dict() if len(previews) == 1 else {"results": [p.as_dict() for p in previews]})
    else:
        for preview in previews:
            print("\n".join(describe(preview)))
    return 0


def _days(text: str) -> int:
    from .expiring import check_days

    try:
        return check_days(int(text))
    except ValueError as exc:
        import argparse

        raise argparse.ArgumentTypeError(str(exc) if "days" in str(exc) else f"not a whole number: {text!r}")


def register(sub) -> None:
    p = sub.add_parser("refund", help="refund a payment in Stripe (its credits are taken back when "
                                      "charge.refunded arrives); --dry-run shows what it would take back")
    p.add_argument("payment", metavar="PAYMENT", help="the payment's cs_..., in_..., pi_... or ch_... id")
    p.add_argument("--amount", metavar="CENTS", help="minor units to refund (default: what is left)")
    p.add_argument("--reason", help="why (kept in the refund's metadata)")
    p.add_argument("--operator", required=True, help="who is refunding (kept in the refund's metadata)")
    p.add_argument("--dry-run", action="store_true", help="show the credits it would take back; refund nothing")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_refund)

    p = sub.add_parser("expiring", help="subscription credits that will expire unspent in the next days")
    p.add_argument("--days", type=_days, default=7, help="the window, 1-366 days (default 7)")
    p.add_argument("--limit", type=int, default=20, help="accounts listed (text output; --json lists all)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_expiring)
