"""The credits API the DevOps Agent calls on the sidecar: read a balance, spend credits once per reference.

    GET  /api/accounts/{user_id}           the account summary (the names of `balance --json`)
    POST /api/accounts/{user_id}/consume   {"credits": N, "reference": "..."}

Every request needs `Authorization: Bearer <token>`: BILLING_API_TOKEN (named "default") or one of the named
tokens of BILLING_API_TOKENS=name:token,... (compared in constant time). Tokens are reread from the
configuration file within TOKEN_RECHECK_SECONDS of a change, without a restart; each spend records the
name of the token that made it. With no token configured the API answers 503 and stays closed. Errors are
JSON `{"error": "..."}`.
The ledger does the real work inside one write transaction that locks the account, so parallel
spends on one account queue up and can neither overspend nor lose a spend. Database work runs in
the thread pool so a waiting writer never blocks the event loop.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from . import db, ledger
from .settings import Settings, get_settings, load_settings

log = logging.getLogger("billing_core.credits_api")

MAX_BODY_BYTES = 4096
CONSUME_FIELDS = {"credits", "reference"}
AUTH_CHALLENGE = 'Bearer realm="billing credits API"'


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# --- request checks -----------------------------------------------------------------------

TOKEN_RECHECK_SECONDS = 5.0  # a changed configuration file is seen within this (the promise is 10 s)
_clock = time.monotonic  # tests replace it


def _file_stamp(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


class TokenSource:
    """The API tokens of a running server: parsed from its settings at start, and parsed again from the
    configuration file (config/.env or BILLING_ENV_FILE) when its modification time or size changed, checked
    at most every TOKEN_RECHECK_SECONDS. Environment variables override the file, as at start-up."""

    def __init__(self, settings: Settings):
        self._path = settings.env_file
        self._tokens = settings.api_tokens
        self._stamp = _file_stamp(self._path) if self._path else None
        self._checked_at = _clock()
        self._lock = threading.Lock()

    def current(self) -> dict[str, str]:
        if not self._path or _clock() - self._checked_at < TOKEN_RECHECK_SECONDS:
            return self._tokens
        with self._lock:
            self._checked_at = _clock()
            stamp = _file_stamp(self._path)
            if stamp != self._stamp:
                self._stamp = stamp
                self._tokens = load_settings({**os.environ, "BILLING_ENV_FILE": self._path}).api_tokens
                log.info("credits API: configuration changed; %d token(s) now accepted: %s", len(self._tokens),
                         ", ".join(self._tokens) or "none")
        return self._tokens


def check_authorization(request: Request, *, tokens: dict[str, str]) -> str:
    """The name of the token presented, or an ApiError (401 wrong or missing, 503 none configured)."""
    if not tokens:
        raise ApiError(503, "the credits API is closed: BILLING_API_TOKEN is not configured (nor BILLING_API_TOKENS)")
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        raise ApiError(401, "missing bearer token: send Authorization: Bearer <BILLING_API_TOKEN>",
                       {"WWW-Authenticate": AUTH_CHALLENGE})
    matched = None
    for name, expected in tokens.items():  # every token compared, so the time taken doesn't tell which matched
        if hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8")):
            matched = name
    if matched is None:
        raise ApiError(401, "invalid bearer token", {"WWW-Authenticate": AUTH_CHALLENGE + ', error="invalid_token"'})
    return matched


def check_path_user_id(raw: str) -> str:
    try:
        return ledger.check_user_id(raw)
    except ledger.LedgerError as exc:
        raise ApiError(422, str(exc)) from None


def parse_consume_body(body: bytes) -> tuple[int, str]:
    """(credits, reference) from the request body, or a 422 naming the problem."""
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ApiError(422, 'request body must be JSON: {"credits": N, "reference": "..."}') from None
    if not isinstance(data, dict):
        raise ApiError(422, 'request body must be a JSON object: {"credits": N, "reference": "..."}')
    missing = sorted(CONSUME_FIELDS - data.keys())
    extra = sorted(data.keys() - CONSUME_FIELDS)
    if missing:
        raise ApiError(422, f"missing field(s): {', '.join(missing)}")
    if extra:
        raise ApiError(422, f"unknown field(s): {', '.join(extra)}")
    credits, reference = data["credits"], data["reference"]
    if isinstance(credits, bool) or not isinstance(credits, int):
        raise ApiError(422, f"credits must be a whole number, not {json.dumps(credits)}")
    if credits <= 0:
        raise ApiError(422, f"credits must be positive, not {credits}")
    if credits > ledger.MAX_CREDITS:
        raise ApiError(422, f"credits must be at most {ledger.MAX_CREDITS}")
    if not isinstance(reference, str):
        raise ApiError(422, "reference must be a string")
    if not reference.strip():
        raise ApiError(422, "reference must not be empty: it is what makes a retried spend safe")
    if len(reference) > ledger.MAX_REFERENCE_LENGTH:
        raise ApiError(422, f"reference is longer than {ledger.MAX_REFERENCE_LENGTH} characters")
    if any(ord(c) < 32 for c in reference):
        raise ApiError(422, "reference contains control characters")
    return credits, reference.strip()


# --- database work (runs in the thread pool) ----------------------------------------------

def _engine(settings: Settings):
    return db.get_engine(settings.database_url)


def read_account(user_id: str, *, settings: Settings) -> dict | None:
    with db.read_session(_engine(settings)) as session:
        summary = ledger.account_summary(session, user_id)
    return summary.as_dict() if summary.exists else None


def spend(user_id: str, *, credits: int, reference: str, settings: Settings,
          token_name: str | None = None) -> ledger.ConsumeResult:
    try:
        with db.write_connection(_engine(settings)) as connection:
            return ledger.consume_on_connection(connection, user_id=user_id, credits=credits, reference=reference,
                                                token_name=token_name)
    except ledger.UnknownAccount:
        raise ApiError(404, f"no account for user {user_id!r}") from None
    except (ledger.AccountFlagged, ledger.InsufficientCredits) as exc:
        raise ApiError(402, str(exc)) from None
    except ledger.ReferenceConflict as exc:
        raise ApiError(409, str(exc)) from None
    except ledger.LedgerError as exc:
        raise ApiError(422, str(exc)) from None


# --- endpoints ----------------------------------------------------------------------------

class SpendRunner:
    """Where spends run. SQLite takes one writer at a time, so sixteen pool threads queueing for its lock only
    add thread switches: on SQLite spends run in one thread of their own, in arrival order. PostgreSQL locks
    one account row, so spends on different accounts run in parallel in Starlette's thread pool."""

    def __init__(self):
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _sqlite_executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="credits-spend")
            return self._executor

    async def run(self, func, *args, settings: Settings, **kwargs):
        if db.is_sqlite(_engine(settings)):
            call = partial(func, *args, settings=settings, **kwargs)
            return await asyncio.get_running_loop().run_in_executor(self._sqlite_executor(), call)
        return await run_in_threadpool(func, *args, settings=settings, **kwargs)


