"""Checkout links for plans and packs, the customer portal link, and the link status the webhooks update.

A link is one Stripe Checkout Session. Its idempotency key is derived from (user, item, customer or
email, a 10-minute window), and every parameter, `expires_at` included, is derived from the same
inputs, so a double click or a retry within the window sends identical parameters and gets the same
session back from Stripe. A link already recorded for that key is returned without asking Stripe, and so
is an open one recorded for the previous window's key less than a window ago (a double click across
the window boundary), when it stays open at least 30 more minutes.

One plan per user: before a new plan link is created, the user's other open plan links are expired in
Stripe (`checkout.sessions.expire`) and marked expired here, so two plan links can't both be paid. When
one of them turns out to be paid already, no new plan link is issued. Pack links are left alone.

The Stripe call happens outside any database write transaction (SQLite's write lock is never held
during an HTTP request): read what we know, ask Stripe, then record the link.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import stripe
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from . import db, ledger
from .catalog import TIERS, get_item, price_id_for
from .models import Account, CheckoutLink, from_epoch, utcnow
from .settings import Settings
from .stripe_client import make_stripe_client, stripe_errors

SUCCESS_PATH = "/checkout/success"
CANCEL_PATH = "/checkout/cancel"
IDEMPOTENCY_WINDOW_SECONDS = 10 * 60
# Stripe refuses an expires_at more than 24 h after *its* clock; stay clear of that limit when ours runs ahead.
CLOCK_SKEW_MARGIN_SECONDS = 5 * 60
# A link from the previous window is handed out again only when it stays open at least this long.
REUSE_MIN_REMAINING = timedelta(minutes=30)
LINK_STATUSES = ("open", "complete", "expired")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class CheckoutRefused(ValueError):
    """A link we won't create; the message says why and what to do instead."""


@dataclass(frozen=True)
class IssuedLink:
    url: str
    session_id: str
    expires_at: datetime
    item: str
    user_id: str
    operator: str | None
    reused: bool  # True when the link recorded earlier in this window was returned

    def as_dict(self) -> dict:
        return {"url": self.url, "session_id": self.session_id, "expires_at": self.expires_at.isoformat(),
                "item": self.item, "user_id": self.user_id}


def success_url(settings: Settings) -> str:
    return f"{settings.base_url}{SUCCESS_PATH}?session_id={{CHECKOUT_SESSION_ID}}"


def cancel_url(settings: Settings) -> str:
    return f"{settings.base_url}{CANCEL_PATH}"


def check_email(email: str | None) -> str | None:
    if email is None or not email.strip():
        return None
    email = email.strip()
    if len(email) > 320 or not _EMAIL.match(email):
        raise CheckoutRefused(f"{email!r} is not an email address")
    return email


def idempotency_key(*, user_id: str, item: str, payer: str, window_start: int) -> str:
    digest = hashlib.sha256(f"{user_id}\x1f{item}\x1f{payer}\x1f{window_start}".encode()).hexdigest()
    return f"checkout-link-{digest[:40]}"


def link_expiry(window_start: int, settings: Settings) -> int:
    """Derived from the window, not the click, so a repeat in the window sends the same `expires_at`."""
    return window_start + settings.checkout_link_expiry_hours * 3600 - CLOCK_SKEW_MARGIN_SECONDS


def session_params(*, settings: Settings, user_id: str, item_key: str, customer_id: str | None,
                   email: str | None, expires_at: int) -> dict:
    """The Checkout Session parameters for (user, item): a pure function of its inputs."""
    item = get_item(item_key)
    labels = {"user_id": user_id, "item": item.key}
    params: dict = {
        "mode": "subscription" if item.kind == "plan" else "payment",
        "line_items": [{"price": price_id_for(item.key, settings), "quantity": 1}],
        "client_reference_id": user_id,
        "metadata": {**labels, "credits": str(item.credits)},
        "success_url": success_url(settings),
        "cancel_url": cancel_url(settings),
        "expires_at": expires_at,
    }
    if item.kind == "plan":
        params["subscription_data"] = {"metadata": dict(labels)}
    else:
        params["payment_intent_data"] = {"metadata": dict(labels)}
    if customer_id:
        params["customer"] = customer_id
    else:
        if email:
            params["customer_email"] = email
        if item.kind == "pack":
            params["customer_creation"] = "always"
    return params


