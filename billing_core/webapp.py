"""The webhook sidecar: a Starlette app served by uvicorn (`python -m billing_core serve-webhooks`).

    POST /api/stripe/webhook   verified Stripe events (400 bad delivery, 413 too large, 500 retry later)
    GET  /healthz              {"database": "ok", "last_event_at": ..., "events": {"failed": n, "needs_attention": n},
                               "pool": {...}, "webhook_writer": {...} (SQLite)}; 503 when the database is unreachable,
                               every pooled connection is busy, or the webhook writer is stopped
    GET  /checkout/success     where Checkout sends the customer back: fulfils a paid session, shows the balance
                               (database first; Stripe at most once per session id per 30 s, on its own pool)
    GET  /checkout/cancel      says nothing was charged
    + the credits API routes (billing_core.credits_api), unless API_HOST/API_PORT give them their own
      listener (create_api_app)

Database work runs off the event loop (the thread pool; on SQLite the webhook's group writer thread,
billing_core.group_commit), so a writer waiting for a lock never blocks it.
"""
from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import AsyncIterator

from sqlalchemy import func, select
from sqlalchemy.orm import configure_mappers
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from sqlalchemy.engine import Engine
from starlette.routing import Route

from . import credits_api, db, events, ledger
from .catalog import CATALOG
from .group_commit import GroupWriter
from .models import Payment, StripeEvent
from .settings import Settings, get_settings

log = logging.getLogger("billing_core.webapp")

WEBHOOK_PATH = "/api/stripe/webhook"


class BodyTooLarge(Exception):
    pass


async def read_limited_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


def _plain(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message} if status >= 400 else {"status": message}, status_code=status)


def _ingest_runner(settings: Settings, engine: Engine, writer: GroupWriter | None):
    """How the webhook runs the (blocking) ingest. On SQLite (a `writer`) events are applied by the group writer's
    thread, several per transaction (billing_core.group_commit): SQLite admits one writer at a time. An event that
    first asks Stripe (a refund's invoice) must not hold that thread, so it and every event on PostgreSQL (several
    processes share it, row locks order them) use Starlette's thread pool, one transaction per event."""
    def alone(event: dict, raw_payload: str) -> events.IngestResult:
        return events.ingest(event, raw_payload=raw_payload, settings=settings, engine=engine, retry_waiting_now=False)

    async def run(event: dict, raw_payload: str) -> events.IngestResult:
        if writer is None or events.handlers.needs_prefetch(event):
            return await run_in_threadpool(alone, event, raw_payload)
        return await writer.submit(event, raw_payload)

    return run


def make_webhook_endpoint(settings: Settings, engine: Engine, *, writer: GroupWriter | None = None):
    run_ingest = _ingest_runner(settings, engine, writer)

    async def webhook(request: Request):
        try:
            body = await read_limited_body(request, events.MAX_BODY_BYTES)
        except BodyTooLarge:
            return _plain(413, f"body larger than {events.MAX_BODY_BYTES} bytes")
        try:
            event = events.verify_and_parse(body, request.headers.get("stripe-signature"), settings)
        except events.IngressRejected as exc:
            log.warning("webhook refused: %s", exc.reason)
            return _plain(exc.status, exc.reason)
        try:
            result = await run_ingest(event, body.decode("utf-8"))
        except db.PoolExhausted as exc:  # answered within DB_POOL_TIMEOUT, before Stripe's own timeout
            log.error("webhook %s not stored, database connections busy: %s", event.get("id"), exc)
            return _plain(500, "event could not be stored; retry later")
        except Exception as exc:  # the database itself is unreachable: Stripe retries later
            log.error("webhook %s not stored: %s", event.get("id"), events.safe_error_text(exc, settings))
            return _plain(500, "event could not be stored; retry later")
        payload = {"received": True, "event_id": result.event_id, "status": result.status,
                   "duplicate": result.duplicate}
        if result.status == "failed":
            payload["error"] = "processing failed; retry later"
        later = None
        nobody_waits = result.others_waiting is False  # seen in the event's own transaction
        if result.status == "processed" and not (result.duplicate or result.nothing_new or nobody_waits):
            later = BackgroundTask(retry_waiting_after_answer, result, event)
        return JSONResponse(payload, status_code=result.http_status, background=later)

    def retry_waiting_after_answer(result: events.IngestResult, event: dict) -> None:
        """Runs after the answer is sent (a thread of the pool); its failure is logged and changes no answer."""
        try:
            events.retry_waiting_after(result, event, engine=engine, settings=settings)
        except Exception as exc:
            log.error("retrying events waiting on %s failed: %s", result.event_id,
                      events.safe_error_text(exc, settings))

    return webhook