def _endpoint(handler, *, settings: Settings | None, tokens: TokenSource | None, runner: SpendRunner):
    async def endpoint(request: Request):
        current = settings or get_settings()
        try:
            token_name = check_authorization(request, tokens=tokens.current() if tokens else current.api_tokens)
            return await handler(request, current, token_name, runner)
        except ApiError as exc:
            return error_response(exc.status, exc.message, exc.headers)
        except db.PoolExhausted:  # every connection of this process busy: say so at once, not after 30 s
            log.warning("credits API: database connections busy on %s %s", request.method, request.url.path)
            return error_response(503, "the billing database is busy; retry shortly", {"Retry-After": "1"})
        except (OperationalError, PoolTimeout):
            log.warning("credits API: database unavailable", exc_info=True)
            return error_response(503, "the billing database is unavailable; retry later")
        except Exception:  # a JSON answer the client understands; the details go to the log only
            log.exception("credits API: unexpected error on %s %s", request.method, request.url.path)
            return error_response(500, "internal error in the credits API")
    return endpoint


async def get_account(request: Request, settings: Settings, token_name: str, runner: SpendRunner) -> JSONResponse:
    user_id = check_path_user_id(request.path_params["user_id"])
    account = await run_in_threadpool(read_account, user_id, settings=settings)
    if account is None:
        raise ApiError(404, f"no account for user {user_id!r}")
    return JSONResponse(account)


async def consume(request: Request, settings: Settings, token_name: str, runner: SpendRunner) -> JSONResponse:
    user_id = check_path_user_id(request.path_params["user_id"])
    credits, reference = parse_consume_body(await _read_limited(request))
    result = await runner.run(spend, user_id, credits=credits, reference=reference, settings=settings,
                              token_name=token_name)
    if not result.replayed:
        log.info("credits API: %s spent %d credits (reference %r, token %s)", result.user_id, result.credits,
                 reference, token_name)
    return JSONResponse(result.as_dict(), headers={"Idempotent-Replayed": "true" if result.replayed else "false"})


async def _read_limited(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    return bytes(body)


def routes(settings: Settings | None = None) -> list[Route]:
    """The API's routes; `settings` defaults to get_settings() read on each request. With `settings` given
    (the sidecar), the tokens are reread from its configuration file when it changes (TokenSource).

    User ids may contain '/', sent percent-encoded, hence the `path` converters; the consume route
    comes first so `.../consume` is never read as part of a user id on POST.
    """
    tokens = TokenSource(settings) if settings is not None else None
    runner = SpendRunner()
    return [
        Route("/api/accounts/{user_id:path}/consume",
              _endpoint(consume, settings=settings, tokens=tokens, runner=runner), methods=["POST"]),
        Route("/api/accounts/{user_id:path}", _endpoint(get_account, settings=settings, tokens=tokens, runner=runner),
              methods=["GET"]),
    ]
