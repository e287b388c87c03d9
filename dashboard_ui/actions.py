"""Event actions the Webhook events page offers, passing the operator when billing_core.events records one."""
from __future__ import annotations

import importlib
import inspect
import logging

log = logging.getLogger("billing_core.dashboard")


def _events():
    try:
        return importlib.import_module("billing_core.events")
    except ModuleNotFoundError as exc:
        if exc.name == "billing_core.events":
            return None
        raise


def event_actions_available() -> bool:
    module = _events()
    return module is not None and hasattr(module, "reprocess") and hasattr(module, "replay_failed")


def _with_operator(function, kwargs: dict, operator: str) -> dict:
    if "operator" in inspect.signature(function).parameters:
        return {**kwargs, "operator": operator}
    return kwargs


def _describe(outcome) -> str:
    if outcome is None:
        return "done"
    if isinstance(outcome, (list, tuple)):
        return f"{len(outcome)} event(s)"
    status = getattr(outcome, "status", None)
    if status is None:
        return str(outcome)
    error = getattr(outcome, "error", None)
    return f"{status}" + (f" ({error})" if error else "")


def reprocess_event(event_id: str, *, assigned_user_id: str | None, operator: str) -> str:
    module = _events()
    if module is None or not hasattr(module, "reprocess"):
        raise ValueError("reprocessing is not available: the webhook module is not installed")
    kwargs = _with_operator(module.reprocess, {"assigned_user_id": assigned_user_id}, operator)
    log.warning("operator %s reprocesses event %s (assigned user %s)", operator, event_id, assigned_user_id)
    return _describe(module.reprocess(event_id, **kwargs))


def replay_failed_events(*, operator: str) -> str:
    module = _events()
    if module is None or not hasattr(module, "replay_failed"):
        raise ValueError("replay is not available: the webhook module is not installed")
    log.warning("operator %s replays failed events", operator)
    return _describe(module.replay_failed(**_with_operator(module.replay_failed, {}, operator)))
