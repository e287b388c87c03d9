"""The benchmark's yardstick: the least a webhook receiver can do and still be correct at the door.

It verifies the Stripe signature on the raw body (the same library call and tolerance as the sidecar),
parses the JSON, and stores the raw event in SQLite (INSERT OR IGNORE on the event id, WAL,
synchronous=NORMAL, like the sidecar's engine); no ledger, no handlers, no ORM.

    BARE_DB=/tmp/bare.db STRIPE_WEBHOOK_SECRET=whsec_... python -m uvicorn bench.bare_receiver:app
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time

import stripe
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

DB_PATH = os.environ.get("BARE_DB", "bare_events.db")
SECRETS = [s.strip() for s in os.environ.get("STRIPE_WEBHOOK_SECRET", "").split(",") if s.strip()]
TOLERANCE = 300
_local = threading.local()


def connection() -> sqlite3.Connection:
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = sqlite3.connect(DB_PATH, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("CREATE TABLE IF NOT EXISTS raw_event (id TEXT PRIMARY KEY, type TEXT NOT NULL, "
                     "payload TEXT NOT NULL, received_at REAL NOT NULL)")
        _local.conn = conn
    return conn


def store(event_id: str, event_type: str, payload: str) -> None:
    conn = connection()
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("INSERT OR IGNORE INTO raw_event (id, type, payload, received_at) VALUES (?, ?, ?, ?)",
                     (event_id, event_type, payload, time.time()))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def verified(text: str, header: str) -> bool:
    for secret in SECRETS:
        try:
            stripe.WebhookSignature.verify_header(text, header, secret, tolerance=TOLERANCE)
            return True
        except stripe.SignatureVerificationError:
            continue
    return False


async def webhook(request: Request):
    body = await request.body()
    header = request.headers.get("stripe-signature", "")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return JSONResponse({"error": "body is not UTF-8"}, status_code=400)
    if not header or not verified(text, header):
        return JSONResponse({"error": "invalid signature"}, status_code=400)
    try:
        event = json.loads(text)
        event_id, event_type = str(event["id"]), str(event["type"])
    except (ValueError, KeyError, TypeError):
        return JSONResponse({"error": "not an event"}, status_code=400)
    await run_in_threadpool(store, event_id, event_type, text)
    return JSONResponse({"received": True, "event_id": event_id})


async def healthz(request: Request):
    return JSONResponse({"database": "ok"})


app = Starlette(routes=[Route("/api/stripe/webhook", webhook, methods=["POST"]),
                        Route("/healthz", healthz, methods=["GET"])])


def main() -> None:
    """Serve it with the sidecar's uvicorn settings (webhooks_cli.cmd_serve_webhooks)."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False)


if __name__ == "__main__":
    main()
