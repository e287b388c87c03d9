"""API-version drift: the versions Stripe renders our events in, against the version this code pins.

The pinned version is the installed stripe library's `stripe.api_version`; the handlers read fields where
that version puts them. An endpoint on another version sends events shaped differently, and an endpoint
missing one of the handled event types never tells us about it.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import stripe
from sqlalchemy import func, select
from sqlmodel import Session

from .handlers import EVENT_TYPES
from .models import StripeEvent, utcnow
from .settings import Problem, Settings

RECENT_DAYS = 30
SETTING = "webhook endpoints"


def pinned_version() -> str:
    return stripe.api_version


def recent_event_versions(session: Session, *, days: int = RECENT_DAYS, now: datetime | None = None) -> list[dict]:
    """Per API version of the events received in the last `days`: count, last received, pinned or not."""
    since = (now or utcnow()) - timedelta(days=days)
    rows = session.execute(select(StripeEvent.api_version, func.count(), func.max(StripeEvent.received_at))
                           .where(StripeEvent.received_at >= since)
                           .group_by(StripeEvent.api_version)).all()
    pinned = pinned_version()
    found = [{"api_version": version, "events": int(count), "last_received": last,
              "pinned": version == pinned} for version, count, last in rows]
    return sorted(found, key=lambda r: (not r["pinned"], -r["events"], r["api_version"] or ""))


@dataclass
class EndpointCheck:
    endpoints: list[dict]
    problems: list[Problem]

    def lines(self) -> list[str]:
        if not self.endpoints:
            return ["webhook endpoints: none in this Stripe account"]
        out = [f"webhook endpoints ({len(self.endpoints)}; pinned API version {pinned_version()}):"]
        for e in self.endpoints:
            events = ", ".join(e["enabled_events"]) or "none"
            out.append(f"  {e['id']} {e['url']} [{e['status']}] API version {e['api_version'] or 'account default'}"
                       f"; events: {events}")
        return out


def _as_dict(obj) -> dict:
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


def list_endpoints(client) -> list[dict]:
    endpoints, params = [], {"limit": 100}
    while True:
        page = client.v1.webhook_endpoints.list(params=params)
        endpoints += [_as_dict(e) for e in page.data]
        if not page.has_more or not page.data:
            return endpoints
        params = {"limit": 100, "starting_after": endpoints[-1]["id"]}


def endpoint_problems(endpoints: list[dict]) -> list[Problem]:
    pinned = pinned_version()
    enabled = [e for e in endpoints if e.get("status") == "enabled"]
    if not enabled:
        return [Problem("warning", SETTING, "no enabled webhook endpoint in this Stripe account: no events arrive "
                                            "(unless forwarded by `stripe listen`); add one for "
                                            "<your public URL>/api/stripe/webhook")]
    problems = []
    for e in enabled:
        version = e.get("api_version")
        if version != pinned:
            problems.append(Problem("warning", SETTING, f"{e['id']} ({e.get('url')}) is on API version "
                                    f"{version or 'of the account default'}, not the pinned {pinned}: its events may "
                                    "carry fields elsewhere; create the endpoint again with the pinned version"))
    covered = set()
    for e in enabled:
        covered |= set(EVENT_TYPES) if "*" in (e.get("enabled_events") or []) else set(e.get("enabled_events") or [])
    missing = [t for t in EVENT_TYPES if t not in covered]
    if missing:
        problems.append(Problem("warning", SETTING, "no enabled endpoint sends " + ", ".join(missing)
                                + ": add these event types to the endpoint"))
    return problems


def check_webhook_endpoints(settings: Settings, *, client=None) -> EndpointCheck:
    """The account's endpoints and what is wrong with them (check-config --stripe)."""
    from .stripe_client import StripeNotConfigured, describe_stripe_error, make_stripe_client

    try:
        client = client or make_stripe_client(settings)
        endpoints = list_endpoints(client)
    except StripeNotConfigured as exc:
        return EndpointCheck([], [Problem("error", "STRIPE_SECRET_KEY", f"--stripe: {exc}")])
    except stripe.StripeError as exc:
        return EndpointCheck([], [Problem("error", SETTING, f"listing them failed: "
                                                             f"{describe_stripe_error(exc, settings=settings)}")])
    return EndpointCheck(endpoints, endpoint_problems(endpoints))