def _live_subscription_refusal(session: Session, user_id: str) -> str | None:
    subscription = ledger.current_subscription(session, user_id)
    if subscription is None or subscription.status not in ledger.LIVE_STATUSES:
        return None
    return (f"{user_id} already has a subscription ({subscription.tier}, {subscription.status}, "
            f"{subscription.id}); change plans in the Stripe customer portal instead: "
            f"python -m billing_core portal-link {user_id}")


def _recorded_link(session: Session, key: str, now: datetime, *, previous_key: str) -> CheckoutLink | None:
    """The open link recorded for this window's key; else one for the same (user, item, payer) from the
    previous window issued less than a window ago (a double click across the boundary) that stays open
    a while longer."""
    link = session.execute(select(CheckoutLink).where(CheckoutLink.idempotency_key == key)
                           .order_by(CheckoutLink.created_at.desc())).scalars().first()
    if link is not None and link.status == "open" and _aware(link.expires_at) > now:
        return link
    link = session.execute(select(CheckoutLink).where(CheckoutLink.idempotency_key == previous_key)
                           .order_by(CheckoutLink.created_at.desc())).scalars().first()
    if (link is not None and link.status == "open"
            and _aware(link.created_at) > now - timedelta(seconds=IDEMPOTENCY_WINDOW_SECONDS)
            and _aware(link.expires_at) > now + REUSE_MIN_REMAINING):
        return link
    return None


def _aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; they were stored as UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _issued(link: CheckoutLink, *, reused: bool) -> IssuedLink:
    return IssuedLink(url=link.url, session_id=link.session_id, expires_at=_aware(link.expires_at), item=link.item,
                      user_id=link.user_id, operator=link.operator, reused=reused)


def create_checkout_link(*, user_id: str, item: str, operator: str | None = None, email: str | None = None,
                         settings: Settings, engine: Engine, now: datetime | None = None, client=None) -> IssuedLink:
    """Create (or return the already issued) Checkout link for a user and a catalog item, and record it."""
    user_id = ledger.check_user_id(user_id)
    catalog_item = get_item(item)
    email = check_email(email)
    operator = operator.strip() if operator and operator.strip() else None
    client = client or make_stripe_client(settings)
    price_id_for(catalog_item.key, settings)  # refuse before any work when no price is configured
    now = now or utcnow()
    window_start = int(now.timestamp()) // IDEMPOTENCY_WINDOW_SECONDS * IDEMPOTENCY_WINDOW_SECONDS

    with db.read_session(engine) as session:
        if catalog_item.kind == "plan":
            refusal = _live_subscription_refusal(session, user_id)
            if refusal:
                raise CheckoutRefused(refusal)
        account = session.get(Account, user_id)
        customer_id = account.stripe_customer_id if account else None
        email = email or (account.email if account else None)
        payer = customer_id or email or ""
        key = idempotency_key(user_id=user_id, item=catalog_item.key, payer=payer, window_start=window_start)
        previous_key = idempotency_key(user_id=user_id, item=catalog_item.key, payer=payer,
                                       window_start=window_start - IDEMPOTENCY_WINDOW_SECONDS)
        recorded = _recorded_link(session, key, now, previous_key=previous_key)
        if recorded is not None:
            return _issued(recorded, reused=True)

    if catalog_item.kind == "plan":
        expire_other_plan_links(user_id=user_id, now=now, client=client, settings=settings, engine=engine)
    params = session_params(settings=settings, user_id=user_id, item_key=catalog_item.key, customer_id=customer_id,
                            email=email, expires_at=link_expiry(window_start, settings))
    with stripe_errors(f"creating the checkout link for {user_id} ({catalog_item.key})", settings=settings):
        stripe_session = client.v1.checkout.sessions.create(params=params, options={"idempotency_key": key})

    with db.write_session(engine) as session:
        ledger.lock_account(session, user_id=user_id, create=True, email=email)
        link = session.execute(select(CheckoutLink).where(CheckoutLink.session_id == stripe_session.id)
                               ).scalars().first()
        if link is None:  # a concurrent double click may have recorded the same session already
            link = CheckoutLink(session_id=stripe_session.id, idempotency_key=key, user_id=user_id,
                                item=catalog_item.key, url=stripe_session.url, operator=operator, status="open",
                                created_at=now, expires_at=from_epoch(stripe_session.expires_at))
            session.add(link)
            session.flush()
        return _issued(link, reused=False)


