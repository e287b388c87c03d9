"""The ingest pipeline: verify a Stripe delivery, store it, apply it exactly once.

1. `verify_and_parse` checks the signature (any configured secret, 300 s tolerance), that the body is
   an event, and that its mode matches the configured key; anything else is an `IngressRejected`.
2. `ingest` stores the event (id unique, INSERT ... ON CONFLICT DO NOTHING), then in ONE write
   transaction locks its row, runs its handler and marks it processed / ignored / needs_attention.
   A copy arriving at the same moment waits for that row lock and then finds it done: no change.
3. An unexpected exception rolls back every effect; a separate transaction records status=failed with
   the error (keys masked) so the caller answers 500 and Stripe retries.
4. A handler's NeedsAttention rolls back its effects (savepoint) and keeps the event with the reason
   (answered 200: Stripe's retry can't help). Such an event is retried automatically when a later event
   records something it mentions (its payment intent, customer, subscription, or the invoice Stripe
   named for its charge), so a refund delivered before its payment still applies; an operator can
   assign the user and `reprocess` the rest.
5. `ingest_together` applies several events in order in one transaction (the SQLite sidecar's group commit,
   billing_core.group_commit); all or nothing, and the event it could not apply is named for `ingest` alone.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import timedelta

import stripe
from sqlalchemy import bindparam, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine

from . import db, handlers, ledger
from .catalog import UnknownItem, UnknownPrice
from .handlers import checkout as checkout_handlers
from .handlers import EventContext
from .models import StripeEvent, utcnow
from .prepared import Prepared
from .settings import Settings
from .stripe_payloads import MAX_EPOCH, NeedsAttention, dig, printable, related_ids

log = logging.getLogger("billing_core.events")

MAX_BODY_BYTES = 1024 * 1024
SIGNATURE_TOLERANCE_SECONDS = 300
DONE_STATUSES = ("processed", "ignored", "needs_attention")
PENDING_STATUSES = ("received", "failed")
WAITING_RETRY_WINDOW = timedelta(days=3)  # Stripe stops retrying after three days, so do we
WAITING_RETRY_LIMIT = 25
MAX_ERROR_CHARS = 1000

__all__ = ["IngressRejected", "IngestResult", "NeedsAttention", "UnknownEvent", "verify_and_parse", "ingest",
           "GroupFailed", "ingest_together", "reprocess", "replay_failed", "apply_checkout_session",
           "api_version_mismatch", "last_event_at"]


class IngressRejected(Exception):
    """A delivery refused before anything is stored; `status` is the HTTP answer, `reason` says why."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class UnknownEvent(ValueError):
    pass


@dataclass
class IngestResult:
    event_id: str
    status: str
    duplicate: bool = False
    error: str | None = None
    user_id: str | None = None
    nothing_new: bool = False  # processed, but another event had already recorded all of it
    others_waiting: bool | None = None  # whether recent events wait in needs-attention (None: not looked)

    @property
    def http_status(self) -> int:
        return 500 if self.status == "failed" else 200

    def as_dict(self) -> dict:
        return {"event_id": self.event_id, "status": self.status, "duplicate": self.duplicate,
                "error": self.error, "user_id": self.user_id}


# --- ingress ---------------------------------------------------------------------------------

def verify_and_parse(raw_body: bytes, signature_header: str | None, settings: Settings) -> dict:
    """The verified event, or IngressRejected naming what is wrong with the delivery."""
    secrets = settings.webhook_secrets
    if not secrets:
        raise IngressRejected(500, "webhook secret not configured: set STRIPE_WEBHOOK_SECRET")
    if not signature_header or not signature_header.strip():
        raise IngressRejected(400, "missing Stripe-Signature header")
    try:
        text = raw_body.decode("utf-8")
    except UnicodeDecodeError:
        raise IngressRejected(400, "body is not UTF-8 text") from None
    _verify_signature(text, signature_header, secrets)
    try:
        event = json.loads(text)
    except (ValueError, RecursionError):
        raise IngressRejected(400, "body is not JSON") from None
    problem = event_shape_problem(event)
    if problem:
        raise IngressRejected(400, f"not a Stripe event: {problem}")
    if bool(event.get("livemode")) != settings.livemode:
        event_mode = "live" if event.get("livemode") else "test"
        raise IngressRejected(400, f"{event_mode}-mode event refused: the configured Stripe key is "
                                   f"{'live' if settings.livemode else 'test'} mode")
    return event


