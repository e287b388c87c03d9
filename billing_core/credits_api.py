"""The credits API the DevOps Agent calls on the sidecar: read a balance, spend credits once per reference.

    GET  /api/accounts/{user_id}           the account summary (the names of `balance --json`)
    POST /api/accounts/{user_id}/consume   {"credits": N, "reference": "..."}

Every request needs `Authorization: Bearer <BILLING_API_TOKEN>` (compared in constant time); with no
token configured the API answers 503 and stays closed. Errors are JSON `{"error": "..."}`.
The ledger does the real work inside one write transaction that locks the account, so parallel
spends on one account queue up and can neither overspend nor lose a spend. Database work runs in
the thread pool so a waiting writer never blocks the event loop.
"""
from __future__ import annotations

import hmac
import json
import logging

from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from . import db, ledger
from .settings import Settings, get_settings

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

def check_authorization(request: Request, *, settings: Settings) -> None:
    expected = settings.billing_api_token
    if not expected:
        raise ApiError(503, "the credits API is closed: BILLING_API_TOKEN is not configured")
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        raise ApiError(401, "missing bearer token: send Authorization: Bearer <BILLING_API_TOKEN>",
                       {"WWW-Authenticate": AUTH_CHALLENGE})
    if not hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8")):
        raise ApiError(401, "invalid bearer token", {"WWW-Authenticate": AUTH_CHALLENGE + ', error="invalid_token"'})


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


def spend(user_id: str, *, credits: int, reference: str, settings: Settings) -> ledger.ConsumeResult:
    try:
        with db.write_session(_engine(settings)) as session:
            return ledger.consume(session, user_id=user_id, credits=credits, reference=reference)
    except ledger.UnknownAccount:
        raise ApiError(404, f"no account for user {user_id!r}") from None
    except (ledger.AccountFlagged, ledger.InsufficientCredits) as exc:
        raise ApiError(402, str(exc)) from None
    except ledger.ReferenceConflict as exc:
        raise ApiError(409, str(exc)) from None
    except ledger.LedgerError as exc:
        raise ApiError(422, str(exc)) from None


# --- endpoints ----------------------------------------------------------------------------

def _endpoint(handler, *, settings: Settings | None):
    async def endpoint(request: Request):
        current = settings or get_settings()
        try:
            check_authorization(request, settings=current)
            return await handler(request, current)
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


async def get_account(request: Request, settings: Settings) -> JSONResponse:
    user_id = check_path_user_id(request.path_params["user_id"])
    account = await run_in_threadpool(read_account, user_id, settings=settings)
    if account is None:
        raise ApiError(404, f"no account for user {user_id!r}")
    return JSONResponse(account)


async def consume(request: Request, settings: Settings) -> JSONResponse:
    user_id = check_path_user_id(request.path_params["user_id"])
    credits, reference = parse_consume_body(await _read_limited(request))
    result = await run_in_threadpool(spend, user_id, credits=credits, reference=reference, settings=settings)
    if not result.replayed:
        log.info("credits API: %s spent %d credits (reference %r)", result.user_id, result.credits, reference)
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
    """The API's routes; `settings` defaults to get_settings() read on each request.

    User ids may contain '/', sent percent-encoded, hence the `path` converters; the consume route
    comes first so `.../consume` is never read as part of a user id on POST.
    """
    return [
        Route("/api/accounts/{user_id:path}/consume", _endpoint(consume, settings=settings), methods=["POST"]),
        Route("/api/accounts/{user_id:path}", _endpoint(get_account, settings=settings), methods=["GET"]),
    ]
