"""Maker-checker for support adjustments beyond the rolling 24-hour cap (SUPPORT_DAILY_ADJUSTMENT_CAP):
the adjustment becomes a request; an admin other than the requester approves or rejects it, with a reason.
Approval applies it through ledger.adjust under the source key `adjust:request:<id>`, so approving twice
(two admins at once, a double click) applies it once.
"""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlmodel import Session

from . import db, ledger
from .models import Account, AdjustmentRequest, LedgerEntry, utcnow
from .operators import Identity, OperatorError, OverDailyCap, PermissionDenied, adjust_as, check_admin
from .settings import Settings


@dataclass(frozen=True)
class AdjustOutcome:
    entries: list
    request: AdjustmentRequest | None = None  # set when the adjustment waits for an admin


def adjust_or_request(session: Session, *, identity: Identity, user_id: str, credits: int, reason: str,
                      settings: Settings, allow_negative: bool = False, source_key: str) -> AdjustOutcome:
    """adjust_as; a support adjustment over the daily cap becomes a pending request instead."""
    try:
        return AdjustOutcome(entries=adjust_as(session, identity=identity, user_id=user_id, credits=credits,
                                               reason=reason, settings=settings, allow_negative=allow_negative,
                                               source_key=source_key))
    except OverDailyCap:
        return AdjustOutcome(entries=[], request=request_adjustment(
            session, identity=identity, user_id=user_id, credits=credits, reason=reason, form_key=source_key))


def request_adjustment(session: Session, *, identity: Identity, user_id: str, credits: int, reason: str,
                       form_key: str) -> AdjustmentRequest:
    """A pending request; the same form_key (a form sent twice) returns the request already made."""
    existing = session.execute(select(AdjustmentRequest).where(AdjustmentRequest.form_key == form_key)
                               ).scalars().first()
    if existing is not None:
        return existing
    user_id = ledger.check_user_id(user_id)
    credits = ledger.check_credits(credits, allow_negative=True)
    if not (isinstance(reason, str) and reason.strip()):
        raise ledger.LedgerError("a reason is required for every adjustment")
    reason = ledger.check_text(reason, what="the reason", max_length=ledger.MAX_REASON_LENGTH, allow_newlines=True)
    if session.get(Account, user_id) is None:
        raise OperatorError(f"no account for user {user_id!r}")
    request = AdjustmentRequest(user_id=user_id, credits=credits, reason=reason, requested_by=identity.name,
                                requested_at=utcnow(), form_key=form_key)
    session.add(request)
    session.flush()
    return request


def pending_requests(session: Session, *, requested_by: str | None = None, limit: int = 100) -> list[AdjustmentRequest]:
    query = select(AdjustmentRequest).where(AdjustmentRequest.status == "pending")
    if requested_by:
        query = query.where(AdjustmentRequest.requested_by == requested_by)
    return list(session.execute(query.order_by(AdjustmentRequest.requested_at).limit(limit)).scalars())


def recent_decisions(session: Session, *, user_id: str | None = None, limit: int = 50) -> list[AdjustmentRequest]:
    query = select(AdjustmentRequest).where(AdjustmentRequest.status != "pending")
    if user_id:
        query = query.where(AdjustmentRequest.user_id == user_id)
    return list(session.execute(query.order_by(AdjustmentRequest.decided_at.desc()).limit(limit)).scalars())


def request_source_key(request_id: int) -> str:
    return f"adjust:request:{request_id}"


def decide(session: Session, *, identity: Identity, request_id: int, approve: bool, reason: str) -> AdjustOutcome:
    """An admin approves (applies through ledger.adjust) or rejects a pending request, saying why."""
    check_admin(identity, "approve or reject adjustment requests")
    if not (isinstance(reason, str) and reason.strip()):
        raise OperatorError("say why: a reason is required to approve or reject a request")
    reason = ledger.check_text(reason, what="the reason", max_length=ledger.MAX_REASON_LENGTH, allow_newlines=True)
    request = session.execute(db.for_update(select(AdjustmentRequest).where(AdjustmentRequest.id == request_id),
                                            session)).scalars().first()
    if request is None:
        raise OperatorError(f"no adjustment request #{request_id}")
    if request.status != "pending":
        raise OperatorError(f"request #{request.id} was already {request.status} by {request.decided_by}")
    if request.requested_by == identity.name:
        raise PermissionDenied("an admin may not decide their own request")
    entries: list[LedgerEntry] = []
    if approve:
        entries = ledger.adjust(session, user_id=request.user_id, credits=request.credits,
                                reason=f"request #{request.id} by {request.requested_by}: {request.reason}"[
                                    :ledger.MAX_REASON_LENGTH],
                                operator=identity.name, source_key=request_source_key(request.id))
    request.status = "approved" if approve else "rejected"
    request.decided_by = identity.name
    request.decided_at = utcnow()
    request.decision_reason = reason
    session.add(request)
    session.flush()
    return AdjustOutcome(entries=entries, request=request)