def _verify_signature(text: str, header: str, secrets: list[str]) -> None:
    stale = False
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(text, header, secret, tolerance=SIGNATURE_TOLERANCE_SECONDS)
            return
        except stripe.SignatureVerificationError as exc:
            # The library checks the signature first, so "tolerance" means it matched but is too old.
            stale = stale or "tolerance" in str(exc)
    if stale:
        raise IngressRejected(400, f"stale timestamp: signed more than {SIGNATURE_TOLERANCE_SECONDS} s ago")
    raise IngressRejected(400, "invalid signature")


def _ascii_token(value, max_len: int) -> bool:
    """Printable ASCII without spaces, 1..max_len characters: fits its column on every database."""
    return (isinstance(value, str) and 0 < len(value) <= max_len and value.isascii() and value.isprintable()
            and " " not in value)


def event_shape_problem(event) -> str | None:
    if not isinstance(event, dict):
        return "the body is not a JSON object"
    event_id = event.get("id")
    if not isinstance(event_id, str) or not event_id.startswith("evt_"):
        return "id must be a string starting with evt_"
    if not _ascii_token(event_id, 100):
        return "id is not at most 100 printable ASCII characters"
    if not isinstance(event.get("type"), str) or not event["type"]:
        return "type is missing"
    if not _ascii_token(event["type"], 100):
        return "type is not at most 100 printable ASCII characters"
    if not isinstance(dig(event, "data", "object"), dict):
        return "data.object is missing"
    created = event.get("created")
    if isinstance(created, bool) or not isinstance(created, int):
        return "created is missing"
    if not 0 < created <= MAX_EPOCH:
        return "created is not a Unix time"
    api_version = event.get("api_version")
    if api_version is not None and not _ascii_token(api_version, 40):
        return "api_version is not a version string"
    return None


# --- storing and processing ------------------------------------------------------------------
# The webhook's path: verify (above), then ONE write transaction that stores the event and applies it, and
# one commit. Statements are built once, here, and run on the session's connection (on SQLite straight on the
# driver's, billing_core.prepared); a copy of a finished event (same id) costs BEGIN, the INSERT that finds the
# id taken, and one SELECT of its status.

_EVENT = StripeEvent.__table__


def _insert_event_statement(dialect: str):
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    return insert(_EVENT).on_conflict_do_nothing(index_elements=["id"]).returning(_EVENT.c.id)


_SELECT_EVENT = select(_EVENT.c.status, _EVENT.c.error, _EVENT.c.user_id, _EVENT.c.assigned_user_id).where(
    _EVENT.c.id == bindparam("event_id"))
_FINISH = (update(_EVENT).where(_EVENT.c.id == bindparam("event_id"))
           .values(status=bindparam("new_status"), error=bindparam("new_error"),
                   user_id=func.coalesce(bindparam("new_user_id"), _EVENT.c.user_id),
                   attempts=_EVENT.c.attempts + 1, processed_at=bindparam("now")))
_WAITING = _EVENT.alias("waiting")

_INSERT_EVENT = {name: Prepared(_insert_event_statement(name)) for name in ("sqlite", "postgresql")}
# PostgreSQL locks the row: a copy arriving meanwhile waits for the first to commit, then finds it done.
_STORED_STATUS = {"sqlite": Prepared(_SELECT_EVENT), "postgresql": Prepared(_SELECT_EVENT.with_for_update())}
# Only an event still pending: one that another copy finished meanwhile keeps its status.
_FINISH_PENDING_EVENT = Prepared(_FINISH.where(_EVENT.c.status.in_(PENDING_STATUSES)))
# The webhook's: it also answers whether any recent event waits in needs-attention, so the retry after the
# answer reads nothing more in the common case (nobody waiting) instead of opening a transaction of its own.
_FINISH_EVENT_SEEING_WAITING = Prepared(_FINISH.returning(
    select(_WAITING.c.id).where(_WAITING.c.status == "needs_attention",
                                _WAITING.c.received_at >= bindparam("since")).limit(1).exists()))


