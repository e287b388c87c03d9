"""Event actions the Webhook events page offers; the operator is recorded on each event they touch."""
from __future__ import annotations

import logging

from billing_core import db, events
from billing_core.settings import get_settings

log = logging.getLogger("billing_core.dashboard")


def _describe(outcome) -> str:
    if isinstance(outcome, list):
        return f"{len(outcome)} event(s)"
    return outcome.status + (f" ({outcome.error})" if outcome.error else "")


def reprocess_event(event_id: str, *, assigned_user_id: str | None, operator: str) -> str:
    log.info("operator %s reprocesses event %s (assigned user %s)", operator, event_id, assigned_user_id)
    settings = get_settings()
    return _describe(events.reprocess(event_id, assigned_user_id=assigned_user_id, operator=operator,
                                      settings=settings, engine=db.get_engine(settings.database_url)))


def replay_failed_events(*, operator: str) -> str:
    log.info("operator %s replays failed events", operator)
    settings = get_settings()
    return _describe(events.replay_failed(operator=operator, settings=settings,
                                          engine=db.get_engine(settings.database_url)))
