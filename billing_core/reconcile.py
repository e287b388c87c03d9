"""Find and repair what the webhooks missed.

1. Page through Stripe's Events API for the period (newest first, 100 a page, `starting_after`).
2. Store and process every event the database doesn't have through `events.ingest(..., source="reconcile")`,
   oldest first: the same idempotent path as the sidecar, so a copy arriving by webhook at the same moment
   is stored once (the event id is unique) and applied once (every ledger effect has a unique source key).
3. Report what still looks wrong: paid Checkout Sessions (payment mode) and paid subscription invoices
   without their grant, grants without a paid payment, anything applied twice, stored events of the
   period that failed or need attention, and credit lots or account totals that don't match their
   entries (`check-ledger`).

Running it again changes nothing: every event is then already stored.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable, Iterable

from sqlalchemy import case, func, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from . import db
from .catalog import PLANS
from .ledger import DOWNGRADE_TAKEBACK, SUBSCRIPTION_GRANT_KINDS
from .ledger_check import check_ledger
from .models import LedgerEntry, Payment, StripeEvent, from_epoch, utcnow
from .settings import Settings

STRIPE_EVENT_RETENTION = timedelta(days=30)
PAGE_SIZE = 100
ID_CHUNK = 500
PAID_SESSION_EVENTS = ("checkout.session.completed", "checkout.session.async_payment_succeeded")
PAID_INVOICE_EVENTS = ("invoice.paid", "invoice.payment_succeeded")
GRANTING_BILLING_REASONS = ("subscription_create", "subscription_cycle")
PAID_PAYMENT_STATUSES = ("paid", "partially_refunded", "refunded", "disputed")
ATTENTION_STATUSES = ("failed", "needs_attention", "received")
IN_FLIGHT_GRACE = timedelta(minutes=5)
DURATION_UNITS = {"m": "minutes", "h": "hours", "d": "days"}

# progress(stage, done, total): stage is "fetching" (total None: unknown) or "processing"
Progress = Callable[[str, int, int | None], None]


class ReconcileError(ValueError):
    """A refusal, in one line."""


def parse_duration(text: str) -> timedelta:
    """'30m', '12h', '3d' -> a timedelta."""
    match = re.fullmatch(r"\s*(\d{1,6})\s*([mhd])\s*", str(text or "").lower())
    if not match:
        raise ReconcileError(f"cannot read the duration {text!r}: use a whole number with m, h or d, e.g. 30m, 12h, 3d")
    amount = int(match.group(1))
    if amount == 0:
        raise ReconcileError(f"the duration {text!r} is zero: nothing to reconcile")
    return timedelta(**{DURATION_UNITS[match.group(2)]: amount})


def check_since(text: str) -> timedelta:
    since = parse_duration(text)
    if since > STRIPE_EVENT_RETENTION:
        raise ReconcileError(f"--since {text.strip()} reaches beyond the 30 days for which Stripe keeps events; "
                             "use at most 30d")
    return since


# --- the report -----------------------------------------------------------------------------

@dataclass
class ReconcileReport:
    since: datetime
    until: datetime
    events_seen: int = 0
    already_stored: int = 0
    recovered: list[dict] = field(default_factory=list)
    arrived_meanwhile: list[dict] = field(default_factory=list)
    recovery_errors: list[dict] = field(default_factory=list)
    stored_needing_attention: list[dict] = field(default_factory=list)
    paid_sessions_without_grant: list[dict] = field(default_factory=list)
    paid_invoices_without_grant: list[dict] = field(default_factory=list)
    grants_without_payment: list[dict] = field(default_factory=list)
    applied_twice: list[dict] = field(default_factory=list)
    ledger_mismatches: list[dict] = field(default_factory=list)  # check-ledger: lots and totals vs the entries

    @property
    def problems(self) -> int:
        return (len(self.recovery_errors) + len(self.stored_needing_attention) + len(self.paid_sessions_without_grant)
                + len(self.paid_invoices_without_grant) + len(self.grants_without_payment) + len(self.applied_twice)
                + len(self.ledger_mismatches))

    def as_dict(self) -> dict:
        return {
            "since": self.since.isoformat(), "until": self.until.isoformat(),
            "events": {"seen": self.events_seen, "already_stored": self.already_stored,
                       "recovered": len(self.recovered), "arrived_meanwhile": len(self.arrived_meanwhile),
                       "failed": len(self.recovery_errors)},
            "recovered": self.recovered,
            "recovery_errors": self.recovery_errors,
            "stored_needing_attention": self.stored_needing_attention,
            "paid_sessions_without_grant": self.paid_sessions_without_grant,
            "paid_invoices_without_grant": self.paid_invoices_without_grant,
            "grants_without_payment": self.grants_without_payment,
            "applied_twice": self.applied_twice,
            "ledger_mismatches": self.ledger_mismatches,
            "problems": self.problems,
            "ok": self.problems == 0,
        }


# --- 1. fetch ---------------------------------------------------------------------------------

def _as_dict(obj) -> dict:
    # for_json: decimal strings Stripe sent (e.g. unit_amount_decimal) stay strings, as on the wire
    return obj.to_dict(for_json=True) if hasattr(obj, "to_dict") else dict(obj)


def fetch_events(client, *, created_gte: int, progress: Progress | None = None) -> list[dict]:
    """Every event created at or after `created_gte`, newest first, as plain dicts."""
    from .stripe_client import stripe_errors

    events: list[dict] = []
    params: dict = {"created": {"gte": created_gte}, "limit": PAGE_SIZE}
    while True:
        with stripe_errors("listing Stripe events"):
            page = client.v1.events.list(params=params)
        events.extend(_as_dict(event) for event in page.data)
        if progress:
            progress("fetching", len(events), None)
        if not page.has_more or not page.data:
            return events
        params = {**params, "starting_after": events[-1]["id"]}


# --- 2. recover -------------------------------------------------------------------------------

def stored_event_ids(session: Session, ids: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(ids), ID_CHUNK):
        chunk = ids[start:start + ID_CHUNK]
        found.update(session.execute(select(StripeEvent.id).where(StripeEvent.id.in_(chunk))).scalars())
    return found


def _stored_row(engine: Engine, event_id: str) -> StripeEvent | None:
    with db.read_session(engine) as session:
        return session.get(StripeEvent, event_id)


def recover_events(missing: list[dict], *, engine: Engine, settings: Settings, report: ReconcileReport,
                   progress: Progress | None = None) -> None:
    """Ingest each missing event, oldest first; one event's failure doesn't stop the others."""
    from . import events as event_store

    ordered = sorted(missing, key=lambda e: (e.get("created") or 0))
    for done, event in enumerate(ordered, start=1):
        summary = {"id": event["id"], "type": event.get("type")}
        try:
            event_store.ingest(event, raw_payload=json.dumps(event, sort_keys=True), source="reconcile", engine=engine,
                               settings=settings)
        except Exception as exc:  # noqa: BLE001 - reported per event; the run goes on
            report.recovery_errors.append({**summary, "error": _one_line(exc)})
        else:
            row = _stored_row(engine, event["id"])
            if row is None:
                report.recovery_errors.append({**summary, "error": "not stored after ingest"})
            elif row.source != "reconcile":
                report.arrived_meanwhile.append({**summary, "status": row.status, "source": row.source})
            elif row.status == "failed":
                report.recovery_errors.append({**summary, "error": row.error or "processing failed"})
            else:
                report.recovered.append({**summary, "status": row.status, "user_id": row.user_id,
                                         **({"error": row.error} if row.error else {})})
        if progress:
            progress("processing", done, len(ordered))


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


# --- 3. check ---------------------------------------------------------------------------------

def _object(event: dict) -> dict:
    return ((event.get("data") or {}).get("object")) or {}


def _latest_by_id(events: Iterable[dict], types: tuple[str, ...]) -> dict[str, dict]:
    """object id -> the newest event of these types about it."""
    found: dict[str, dict] = {}
    for event in events:
        obj = _object(event)
        if event.get("type") in types and obj.get("id"):
            known = found.get(obj["id"])
            if known is None or (event.get("created") or 0) > (known.get("created") or 0):
                found[obj["id"]] = event
    return found


def _user_hint(obj: dict) -> str | None:
    metadata = obj.get("metadata") or {}
    return metadata.get("user_id") or obj.get("client_reference_id")


def _granted_payment_ids(session: Session, payment_ids: list[int], kinds: tuple[str, ...]) -> set[int]:
    if not payment_ids:
        return set()
    stmt = select(LedgerEntry.payment_id).where(LedgerEntry.payment_id.in_(payment_ids), LedgerEntry.kind.in_(kinds))
    return set(session.execute(stmt).scalars())


def _payments_by(session: Session, column, ids: list[str]) -> dict[str, Payment]:
    found: dict[str, Payment] = {}
    for start in range(0, len(ids), ID_CHUNK):
        for payment in session.exec(select(Payment).where(column.in_(ids[start:start + ID_CHUNK]))).scalars():
            found[getattr(payment, column.key)] = payment
    return found


def paid_sessions_without_grant(session: Session, events: list[dict]) -> list[dict]:
    paid = {sid: event for sid, event in _latest_by_id(events, PAID_SESSION_EVENTS).items()
            if _object(event).get("mode") == "payment"
            and _object(event).get("payment_status") in ("paid", "no_payment_required")}
    payments = _payments_by(session, Payment.checkout_session_id, list(paid))
    granted = _granted_payment_ids(session, [p.id for p in payments.values()], ("pack_grant",))
    granted_keys = _existing_source_keys(session, [f"checkout:{sid}" for sid in paid])
    missing = []
    for session_id, event in sorted(paid.items()):
        payment = payments.get(session_id)
        if (payment is not None and payment.id in granted) or f"checkout:{session_id}" in granted_keys:
            continue
        obj = _object(event)
        missing.append({"session_id": session_id, "user_id": payment.user_id if payment else _user_hint(obj),
                        "amount_cents": obj.get("amount_total"), "currency": obj.get("currency"),
                        "payment_recorded": payment is not None, "event_id": event["id"]})
    return missing


def _subscription_id(invoice: dict) -> str | None:
    details = ((invoice.get("parent") or {}).get("subscription_details")) or {}
    sub = details.get("subscription") or invoice.get("subscription")
    return sub.get("id") if isinstance(sub, dict) else sub


def _subscription_period_end(invoice: dict) -> int | None:
    """The end of the period the invoice's subscription line covers (not the invoice's own period_end)."""
    ends = []
    for line in ((invoice.get("lines") or {}).get("data")) or []:
        parent = line.get("parent") or {}
        is_subscription_line = parent.get("type") == "subscription_item_details" or line.get("subscription")
        end = (line.get("period") or {}).get("end")
        if is_subscription_line and end and (line.get("amount") or 0) >= 0:
            ends.append(int(end))
    return max(ends) if ends else None


def _periods_granted(session: Session, periods: list[tuple[str, int]]) -> set[tuple[str, int]]:
    if not periods:
        return set()
    subscription_ids = sorted({sub for sub, _ in periods})
    stmt = (select(LedgerEntry.subscription_id, LedgerEntry.period_end)
            .where(LedgerEntry.subscription_id.in_(subscription_ids), LedgerEntry.kind.in_(SUBSCRIPTION_GRANT_KINDS)))
    return {(sub, int(end)) for sub, end in session.execute(stmt).all() if end is not None}


def paid_invoices_without_grant(session: Session, events: list[dict]) -> list[dict]:
    paid = {iid: event for iid, event in _latest_by_id(events, PAID_INVOICE_EVENTS).items()
            if _object(event).get("billing_reason") in GRANTING_BILLING_REASONS
            and _object(event).get("status", "paid") == "paid"}
    payments = _payments_by(session, Payment.invoice_id, list(paid))
    granted = _granted_payment_ids(session, [p.id for p in payments.values()], SUBSCRIPTION_GRANT_KINDS)
    periods = {iid: (_subscription_id(_object(e)), _subscription_period_end(_object(e))) for iid, e in paid.items()}
    granted_periods = _periods_granted(session, [p for p in periods.values() if p[0] and p[1]])
    missing = []
    for invoice_id, event in sorted(paid.items()):
        payment = payments.get(invoice_id)
        if (payment is not None and payment.id in granted) or periods[invoice_id] in granted_periods:
            continue
        obj = _object(event)
        details = ((obj.get("parent") or {}).get("subscription_details")) or {}
        missing.append({"invoice_id": invoice_id, "subscription_id": periods[invoice_id][0],
                        "period_end": periods[invoice_id][1], "billing_reason": obj.get("billing_reason"),
                        "user_id": payment.user_id if payment and payment.user_id
                        else (details.get("metadata") or {}).get("user_id"),
                        "amount_cents": obj.get("amount_paid"), "currency": obj.get("currency"),
                        "payment_recorded": payment is not None, "event_id": event["id"]})
    return missing


def _existing_source_keys(session: Session, keys: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(keys), ID_CHUNK):
        found.update(session.execute(select(LedgerEntry.source_key)
                                     .where(LedgerEntry.source_key.in_(keys[start:start + ID_CHUNK]))).scalars())
    return found


def grants_without_payment(session: Session) -> list[dict]:
    """Pack and subscription grants that no paid payment stands behind (adjustments are people's choices)."""
    stmt = (select(LedgerEntry, Payment.status)
            .outerjoin(Payment, Payment.id == LedgerEntry.payment_id)
            .where(LedgerEntry.kind.in_(("pack_grant", "subscription_grant")),
                   (LedgerEntry.payment_id.is_(None)) | (Payment.status.not_in(PAID_PAYMENT_STATUSES)))
            .order_by(LedgerEntry.id))
    return [{"entry_id": entry.id, "user_id": entry.user_id, "kind": entry.kind, "credits": entry.credits,
             "source_key": entry.source_key, "payment_id": entry.payment_id, "payment_status": status,
             "created_at": entry.created_at.isoformat()}
            for entry, status in session.execute(stmt).all()]


def _max_allowance() -> int:
    return max(plan.credits for plan in PLANS)


def applied_twice(session: Session) -> list[dict]:
    """Effects the unique keys should make impossible: checked anyway, over the whole ledger."""
    found = []
    per_payment = (select(LedgerEntry.payment_id, LedgerEntry.user_id, func.count(), func.sum(LedgerEntry.credits))
                   .where(LedgerEntry.kind == "pack_grant", LedgerEntry.payment_id.is_not(None))
                   .group_by(LedgerEntry.payment_id, LedgerEntry.user_id).having(func.count() > 1))
    for payment_id, user_id, count, credits in session.execute(per_payment).all():
        found.append({"what": "pack granted more than once for one payment", "payment_id": payment_id,
                      "user_id": user_id, "grants": count, "credits": int(credits)})
    # net of downgrade take-backs: several plan changes in a period each grant or take back (plan_changes)
    per_period = (select(LedgerEntry.subscription_id, LedgerEntry.period_end, LedgerEntry.user_id,
                         func.sum(case((LedgerEntry.kind.in_(SUBSCRIPTION_GRANT_KINDS), 1), else_=0)),
                         func.sum(LedgerEntry.credits),
                         func.sum(case((LedgerEntry.kind == "subscription_grant", 1), else_=0)))
                  .where(LedgerEntry.kind.in_((*SUBSCRIPTION_GRANT_KINDS, DOWNGRADE_TAKEBACK)))
                  .group_by(LedgerEntry.subscription_id, LedgerEntry.period_end, LedgerEntry.user_id))
    for sub_id, period_end, user_id, count, credits, base_grants in session.execute(per_period).all():
        if int(base_grants or 0) > 1 or int(credits) > _max_allowance():
            found.append({"what": "subscription period granted more than once", "subscription_id": sub_id,
                          "period_end": period_end, "user_id": user_id, "grants": count, "credits": int(credits)})
    per_payment_total = (select(Payment.id, Payment.user_id, Payment.credits_granted, func.sum(LedgerEntry.credits))
                         .join(LedgerEntry, LedgerEntry.payment_id == Payment.id)
                         .where(LedgerEntry.kind == "pack_grant", Payment.credits_granted > 0)
                         .group_by(Payment.id, Payment.user_id, Payment.credits_granted)
                         .having(func.sum(LedgerEntry.credits) > Payment.credits_granted))
    for payment_id, user_id, expected, credits in session.execute(per_payment_total).all():
        if not any(row.get("payment_id") == payment_id for row in found):
            found.append({"what": "pack grant larger than the payment bought", "payment_id": payment_id,
                          "user_id": user_id, "grants": None, "credits": int(credits), "expected": expected})
    return found


def stored_needing_attention(session: Session, *, created_gte: int, now: datetime) -> list[dict]:
    """Stored events of the period that failed, need a person, or were stored but never processed
    (a row stored in the last few minutes may still be in flight in the sidecar, so it doesn't count yet)."""
    in_flight_since = now - IN_FLIGHT_GRACE
    stmt = (select(StripeEvent.id, StripeEvent.type, StripeEvent.status, StripeEvent.error, StripeEvent.source)
            .where(StripeEvent.created >= created_gte, StripeEvent.status.in_(ATTENTION_STATUSES),
                   (StripeEvent.status != "received") | (StripeEvent.received_at < in_flight_since))
            .order_by(StripeEvent.created))
    return [{"id": eid, "type": etype, "status": status, "source": source, "error": (error or "")[:300]}
            for eid, etype, status, error, source in session.execute(stmt).all()]


# --- the whole run ----------------------------------------------------------------------------

def reconcile(*, since: timedelta, settings: Settings, engine: Engine, client=None,
              progress: Progress | None = None, now: datetime | None = None) -> ReconcileReport:
    if since > STRIPE_EVENT_RETENTION:
        raise ReconcileError("Stripe keeps events for 30 days; reconcile at most 30d")
    if client is None:
        from .stripe_client import make_stripe_client
        client = make_stripe_client(settings)
    now = now or utcnow()
    created_gte = int((now - since).timestamp())
    report = ReconcileReport(since=from_epoch(created_gte), until=now.replace(microsecond=0))

    events = fetch_events(client, created_gte=created_gte, progress=progress)
    report.events_seen = len(events)
    with db.read_session(engine) as session:
        known = stored_event_ids(session, [e["id"] for e in events])
    report.already_stored = len(known)
    recover_events([e for e in events if e["id"] not in known], engine=engine, settings=settings, report=report,
                   progress=progress)

    with db.read_session(engine) as session:
        report.paid_sessions_without_grant = paid_sessions_without_grant(session, events)
        report.paid_invoices_without_grant = paid_invoices_without_grant(session, events)
        report.grants_without_payment = grants_without_payment(session)
        report.applied_twice = applied_twice(session)
        report.ledger_mismatches = check_ledger(session).mismatches
        recovered_failures = {row["id"] for row in report.recovery_errors}
        report.stored_needing_attention = [row for row in stored_needing_attention(session, created_gte=created_gte, now=now)
                                           if row["id"] not in recovered_failures]
    return report
