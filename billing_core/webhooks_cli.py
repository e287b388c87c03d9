"""`serve-webhooks [--host] [--port] [--workers N]`, `replay EVENT_ID... [--user USER]`, `replay --failed`."""
from __future__ import annotations

import getpass
import json
import sys

from . import db, events
from .cli_common import CommandError
from .settings import get_settings


def check_workers(workers: int, *, database_url: str) -> None:
    """Several worker processes need PostgreSQL: SQLite admits one writer at a time. (A ValueError is printed
    by the CLI as one line, like any refusal.)"""
    if workers < 1 or workers > 64:
        raise ValueError(f"--workers must be between 1 and 64, not {workers}")
    if workers > 1 and database_url.startswith("sqlite"):
        raise ValueError(f"--workers {workers} needs PostgreSQL (DATABASE_URL=postgresql://...): SQLite admits "
                         "one writer at a time, so the sidecar runs one worker on it")


def cmd_serve_webhooks(args) -> int:
    import uvicorn

    from .webapp import create_api_app, create_app

    settings = get_settings()
    host = args.host or settings.webhook_host
    port = args.port or settings.webhook_port
    workers = settings.webhook_workers if args.workers is None else args.workers
    check_workers(workers, database_url=settings.database_url)
    app = create_app(settings)  # raises SchemaOutOfDate naming init-db, printed as one line
    if not settings.webhook_secrets:
        print("warning: STRIPE_WEBHOOK_SECRET is not set: every webhook delivery will be refused", file=sys.stderr)
    if not settings.api_listener_separate:
        if workers > 1:
            serve_workers(workers, host=host, port=port)
            return 0
        uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
        return 0
    if workers > 1:
        raise ValueError(f"{workers} workers with the credits API on its own listener (API_HOST/API_PORT) is not "
                         "supported yet: run one worker, or leave API_HOST/API_PORT unset")
    api_host, api_port = settings.api_listener
    if (api_host, api_port) == (host, port):
        raise ValueError(f"API_HOST/API_PORT ({api_host}:{api_port}) is the webhook listener's own address; "
                         "give the credits API another port")
    print(f"webhooks and return pages on {host}:{port}; credits API on {api_host}:{api_port}", file=sys.stderr)
    serve_listeners([(app, host, port), (create_api_app(settings, check_schema=False), api_host, api_port)])
    return 0


def serve_listeners(listeners: list[tuple]) -> None:
    """Several uvicorn servers in this one process and event loop (one schema check, one database pool);
    SIGINT/SIGTERM stop them all. Each listener serves only its own app's routes."""
    import asyncio
    import contextlib
    import signal
    import threading

    import uvicorn

    class Listener(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # one handler below stops every listener (each would replace the other's)
            yield

    servers = [Listener(uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False))
               for app, host, port in listeners]

    def stop(signum, _frame) -> None:
        for server in servers:
            server.force_exit = server.should_exit and signum == signal.SIGINT
            server.should_exit = True

    originals = {}
    if threading.current_thread() is threading.main_thread():
        originals = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        asyncio.run(_serve_all(servers))
    finally:
        for sig, handler in originals.items():
            signal.signal(sig, handler)


async def _serve_all(servers) -> None:
    import asyncio

    tasks = [asyncio.create_task(server.serve()) for server in servers]
    done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for server in servers:  # one stopped (or failed to bind): stop the others too
        server.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        task.result()


def serve_workers(workers: int, *, host: str, port: int) -> None:
    """uvicorn's supervisor with `workers` processes on one socket; it restarts a worker that dies. Each worker
    is a fresh process that builds the app from the same settings (environment and config file)."""
    import uvicorn

    db.dispose_engines()  # the schema check's connection; each worker opens its own pool
    uvicorn.run("billing_core.webapp:create_app", factory=True, workers=workers, host=host, port=port,
                log_level="info", access_log=False)


def _print_result(result: events.IngestResult, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result.as_dict(), sort_keys=True) + "\n")
        return
    detail = f": {result.error}" if result.error else ""
    who = f" (user {result.user_id})" if result.user_id else ""
    print(f"{result.event_id}: {result.status}{who}{detail}")


def cmd_replay(args) -> int:
    if args.dry_run:
        from .support_cli import cmd_replay_dry_run
        return cmd_replay_dry_run(args)
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
    p = sub.add_parser("serve-webhooks", help="run the webhook sidecar (Stripe events, checkout pages, credits API; "
                                              "the API on its own listener when API_HOST/API_PORT are set)")
    p.add_argument("--host", help="address to listen on (default WEBHOOK_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default WEBHOOK_PORT, 5000)")
    p.add_argument("--workers", type=int, help="worker processes sharing the port (default WEBHOOK_WORKERS, 1); "
                                               "more than one needs PostgreSQL")
    p.set_defaults(func=cmd_serve_webhooks)

    p = sub.add_parser("replay", help="reprocess stored Stripe events through the same idempotent path")
    p.add_argument("event_ids", nargs="*", metavar="EVENT_ID")
    p.add_argument("--failed", action="store_true", help="every event that failed (or was left unprocessed)")
    p.add_argument("--user", help="assign this user to the named events (for events kept as needs-attention)")
    p.add_argument("--operator", default=getpass.getuser(), help="who is replaying (recorded on each event; "
                                                                 "default: the login name)")
    p.add_argument("--dry-run", action="store_true", help="show what reprocessing would change (ledger entries, "
                                                          "balances, tier, payment fields); commit nothing")
    p.add_argument("--json", action="store_true", help='print one JSON object: {"results": [...]} (with --dry-run '
                                                       'and one EVENT_ID: the preview itself)')
    p.set_defaults(func=cmd_replay)