WATCHED_STATUSES = ("failed", "needs_attention")


def watched_event_counts(engine) -> dict[str, int]:
    """Stored events a person should look at; rare, and counted over the (status, received_at) index."""
    with db.read_session(engine) as session:
        found = dict(session.execute(select(StripeEvent.status, func.count())
                                     .where(StripeEvent.status.in_(WATCHED_STATUSES))
                                     .group_by(StripeEvent.status)).all())
    return {status: found.get(status, 0) for status in WATCHED_STATUSES}


def make_healthz(settings: Settings, engine: Engine, *, writer: GroupWriter | None = None):
    """`pool` is this worker's connection pool (in use, idle, limit): one worker's view, not the server's.
    `webhook_writer` (SQLite): events queued for the group writer, taken and groups committed so far; a stopped
    writer (the sidecar is shutting down) answers 503, since its webhooks are refused."""
    def check() -> dict:
        last = events.last_event_at(engine)
        found = {"database": "ok", "last_event_at": last.isoformat() if last else None,
                 "events": watched_event_counts(engine), "pool": db.pool_status(engine)}
        if writer is not None:
            found["webhook_writer"] = writer.status()
        return found

    async def healthz(request: Request):
        try:
            found = await run_in_threadpool(check)
            stopped = found.get("webhook_writer", {}).get("stopped")
            return JSONResponse(found, status_code=503 if stopped else 200)
        except db.PoolExhausted as exc:
            log.error("health check: %s", exc)
            pool = db.pool_status(engine)
            return JSONResponse({"database": "busy", "last_event_at": None, "pool": pool}, status_code=503,
                                headers={"Retry-After": "1"})
        except Exception as exc:
            log.error("health check failed: %s", events.safe_error_text(exc, settings))
            return JSONResponse({"database": "unreachable", "last_event_at": None}, status_code=503)

    return healthz


# --- the pages Checkout sends the customer back to ---------------------------------------------

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: sans-serif; max-width: 36em; margin: 3em auto; line-height: 1.5">
<h1>{title}</h1>
{body}
</body></html>
"""


def page(title: str, paragraphs: list[str], status: int = 200) -> HTMLResponse:
    body = "\n".join(f"<p>{html.escape(text)}</p>" for text in paragraphs)
    return HTMLResponse(PAGE.format(title=html.escape(title), body=body), status_code=status)


def _item_name(checkout_session: dict) -> str:
    key = (checkout_session.get("metadata") or {}).get("item")
    item = CATALOG.get(key) if isinstance(key, str) else None
    return item.name + (" plan" if item.kind == "plan" else "") if item else "your purchase"


NOT_APPLIED = object()  # the success page could not apply the paid session now (the webhook will)

# The return page must neither wait long nor let a flood of requests slow anything else down:
RETURN_PAGE_STRIPE_TIMEOUT = 5.0  # seconds per Stripe request, and no retries
RETURN_PAGE_WAIT = 4.0  # the page answers within this even when Stripe is slower ("credits on their way")
RETURN_PAGE_WORKERS = 4  # at most this many Stripe lookups at once; beyond it the page answers at once
RETURN_PAGE_REUSE_SECONDS = 30.0  # one Stripe lookup per session id within this window
RETURN_PAGE_MAX_REMEMBERED = 10_000


class ReturnPageLookups:
    """The return page's Stripe lookups and their fulfilment, on their own small thread pool (never the
    pool that serves the credits API and the webhooks), at most one per session id per reuse window:
    later requests for the same id share the first one's answer."""

    def __init__(self, fulfil, *, workers: int = RETURN_PAGE_WORKERS, reuse_seconds: float = RETURN_PAGE_REUSE_SECONDS,
                 clock=time.monotonic):
        self._fulfil = fulfil
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="return-page-stripe")
        self._slots = threading.BoundedSemaphore(workers)
        self._reuse_seconds = reuse_seconds
        self._clock = clock
        self._recent: dict[str, tuple[float, Future]] = {}
        self._lock = threading.Lock()

    def lookup(self, session_id: str) -> Future | None:
        """The (shared) lookup for this session id; None when every worker is busy (no Stripe call made)."""
        now = self._clock()
        with self._lock:
            self._forget_old(now)
            recent = self._recent.get(session_id)
            if recent is not None:
                return recent[1]
            if not self._slots.acquire(blocking=False):
                return None
            future = self._pool.submit(self._run, session_id)
            self._recent[session_id] = (now, future)
            return future

    def _run(self, session_id: str):
        try:
            return self._fulfil(session_id)
        finally:
            self._slots.release()

    def _forget_old(self, now: float) -> None:
        while self._recent:
            oldest_id, (at, _future) = next(iter(self._recent.items()))
            if now - at < self._reuse_seconds and len(self._recent) < RETURN_PAGE_MAX_REMEMBERED:
                break
            del self._recent[oldest_id]


