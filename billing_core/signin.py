"""Local sign-in with throttling kept in the database (table sign_in_attempt), so every dashboard process
on one database counts the same failures and a restart forgets none.

Failures are counted per lower-cased user name (unknown names too) and per client address, each since
that key's last success and within FAILURE_WINDOW. From the FREE_FAILURES-th failure on, a key waits
BASE_DELAY, doubling with each further failure up to MAX_DELAY (exponential back-off), counted from its
latest failure.

A locked user name does not stop a client address without failures of its own: someone who keeps an
operator's name locked (or sprays passwords across names) can't keep that operator out, while every
address that guesses meets the name's back-off after its first failure and its own after a few.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlmodel import Session

from . import db
from .models import SignInAttempt, utcnow
from .operators import Identity, authenticate, new_hash_if_weak, store_rehash

FREE_FAILURES = 5
BASE_DELAY = timedelta(seconds=30)
MAX_DELAY = timedelta(hours=1)
FAILURE_WINDOW = timedelta(hours=24)
ATTEMPTS_KEPT = timedelta(days=90)  # older attempts are deleted as new ones are recorded
UNKNOWN_ADDRESS = "unknown"


@dataclass(frozen=True)
class SignInResult:
    identity: Identity | None = None
    retry_after: timedelta | None = None  # set when throttled: nothing was checked

    @property
    def throttled(self) -> bool:
        return self.retry_after is not None


def client_address_from(peer: str | None, forwarded_for: str | None, trusted_proxies: int) -> str | None:
    """The client's address. Without proxies, the peer Streamlit saw. Behind `trusted_proxies` proxies (each
    appending the address it saw to X-Forwarded-For), the entry the outermost one added: counted from the right,
    since a client can put anything at the left. Fewer entries than proxies: the peer."""
    if trusted_proxies <= 0 or not forwarded_for:
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    return hops[-trusted_proxies] if len(hops) >= trusted_proxies else peer


def throttle_name(name) -> str:
    return (name if isinstance(name, str) else "").strip().lower()[:100]


def throttle_address(address) -> str:
    return ((address if isinstance(address, str) else "").strip() or UNKNOWN_ADDRESS)[:64]


def _failures(session: Session, column, value: str, now: datetime) -> tuple[int, datetime | None]:
    """(failures since the key's last success within the window, time of the latest failure)."""
    since = now - FAILURE_WINDOW
    last_success = session.execute(select(func.max(SignInAttempt.at)).where(
        column == value, SignInAttempt.success.is_(True), SignInAttempt.at >= since)).scalar_one()
    if last_success is not None:
        since = max(since, last_success)
    count, latest = session.execute(select(func.count(), func.max(SignInAttempt.at)).where(
        column == value, SignInAttempt.success.is_(False), SignInAttempt.at > since)).one()
    return int(count), latest


def backoff(failures: int) -> timedelta | None:
    """How long a key with this many failures waits after its latest one; None below the threshold."""
    if failures < FREE_FAILURES:
        return None
    return min(MAX_DELAY, BASE_DELAY * 2 ** min(failures - FREE_FAILURES, 20))


def _wait(failures: int, latest: datetime | None, now: datetime) -> timedelta | None:
    delay = backoff(failures)
    if delay is None or latest is None:
        return None
    latest = latest if latest.tzinfo else latest.replace(tzinfo=now.tzinfo)
    remaining = latest + delay - now
    return remaining if remaining > timedelta(0) else None


def throttled_for(session: Session, *, name: str, client_address: str, now: datetime) -> timedelta | None:
    """How long this name from this address must wait before another try; None when it may try now."""
    address_failures, address_latest = _failures(session, SignInAttempt.client_address, client_address, now)
    own_wait = _wait(address_failures, address_latest, now)
    if own_wait is not None:
        return own_wait
    if address_failures == 0:
        return None  # a client that hasn't failed is never held back by a locked name
    name_failures, name_latest = _failures(session, SignInAttempt.name, name, now)
    return _wait(name_failures, name_latest, now)


def record_attempt(session: Session, *, name: str, client_address: str, success: bool, now: datetime) -> None:
    session.execute(delete(SignInAttempt).where(SignInAttempt.at < now - ATTEMPTS_KEPT))
    session.add(SignInAttempt(name=name, client_address=client_address, success=success, at=now))
    session.flush()


def sign_in(*, name: str, password: str, client_address: str | None, url: str | None = None,
            now: datetime | None = None, refuse: bool = False) -> SignInResult:
    """Check the throttle, the password, record the attempt; replaces a weaker hash after a success.
    `refuse` fails the attempt without checking the password (the demo operator outside demo mode).
    The ~0.3 s scrypt runs outside any write transaction."""
    now = now or utcnow()
    key, address = throttle_name(name), throttle_address(client_address)
    engine = db.get_engine(url)
    with db.read_session(engine) as session:
        wait = throttled_for(session, name=key, client_address=address, now=now)
        if wait is not None:
            return SignInResult(retry_after=wait)
        operator = None if refuse else authenticate(session, name=name, password=password)
    new_hash = new_hash_if_weak(operator, password)
    with db.write_session(engine) as session:
        record_attempt(session, name=key, client_address=address, success=operator is not None, now=now)
        if new_hash is not None:
            store_rehash(session, name=operator.name, old_hash=operator.password_hash, new_hash=new_hash)
    if operator is None:
        return SignInResult()
    return SignInResult(identity=Identity(name=operator.name, role=operator.role))


def record_single_sign_on(*, email: str, client_address: str | None, success: bool, url: str | None = None,
                          now: datetime | None = None) -> None:
    """A sign-in through the identity provider (OIDC), recorded beside the password sign-ins: let in (a verified
    email with a role) or refused. The provider checked the credentials, so nothing is throttled here."""
    with db.write_session(db.get_engine(url)) as session:
        record_attempt(session, name=throttle_name(email), client_address=throttle_address(client_address),
                       success=success, now=now or utcnow())


def recent_attempts(session: Session, *, limit: int = 200, failed_only: bool = False) -> list[dict]:
    query = select(SignInAttempt).order_by(SignInAttempt.at.desc(), SignInAttempt.id.desc()).limit(limit)
    if failed_only:
        query = query.where(SignInAttempt.success.is_(False))
    return [{"at": a.at, "name": a.name, "client_address": a.client_address,
             "result": "signed in" if a.success else "failed"} for a in session.execute(query).scalars()]


def attempt_counts(session: Session, *, now: datetime | None = None) -> dict[str, int]:
    since = (now or utcnow()) - FAILURE_WINDOW
    rows = session.execute(select(SignInAttempt.success, func.count()).where(SignInAttempt.at >= since)
                           .group_by(SignInAttempt.success)).all()
    counts = {bool(success): int(n) for success, n in rows}
    return {"failed": counts.get(False, 0), "succeeded": counts.get(True, 0)}