def _mark_done_statement(done_user):
    """Marks the event processed when `done_user` (a handler's subquery) finds the work done; returns the user."""
    return Prepared(
        update(_EVENT).where(_EVENT.c.id == bindparam("event_id"), done_user.is_not(None))
        .values(status="processed", user_id=done_user, attempts=_EVENT.c.attempts + 1, processed_at=bindparam("now"))
        .returning(_EVENT.c.user_id))


_MARK_DONE = {event_type: (_mark_done_statement(subquery), params)
              for event_type, (subquery, params) in handlers.ALREADY_DONE.items()}


def _event_values(event: dict, raw_payload: str, source: str, *, status: str = "received", attempts: int = 0,
                  error: str | None = None) -> dict:
    now = utcnow()
    return {"id": event["id"], "type": event["type"], "api_version": event.get("api_version"),
            "livemode": bool(event.get("livemode")), "created": int(event["created"]), "payload": raw_payload,
            "received_at": now, "status": status, "attempts": attempts, "source": source, "error": error,
            "processed_at": now if attempts else None}


def _insert_event(connection, values: dict) -> bool:
    """True when the event is new; False when its id was already stored (nothing written)."""
    # RETURNING rather than rowcount: psycopg reports no rowcount for this statement
    return _INSERT_EVENT[connection.dialect.name].first(connection, values) is not None


def _stored_status(connection, event_id: str):
    return _STORED_STATUS[connection.dialect.name].first(connection, {"event_id": event_id})


def _finish_pending_event(connection, event_id: str, *, status: str, error: str | None, user_id: str | None) -> int:
    return _FINISH_PENDING_EVENT.run(connection, {"event_id": event_id, "new_status": status, "new_error": error,
                                                  "new_user_id": user_id, "now": utcnow()})


def _mark_if_already_done(connection, event: dict) -> str | None:
    statement, params_for = _MARK_DONE.get(event["type"], (None, None))
    params = params_for(event) if params_for is not None else None
    if params is None:
        return None
    return statement.scalar(connection, {**params, "event_id": event["id"], "now": utcnow()})


def _store(engine: Engine, event: dict, raw_payload: str, source: str) -> None:
    """Store an event without applying it (what a crash right after storing leaves behind)."""
    with db.write_session(engine) as session:
        _insert_event(session.connection(), _event_values(event, raw_payload, source))


def ingest(event: dict, *, raw_payload: str, engine: Engine, settings: Settings, source: str = "webhook",
           retry_waiting_now: bool = True) -> IngestResult:
    """Store a verified event and apply it once, in one transaction; a copy of a finished event changes nothing.

    When it recorded something, events waiting in needs-attention that mention it are retried: right away,
    or (`retry_waiting_now=False`, the webhook) by the caller after answering, with `retry_waiting_after`.
    SQLite's write lock held by another connection past the busy timeout is raised, nothing stored (recording
    the failure would wait that long again): the webhook answers 500 and Stripe retries."""
    if event_shape_problem(event):
        raise ValueError(f"not a Stripe event: {event_shape_problem(event)}")
    prefetching = handlers.needs_prefetch(event)  # a Stripe lookup, made before any database lock is taken
    if prefetching:
        done = _finished_copy(engine, event["id"])  # a copy of a finished event asks Stripe nothing
        if done is not None:
            return done
    try:
        facts = {}
        if prefetching:
            facts = handlers.prefetch(event, settings=settings, read_session=lambda: db.read_session(engine))
        with db.write_session(engine) as session:
            result = _store_and_apply(session, event, raw_payload, source=source, settings=settings, facts=facts)
    except _Waiting as waiting:  # its effects are rolled back with the transaction; the event is kept
        return _record_waiting(engine, event, raw_payload, source, waiting.reason, user_id=waiting.user_id)
    except Exception as exc:  # anything unexpected: nothing of it stays, Stripe retries on our 500
        if db.write_lock_timed_out(exc):  # recording it would wait the busy timeout again: raise, nothing stored
            raise
        error = safe_error_text(exc, settings)
        log.error("event %s failed: %s", event["id"], error, exc_info=log.isEnabledFor(logging.DEBUG))
        _record_failure(engine, event["id"], error, stored=_event_values(event, raw_payload, source))
        return IngestResult(event["id"], "failed", error=error)
    if retry_waiting_now:
        retry_waiting_after(result, event, engine=engine, settings=settings)
    return result


