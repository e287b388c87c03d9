"""`serve-webhooks [--host] [--port]`, `replay EVENT_ID... [--user USER]`, `replay --failed`."""
from __future__ import annotations

import getpass
import json
import sys

from . import db, events
from .cli_common import CommandError
from .settings import get_settings


def cmd_serve_webhooks(args) -> int:
    import uvicorn

    from .webapp import create_app

    settings = get_settings()
    host = args.host or settings.webhook_host
    port = args.port or settings.webhook_port
    app = create_app(settings)  # raises SchemaOutOfDate naming init-db, printed as one line
    if not settings.webhook_secrets:
        print("warning: STRIPE_WEBHOOK_SECRET is not set: every webhook delivery will be refused", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
    return 0


def _print_result(result: events.IngestResult, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result.as_dict(), sort_keys=True) + "\n")
        return
    detail = f": {result.error}" if result.error else ""
    who = f" (user {result.user_id})" if result.user_id else ""
    print(f"{result.event_id}: {result.status}{who}{detail}")


def cmd_replay(args) -> int:
    settings = get_settings()
    db.ensure_schema_current(settings.database_url)
    engine = db.get_engine(settings.database_url)
    if args.failed == bool(args.event_ids):
        raise CommandError("give either EVENT_ID... or --failed")
    if args.user and args.failed:
        raise CommandError("--user assigns a user to named events; it can't be combined with --failed")
    if args.failed:
        results = events.replay_failed(settings=settings, engine=engine, operator=args.operator)
        if not results and not args.json:
            print("no failed events to replay")
    else:
        results = []
        for event_id in args.event_ids:
            try:
                results.append(events.reprocess(event_id.strip(), assigned_user_id=args.user, settings=settings,
                                                engine=engine, operator=args.operator))
            except events.UnknownEvent as exc:
                raise CommandError(str(exc)) from None
    if args.json:
        sys.stdout.write(json.dumps({"results": [r.as_dict() for r in results]}, sort_keys=True) + "\n")
    else:
        for result in results:
            _print_result(result, False)
    return 1 if any(r.status == "failed" for r in results) else 0


def register(sub) -> None:
    p = sub.add_parser("serve-webhooks", help="run the webhook sidecar (Stripe events, checkout pages, credits API)")
    p.add_argument("--host", help="address to listen on (default WEBHOOK_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default WEBHOOK_PORT, 5000)")
    p.set_defaults(func=cmd_serve_webhooks)

    p = sub.add_parser("replay", help="reprocess stored Stripe events through the same idempotent path")
    p.add_argument("event_ids", nargs="*", metavar="EVENT_ID")
    p.add_argument("--failed", action="store_true", help="every event that failed (or was left unprocessed)")
    p.add_argument("--user", help="assign this user to the named events (for events kept as needs-attention)")
    p.add_argument("--operator", default=getpass.getuser(), help="who is replaying (recorded on each event; "
                                                                 "default: the login name)")
    p.add_argument("--json", action="store_true", help='print one JSON object: {"results": [...]}')
    p.set_defaults(func=cmd_replay)