def _on_its_way(what: str = "your purchase") -> HTMLResponse:
    return page("Payment received", [
        f"Thank you for buying {what}. Your payment was received and your credits are on their way: they "
        "will appear in a few moments. You can close this page."])


def _balance_page(what: str, summary, *, subscription: bool) -> HTMLResponse:
    lines = [f"Thank you: your payment for {what} was received."]
    if subscription and summary.tier == "none":
        lines.append("Your subscription credits will appear in a moment, once the first invoice is recorded.")
    lines.append(f"Your credit balance is now {summary.balance:,} credits.")
    return page("Payment received", lines)


def make_success_page(settings: Settings, engine: Engine):
    database_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="return-page-db")

    def recorded(session_id: str):
        """(item name, balance summary, is a plan) when this session's payment is already in the database."""
        with db.read_session(engine) as session:
            payment = session.execute(select(Payment).where(Payment.checkout_session_id == session_id)
                                      ).scalars().first()
            if payment is None or not payment.user_id or payment.status in ("unpaid", "failed"):
                return None
            item = CATALOG.get(payment.item or "")
            what = item.name + (" plan" if item.kind == "plan" else "") if item else "your purchase"
            return what, ledger.account_summary(session, payment.user_id), payment.kind == "plan"

    def fulfil(session_id: str):
        from .stripe_client import StripeProblem, make_stripe_client, stripe_errors

        try:
            with stripe_errors("retrieving the checkout session", settings=settings):
                client = make_stripe_client(settings, max_network_retries=0, timeout=RETURN_PAGE_STRIPE_TIMEOUT)
                checkout_session = client.v1.checkout.sessions.retrieve(session_id).to_dict()
        except StripeProblem as exc:
            return None, None, exc
        if checkout_session.get("payment_status") not in ("paid", "no_payment_required"):
            return checkout_session, None, None
        handled = events.apply_checkout_session(checkout_session, settings=settings, engine=engine)  # never raises
        if handled is None or not handled.user_id:
            return checkout_session, NOT_APPLIED, None
        try:
            with db.read_session(engine) as session:
                return checkout_session, ledger.account_summary(session, handled.user_id), None
        except Exception as exc:
            log.error("success page could not read the balance: %s", events.safe_error_text(exc, settings))
            return checkout_session, NOT_APPLIED, None

    lookups = ReturnPageLookups(fulfil)

    async def success(request: Request):
        session_id = request.query_params.get("session_id", "").strip()
        if not session_id.startswith("cs_") or len(session_id) > 255 or not session_id.isascii():
            return page("Payment status unknown", ["This link has no valid checkout session."], 400)
        loop = asyncio.get_running_loop()
        try:
            known = await loop.run_in_executor(database_pool, recorded, session_id)
        except Exception as exc:
            log.error("success page could not read the database: %s", events.safe_error_text(exc, settings))
            known = None
        if known is not None:
            what, summary, is_plan = known
            return _balance_page(what, summary, subscription=is_plan)
        lookup = lookups.lookup(session_id)
        if lookup is None:  # every Stripe worker is busy: say what we can now, call nobody
            return _on_its_way()
        try:
            checkout_session, summary, problem = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(lookup)),
                                                                        timeout=RETURN_PAGE_WAIT)
        except asyncio.TimeoutError:
            return _on_its_way()
        if problem is not None:
            if getattr(problem, "cause", None) == "not_found":
                return page("Payment status unknown", ["We could not find this checkout session."], 404)
            return page("Payment being confirmed", [
                "Thank you. We could not confirm your payment with Stripe just now.",
                "If you were charged, your credits will appear shortly; you can close this page."], 503)
        what = _item_name(checkout_session)
        if checkout_session.get("payment_status") not in ("paid", "no_payment_required"):
            return page("Payment processing", [
                f"Thank you for buying {what}. Your payment is still being processed; your credits will "
                "appear as soon as it clears."])
        if summary is NOT_APPLIED:
            return page("Payment being confirmed", [
                f"Thank you for buying {what}. We are confirming your payment; your credits will appear "
                "shortly. You can close this page."])
        return _balance_page(what, summary, subscription=checkout_session.get("mode") == "subscription")

    return success