class GroupFailed(Exception):
    """`ingest_together` could not apply the event at `index` with the others; the transaction was rolled back."""

    def __init__(self, index: int):
        super().__init__(f"event {index} of the group could not be applied with the others")
        self.index = index


class GroupNotBegun(Exception):
    """`ingest_together` could not begin its transaction (another process held the write lock past the busy
    timeout, the database is gone): nothing of the group was stored."""


def ingest_together(deliveries: list[tuple[dict, str]], *, engine: Engine, settings: Settings,
                    source: str = "webhook") -> list[IngestResult]:
    """Store and apply verified events (event, raw payload), in order, in ONE write transaction and one commit:
    each sees what the ones before it wrote, as if they had come one after another. All or nothing: when one
    can't be applied here (it needs a person, needs Stripe first, or raises), everything is rolled back and
    GroupFailed names it, so the caller can apply it alone with `ingest`, which records it as it should.
    Nothing waiting is retried here (as with `ingest(retry_waiting_now=False)`): see `retry_waiting_after`."""
    results = []
    with db.write_session(engine) as session:
        try:
            session.connection()  # BEGIN IMMEDIATE here: a database that can't begin is no event's fault
        except Exception as exc:
            raise GroupNotBegun(safe_error_text(exc, settings)) from exc
        for index, (event, raw_payload) in enumerate(deliveries):
            if event_shape_problem(event) or handlers.needs_prefetch(event):
                raise GroupFailed(index)  # ingest refuses the one, asks Stripe for the other before any lock
            try:
                results.append(_store_and_apply(session, event, raw_payload, source=source, settings=settings,
                                                facts={}))
                session.flush()
                # The next event reads rows afresh: handlers mix ORM objects and Core statements, so an object
                # this event loaded could be stale by the time another event of the group looks at it.
                session.expunge_all()
            except Exception as exc:
                raise GroupFailed(index) from exc
    return results


def retry_waiting_after(result: IngestResult, event: dict, *, engine: Engine, settings: Settings) -> int:
    """Retry the waiting events that what `event` just recorded may resolve; 0 when it recorded nothing."""
    if result.status != "processed" or result.duplicate or result.nothing_new:
        return 0
    if result.others_waiting is False:  # seen in the event's own transaction: nobody waits
        return 0
    return retry_waiting(engine=engine, settings=settings, related_to=related_ids(event["data"]["object"]),
                         exclude=event["id"])


def _finished_copy(engine: Engine, event_id: str) -> IngestResult | None:
    with db.read_connection(engine) as connection:
        row = connection.execute(_SELECT_EVENT, {"event_id": event_id}).first()
    if row is not None and row.status not in PENDING_STATUSES:
        return IngestResult(event_id, row.status, duplicate=True, error=row.error, user_id=row.user_id)
    return None


def _store_and_apply(session, event: dict, raw_payload: str, *, source: str, settings: Settings,
                     facts: dict) -> IngestResult:
    event_id = event["id"]
    connection = session.connection()
    assigned_user_id = None
    if not _insert_event(connection, _event_values(event, raw_payload, source)):
        row = _stored_status(connection, event_id)
        if row.status not in PENDING_STATUSES:  # a copy of a finished event
            return IngestResult(event_id, row.status, duplicate=True, error=row.error, user_id=row.user_id)
        assigned_user_id = row.assigned_user_id  # a retry of one that failed (or was stored by a crashed run)
    else:
        done = _mark_if_already_done(connection, event)
        if done is not None:  # a second event type for work already done: recorded as processed, nothing else
            return IngestResult(event_id, "processed", user_id=done, nothing_new=True)
    ctx = EventContext(event=event, settings=settings, assigned_user_id=assigned_user_id, source=source, facts=facts)
    status, error, user_id = _run_handler(session, ctx, savepoint=False)
    session.flush()
    now = utcnow()
    others_waiting = bool(_FINISH_EVENT_SEEING_WAITING.scalar(connection, {
        "event_id": event_id, "new_status": status, "new_error": error, "new_user_id": user_id, "now": now,
        "since": now - WAITING_RETRY_WINDOW}))
    if event.get("api_version") and event["api_version"] != stripe.api_version:
        log.warning("event %s has API version %s, not the pinned %s; processed anyway", event_id,
                    printable(event["api_version"]), stripe.api_version)
    return IngestResult(event_id, status, error=error, user_id=user_id, others_waiting=others_waiting)