def open_plan_links(session: Session, *, user_id: str, now: datetime) -> list[CheckoutLink]:
    stmt = (select(CheckoutLink).where(CheckoutLink.user_id == user_id, CheckoutLink.status == "open",
                                       CheckoutLink.item.in_(TIERS))
            .order_by(CheckoutLink.created_at))
    return [link for link in session.execute(stmt).scalars() if _aware(link.expires_at) > now]


def expire_other_plan_links(*, user_id: str, now: datetime, client, settings: Settings,
                            engine: Engine) -> list[str]:
    """Expire the user's open plan links in Stripe and record it; the expired session ids. Refuses when one
    of them was paid meanwhile (its subscription is on its way: a new plan link would make a second one)."""
    with db.read_session(engine) as session:
        found = [(link.session_id, link.item) for link in open_plan_links(session, user_id=user_id, now=now)]
    expired = []
    for session_id, item in found:
        with stripe_errors(f"expiring {user_id}'s earlier {item} link {session_id}", settings=settings):
            try:
                client.v1.checkout.sessions.expire(session_id, options={"idempotency_key": f"expire-{session_id}"})
                status = "expired"
            except stripe.InvalidRequestError:  # no longer open: record what Stripe says it is
                status = client.v1.checkout.sessions.retrieve(session_id).status
                if status not in ("expired", "complete"):
                    raise
        with db.write_session(engine) as session:
            mark_link_status(session, session_id=session_id, status=status, at=now)
        if status == "complete":
            raise CheckoutRefused(f"{user_id}'s earlier {item} link {session_id} has been paid: their subscription "
                                  "is on its way; change plans in the Stripe customer portal instead: "
                                  f"python -m billing_core portal-link {user_id}")
        expired.append(session_id)
    return expired


def create_portal_link(*, user_id: str, settings: Settings, engine: Engine, client=None) -> str:
    """A Stripe customer portal URL where the user changes or cancels their plan."""
    user_id = ledger.check_user_id(user_id)
    client = client or make_stripe_client(settings)
    with db.read_session(engine) as session:
        account = session.get(Account, user_id)
        customer_id = account.stripe_customer_id if account else None
    if not customer_id:
        raise CheckoutRefused(f"no Stripe customer is known for {user_id} yet (they have not completed a "
                              "checkout); send a checkout link instead: python -m billing_core checkout-link "
                              f"{user_id} ITEM")
    from .catalog_sync import find_portal_configuration

    with stripe_errors(f"creating the customer portal link for {user_id}", settings=settings):
        configuration = find_portal_configuration(client)
        if configuration is None or not configuration.get("active"):
            raise CheckoutRefused("Stripe holds no active customer portal configuration made by sync-catalog "
                                  "(plan switching, upgrades invoiced at once, downgrades at the period's end); "
                                  "run: python -m billing_core sync-catalog")
        portal = client.v1.billing_portal.sessions.create(
            params={"customer": customer_id, "return_url": settings.base_url,
                    "configuration": configuration["id"]})
    return portal.url


def mark_link_status(session: Session, *, session_id: str, status: str, at: datetime | None = None) -> bool:
    """Record what Stripe said about an issued link (webhook handlers call this inside their transaction).
    open -> complete or expired; expired -> complete; complete stays complete. False when nothing changed
    (unknown session, same status, or a downgrade)."""
    if status not in LINK_STATUSES:
        raise ValueError(f"link status must be one of {', '.join(LINK_STATUSES)}, not {status!r}")
    link = session.execute(db.for_update(select(CheckoutLink).where(CheckoutLink.session_id == session_id),
                                         session)).scalars().first()
    if link is None or link.status == status or link.status == "complete" or status == "open":
        return False
    link.status = status
    if status == "complete":
        link.completed_at = at or utcnow()
    session.add(link)
    session.flush()
    return True


def recent_links(session: Session, *, user_id: str | None = None, limit: int = 50) -> list[CheckoutLink]:
    stmt = select(CheckoutLink).order_by(CheckoutLink.created_at.desc()).limit(limit)
    if user_id:
        stmt = stmt.where(CheckoutLink.user_id == user_id)
    return list(session.execute(stmt).scalars())