async def cancel(request: Request):
    return page("Checkout canceled", ["Nothing was charged. You can close this page, or ask us for a new link "
                                      "when you are ready."])


def create_app(settings: Settings | None = None, *, check_schema: bool = True,
               include_api: bool | None = None) -> Starlette:
    """The sidecar app. Refuses to start on an out-of-date database schema (run init-db).
    Settings are read once here (the entry point) and handed, with the engine, to everything below.
    The credits API is part of it unless API_HOST/API_PORT give the API its own listener (create_api_app)."""
    settings = settings or get_settings()
    if check_schema:
        db.ensure_schema_current(settings.database_url)
    engine = db.get_engine(settings.database_url)
    configure_mappers()  # once at start (≈0.1 s), not inside the first event's or spend's answer
    if include_api is None:
        include_api = not settings.api_listener_separate
    writer = GroupWriter(engine=engine, settings=settings) if db.is_sqlite(engine) else None
    routes = [
        Route(WEBHOOK_PATH, make_webhook_endpoint(settings, engine, writer=writer), methods=["POST"]),
        Route("/healthz", make_healthz(settings, engine, writer=writer), methods=["GET"]),
        Route("/checkout/success", make_success_page(settings, engine), methods=["GET"]),
        Route("/checkout/cancel", cancel, methods=["GET"]),
        *(credits_api.routes(settings) if include_api else []),
    ]
    app = Starlette(routes=routes, lifespan=_stopping(writer))
    app.state.webhook_writer = writer
    return app


def _stopping(writer: GroupWriter | None):
    """The app's lifespan: at shutdown (after uvicorn has let the requests in flight finish) the group writer
    applies and answers what is still queued, off the event loop, which must stay free to deliver those answers."""
    @contextlib.asynccontextmanager
    async def lifespan(_app) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if writer is not None:
                await run_in_threadpool(writer.stop)

    return lifespan


def create_api_app(settings: Settings | None = None, *, check_schema: bool = True) -> Starlette:
    """The credits API alone, for its own listener (API_HOST/API_PORT), plus /healthz."""
    settings = settings or get_settings()
    if check_schema:
        db.ensure_schema_current(settings.database_url)
    engine = db.get_engine(settings.database_url)
    return Starlette(routes=[Route("/healthz", make_healthz(settings, engine), methods=["GET"]),
                             *credits_api.routes(settings)])