class _StillWaiting(Exception):
    """An automatic retry that resolved nothing: roll back so the stored row stays as it was."""


def _process(engine: Engine, event_id: str, *, settings: Settings, only_statuses: tuple[str, ...] | None,
             source: str = "webhook", assigned_user_id: str | None = None,
             quiet_if_unresolved: bool = False, operator: str | None = None) -> IngestResult:
    try:
        with db.read_session(engine) as session:
            row = session.get(StripeEvent, event_id)
            if row is None:
                raise UnknownEvent(f"no stored event {event_id}")
            if only_statuses is not None and row.status not in only_statuses:
                return IngestResult(event_id, row.status, duplicate=True, error=row.error, user_id=row.user_id)
            event = json.loads(row.payload)
        facts = handlers.prefetch(event, settings=settings, read_session=lambda: db.read_session(engine))  # Stripe, outside any lock
        with db.write_session(engine) as session:
            row = session.execute(db.for_update(select(StripeEvent).where(StripeEvent.id == event_id),
                                                session)).scalars().first()
            if only_statuses is not None and row.status not in only_statuses:  # a concurrent copy finished it
                return IngestResult(event_id, row.status, duplicate=True, error=row.error, user_id=row.user_id)
            if assigned_user_id:
                row.assigned_user_id = assigned_user_id
            if operator:
                row.reprocessed_by = operator
            ctx = EventContext(event=event, settings=settings, assigned_user_id=row.assigned_user_id,
                               source=source, facts=facts)
            status, error, user_id = _run_handler(session, ctx)
            if quiet_if_unresolved and status == "needs_attention":
                raise _StillWaiting()
            row.status, row.error, row.user_id = status, error, user_id or row.user_id
            row.attempts += 1
            row.processed_at = utcnow()
            session.add(row)
            session.flush()
            if api_version_mismatch(row):
                log.warning("event %s has API version %s, not the pinned %s; processed anyway", event_id,
                            row.api_version, stripe.api_version)
            return IngestResult(event_id, status, error=error, user_id=row.user_id)
    except UnknownEvent:
        raise
    except _StillWaiting:
        return IngestResult(event_id, "needs_attention", duplicate=True)
    except Exception as exc:  # anything unexpected: nothing of it stays, Stripe retries on our 500
        error = safe_error_text(exc, settings)
        log.error("event %s failed: %s", event_id, error, exc_info=log.isEnabledFor(logging.DEBUG))
        _record_failure(engine, event_id, error)
        return IngestResult(event_id, "failed", error=error)


class _Waiting(Exception):
    """The event needs a person: leave the transaction (its effects go with it) and keep the event apart."""

    def __init__(self, reason: str, *, user_id: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.user_id = user_id


def _run_handler(session, ctx: EventContext, *, savepoint: bool = True) -> tuple[str, str | None, str | None]:
    """(status, error, user) of running the event's handler. A NeedsAttention undoes the event's effects:
    with `savepoint`, by rolling back to a savepoint (the caller's status row stays); without, by raising
    _Waiting so the caller rolls back its whole transaction (the webhook's path: no savepoint to pay for)."""
    try:
        if savepoint:
            with session.begin_nested():
                handled = handlers.handle(session, ctx)
        else:
            handled = handlers.handle(session, ctx)
    except NeedsAttention as exc:
        reason = printable(exc.reason, MAX_ERROR_CHARS)
        if not savepoint:
            raise _Waiting(reason, user_id=exc.user_id) from None
        return "needs_attention", reason, exc.user_id
    except (ledger.LedgerError, UnknownPrice, UnknownItem) as exc:  # the event carries data we can't use
        if not savepoint:
            raise _Waiting(safe_error_text(exc, ctx.settings)) from None
        return "needs_attention", safe_error_text(exc, ctx.settings), None
    if handled.ignored:
        return "ignored", handled.note and printable(handled.note, MAX_ERROR_CHARS), handled.user_id
    if handled.note:
        log.info("event %s: %s", ctx.id, handled.note)
    return "processed", None, handled.user_id


def _record_waiting(engine: Engine, event: dict, raw_payload: str, source: str, reason: str, *,
                    user_id: str | None = None) -> IngestResult:
    """Keep an event that needs a person, with the reason (and its user when known), in a transaction of its own."""
    with db.write_session(engine) as session:
        connection = session.connection()
        values = _event_values(event, raw_payload, source, status="needs_attention", attempts=1, error=reason)
        if not _insert_event(connection, {**values, "user_id": user_id}):
            if not _finish_pending_event(connection, event["id"], status="needs_attention", error=reason,
                                         user_id=user_id):
                row = _stored_status(connection, event["id"])  # a copy finished it meanwhile
                return IngestResult(event["id"], row.status, duplicate=True, error=row.error, user_id=row.user_id)
    return IngestResult(event["id"], "needs_attention", error=reason, user_id=user_id)


def _record_failure(engine: Engine, event_id: str, error: str, *, stored: dict | None = None) -> None:
    """Record `failed` with the error, in a transaction of its own; `stored` first stores the event when the
    failed transaction took it with it. A copy that failed while another copy finished the event (its
    connection dropped while it waited for the row lock, say) never marks the finished event failed."""
    with db.write_session(engine) as session:
        connection = session.connection()
        if stored is not None and _insert_event(connection, {**stored, "status": "failed", "error": error,
                                                              "attempts": 1, "processed_at": utcnow()}):
            return
        _finish_pending_event(connection, event_id, status="failed", error=error, user_id=None)


def safe_error_text(exc: Exception, settings: Settings) -> str:
    """One line for the operator: the error's type and message, every key and secret masked."""
    from .stripe_client import mask_keys

    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    for secret in [settings.stripe_secret_key, settings.billing_api_token, *settings.webhook_secrets]:
        if secret and len(secret) >= 8:
            text = text.replace(secret, "***")
    return printable(mask_keys(text), MAX_ERROR_CHARS)


# --- replay ----------------------------------------------------------------------------------

def reprocess(event_id: str, *, engine: Engine, settings: Settings, assigned_user_id: str | None = None,
              operator: str | None = None) -> IngestResult:
    """Run a stored event through its handler again (any status); the source keys make it safe.
    `operator` is recorded on the event as the person who reprocessed it."""
    if assigned_user_id is not None:
        assigned_user_id = ledger.check_user_id(assigned_user_id)  # a bad id is refused, not recorded as a failure
    result = _process(engine, event_id, settings=settings, only_statuses=None, source="replay",
                      assigned_user_id=assigned_user_id, operator=operator)
    if result.status == "processed":
        retry_waiting(engine=engine, settings=settings, related_to=_related_to_stored([event_id], engine),
                      exclude=event_id)
    return result


def replay_failed(*, engine: Engine, settings: Settings, operator: str | None = None,
                  stuck_after: timedelta = timedelta(minutes=1)) -> list[IngestResult]:
    """Reprocess every failed event, and every one left `received` (a crash mid-processing), oldest first."""
    with db.read_session(engine) as session:
        stuck_before = utcnow() - stuck_after
        ids = list(session.execute(
            select(StripeEvent.id).where((StripeEvent.status == "failed")
                                         | ((StripeEvent.status == "received") & (StripeEvent.received_at < stuck_before)))
            .order_by(StripeEvent.created, StripeEvent.id)).scalars())
    results = [_process(engine, event_id, settings=settings, only_statuses=PENDING_STATUSES, source="replay",
                        operator=operator) for event_id in ids]
    processed = [r.event_id for r in results if r.status == "processed" and not r.duplicate]
    if processed:
        retry_waiting(engine=engine, settings=settings, related_to=_related_to_stored(processed, engine))
    return results


def _related_to_stored(event_ids: list[str], engine: Engine) -> set[str]:
    with db.read_session(engine) as session:
        payloads = session.execute(select(StripeEvent.payload).where(StripeEvent.id.in_(event_ids))).scalars()
        return set().union(*(related_ids(json.loads(p)["data"]["object"]) for p in payloads))


_ANY_WAITING = select(_EVENT.c.id).where(_EVENT.c.status == "needs_attention",
                                         _EVENT.c.received_at >= bindparam("since")).limit(1)


def _any_waiting(engine: Engine) -> bool:
    """One indexed look: most events find nobody waiting, and then nothing more is read."""
    with db.read_connection(engine) as connection:
        return connection.execute(_ANY_WAITING, {"since": utcnow() - WAITING_RETRY_WINDOW}).first() is not None


def retry_waiting(*, engine: Engine, settings: Settings, related_to: set[str], exclude: str | None = None,
                  rounds: int = 3) -> int:
    """Retry recent needs-attention events that mention one of `related_to` (ids of what was just recorded:
    a customer, subscription, invoice, payment intent) in their payload or reason: a refund delivered before
    its payment, an invoice before its customer link. Unrelated ones (a refund of a charge that isn't ours)
    are left alone, and a retry that resolves nothing writes nothing. Returns how many were resolved."""
    resolved = 0
    if not related_to or not _any_waiting(engine):
        return 0
    for _ in range(rounds):
        if not related_to:
            break
        mentions = [StripeEvent.payload.contains(f'"{ident}"', autoescape=True) for ident in related_to]
        mentions += [StripeEvent.error.contains(ident, autoescape=True) for ident in related_to]
        with db.read_session(engine) as session:
            rows = session.execute(
                select(StripeEvent.id, StripeEvent.payload).where(
                    StripeEvent.status == "needs_attention",
                    StripeEvent.received_at >= utcnow() - WAITING_RETRY_WINDOW,
                    StripeEvent.id != (exclude or ""), or_(*mentions))
                .order_by(StripeEvent.created, StripeEvent.id).limit(WAITING_RETRY_LIMIT)).all()
        related_to = set()
        for event_id, payload in rows:
            result = _process(engine, event_id, settings=settings, only_statuses=("needs_attention",),
                              source="replay", quiet_if_unresolved=True)
            if result.status in ("processed", "ignored") and not result.duplicate:
                resolved += 1
                related_to |= related_ids(json.loads(payload)["data"]["object"])
    return resolved


def apply_checkout_session(checkout_session: dict, *, engine: Engine,
                           settings: Settings) -> handlers.Handled | None:
    """The success page's fulfilment: the same function and source keys as the webhook's.
    None when the session can't be applied now: it needs a person (the webhook keeps it for them), its
    data can't be used (a bad client_reference_id), or the database failed. Each is logged, keys masked;
    the customer's page just says the payment is being confirmed."""
    try:
        with db.write_session(engine) as session:
            handled = checkout_handlers.fulfil_checkout_session(session, checkout_session, settings=settings)
        retry_waiting(engine=engine, settings=settings, related_to=related_ids(checkout_session))
    except NeedsAttention as exc:
        log.warning("success page could not apply %s: %s", printable(checkout_session.get("id")),
                    printable(exc.reason))
        return None
    except Exception as exc:  # LedgerError, UnknownItem, a database error: the webhook path records it
        log.error("success page could not apply %s: %s", printable(checkout_session.get("id")),
                  printable(safe_error_text(exc, settings)))
        return None
    return handled


# --- reading ---------------------------------------------------------------------------------

def api_version_mismatch(event_row: StripeEvent) -> bool:
    """True when the event was rendered with another API version than the one this code pins."""
    return bool(event_row.api_version) and event_row.api_version != stripe.api_version


def last_event_at(engine: Engine):
    with db.read_session(engine) as session:
        return session.execute(select(func.max(StripeEvent.received_at))).scalar()
