"""Operator accounts for the dashboard: local accounts with salted scrypt password hashes, roles,
and the mapping of OIDC emails to roles.

Roles: `admin` may do everything; `support` may view, issue checkout links and adjust credits up to
`settings.support_adjustment_limit` credits (absolute value) per adjustment and
`settings.support_daily_adjustment_cap` credits within any 24 hours (beyond it an adjustment becomes a
request an admin approves: billing_core.approvals). Every change to an account is kept in operator_audit.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlmodel import Session

from . import db, ledger
from .models import LedgerEntry, Operator, OperatorAudit, utcnow
from .settings import Settings

ROLES = ("admin", "support")
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,99}$")

# scrypt cost (current guidance: N=2^17, r=8, p=1; ~0.3 s and 128 MiB per hash). Stored with each hash, so
# older, cheaper hashes still verify and are replaced on the operator's next successful sign-in.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 17, 8, 1
SCRYPT_MAXMEM = 256 * 1024 * 1024  # hashlib's default limit (32 MiB) is below the 128 * N * r bytes needed
MAX_SCRYPT_N = 2 ** 20  # a stored hash asking for more is treated as malformed
HASH_SCHEME = "scrypt"


class OperatorError(ValueError):
    """A refused operator change; the message says why."""


class OperatorExists(OperatorError):
    pass


class PermissionDenied(OperatorError):
    pass


class UnknownOperator(OperatorError):
    pass


class OverDailyCap(PermissionDenied):
    """A support adjustment beyond the rolling 24-hour cap; the dashboard turns it into a request."""

    def __init__(self, message: str, *, used: int, cap: int):
        super().__init__(message)
        self.used = used
        self.cap = cap


@dataclass(frozen=True)
class Identity:
    """Who is acting in the dashboard: an operator name (or an OIDC email) and a role."""
    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


# --- validation ---------------------------------------------------------------------------

def check_name(name) -> str:
    if not isinstance(name, str) or not name.strip():
        raise OperatorError("operator name must not be empty")
    name = name.strip()
    if not NAME_PATTERN.match(name):
        raise OperatorError("operator name must be 1-100 characters: letters, digits and . _ @ + - "
                            "(starting with a letter or digit)")
    return name


def check_role(role) -> str:
    if role not in ROLES:
        raise OperatorError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    return role


def check_password(password) -> str:
    if not isinstance(password, str):
        raise OperatorError("password must be text")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise OperatorError(f"password must be at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise OperatorError(f"password must be at most {MAX_PASSWORD_LENGTH} characters")
    return password


# --- hashing ------------------------------------------------------------------------------

def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM, dklen=32)


def hash_password(password: str) -> str:
    """`scrypt$n$r$p$salt$hash`, with a fresh random salt per call."""
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"{HASH_SCHEME}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time comparison; a malformed stored hash never matches."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != HASH_SCHEME or not 1 < int(n) <= MAX_SCRYPT_N:
            return False
        expected = base64.b64decode(digest)
        actual = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def needs_rehash(stored: str) -> bool:
    """True for a hash made with weaker parameters than the current ones."""
    try:
        scheme, n, r, p, _salt, _digest = stored.split("$")
        return scheme != HASH_SCHEME or (int(n), int(r), int(p)) < (SCRYPT_N, SCRYPT_R, SCRYPT_P)
    except ValueError:
        return True


_DUMMY_HASH = hash_password(secrets.token_hex(16))


# --- accounts -----------------------------------------------------------------------------

def find_operator(session: Session, name: str) -> Operator | None:
    return session.execute(select(Operator).where(Operator.name == name)).scalars().first()


def create_operator(session: Session, *, name: str, role: str, password: str,
                    created_by: str | None = None) -> Operator:
    """A new local operator; refuses a taken name (OperatorExists), a bad role or a short password."""
    name, role, password = check_name(name), check_role(role), check_password(password)
    if find_operator(session, name) is not None:
        raise OperatorExists(f"operator {name!r} already exists")
    operator = Operator(name=name, role=role, password_hash=hash_password(password), created_at=utcnow())
    session.add(operator)
    session.flush()
    record_change(session, name=name, action="created", detail=f"role {role}", changed_by=created_by or "unknown")
    return operator


def authenticate(session: Session, *, name: str, password: str) -> Operator | None:
    """The operator when name and password match and the account is enabled, else None.

    An unknown name still costs one hash, so timing does not reveal which names exist."""
    name = (name or "").strip() if isinstance(name, str) else ""
    password = password if isinstance(password, str) else ""
    operator = find_operator(session, name) if name else None
    if operator is None:
        verify_password(password, _DUMMY_HASH)
        return None
    if not verify_password(password, operator.password_hash) or operator.disabled:
        return None
    return operator


def new_hash_if_weak(operator: Operator | None, password: str) -> str | None:
    """A fresh hash at the current parameters when the operator's stored one is weaker, else None.
    Computed outside any write transaction (it takes ~0.3 s)."""
    if operator is None or not needs_rehash(operator.password_hash):
        return None
    return hash_password(password)


def store_rehash(session: Session, *, name: str, old_hash: str, new_hash: str) -> bool:
    """Replace the hash only if nobody changed it meanwhile (a password reset wins)."""
    operator = session.execute(db.for_update(select(Operator).where(Operator.name == name), session)).scalars().first()
    if operator is None or operator.password_hash != old_hash:
        return False
    operator.password_hash = new_hash
    session.add(operator)
    record_change(session, name=name, action="password_rehashed", detail=f"scrypt N={SCRYPT_N}", changed_by=name)
    return True


def active_identity(session: Session, name: str) -> Identity | None:
    """The current role of a signed-in local operator; None once disabled or deleted."""
    operator = find_operator(session, name)
    if operator is None or operator.disabled:
        return None
    return Identity(name=operator.name, role=operator.role)


def role_for_email(email: str | None, settings: Settings) -> str | None:
    """An OIDC user's role from ADMIN_EMAILS / SUPPORT_EMAILS; None when the email is in neither."""
    if not email:
        return None
    email = email.strip().lower()
    if email in settings.admin_emails:
        return "admin"
    if email in settings.support_emails:
        return "support"
    return None


# --- lifecycle (CLI and the Operators page); every change lands in operator_audit -----------

def record_change(session: Session, *, name: str, action: str, changed_by: str, detail: str | None = None) -> None:
    changed_by = (changed_by or "").strip() or "unknown"
    session.add(OperatorAudit(operator_name=name, action=action, detail=detail, changed_by=changed_by[:200],
                              at=utcnow()))
    session.flush()


def _locked_operator(session: Session, name) -> Operator:
    name = check_name(name)
    operator = session.execute(db.for_update(select(Operator).where(Operator.name == name), session)).scalars().first()
    if operator is None:
        raise UnknownOperator(f"no operator named {name!r}")
    return operator


def _check_an_admin_remains(session: Session, operator: Operator, what: str) -> None:
    """Refuse to disable or demote the last enabled admin: nobody could undo it from the dashboard."""
    if operator.role != "admin" or operator.disabled:
        return
    others = session.execute(select(func.count()).select_from(Operator).where(
        Operator.role == "admin", Operator.disabled.is_(False), Operator.id != operator.id)).scalar_one()
    if others == 0:
        raise OperatorError(f"{operator.name} is the last enabled admin; {what} would leave nobody to manage "
                            "operators (add another admin first)")


def list_operators(session: Session) -> list[dict]:
    rows = session.execute(select(Operator).order_by(Operator.name)).scalars().all()
    return [{"name": o.name, "role": o.role, "disabled": o.disabled, "created_at": o.created_at,
             "hash": "current" if not needs_rehash(o.password_hash) else "weaker; replaced at next sign-in"}
            for o in rows]


def set_disabled(session: Session, *, name: str, disabled: bool, changed_by: str) -> Operator:
    operator = _locked_operator(session, name)
    if operator.disabled == disabled:
        return operator
    if disabled:
        _check_an_admin_remains(session, operator, "disabling them")
    operator.disabled = disabled
    session.add(operator)
    record_change(session, name=operator.name, action="disabled" if disabled else "enabled", changed_by=changed_by)
    return operator


def reset_password(session: Session, *, name: str, new_hash: str, changed_by: str) -> Operator:
    """`new_hash` from hash_password(check_password(...)), computed before the write session opens."""
    operator = _locked_operator(session, name)
    operator.password_hash = new_hash
    session.add(operator)
    record_change(session, name=operator.name, action="password_reset", changed_by=changed_by)
    return operator


def set_role(session: Session, *, name: str, role: str, changed_by: str) -> Operator:
    role = check_role(role)
    operator = _locked_operator(session, name)
    if operator.role == role:
        return operator
    if role != "admin":
        _check_an_admin_remains(session, operator, "demoting them")
    old = operator.role
    operator.role = role
    session.add(operator)
    record_change(session, name=operator.name, action="role_changed", detail=f"{old} -> {role}",
                  changed_by=changed_by)
    return operator


def operator_audit(session: Session, *, limit: int = 200) -> list[dict]:
    rows = session.execute(select(OperatorAudit).order_by(OperatorAudit.at.desc(), OperatorAudit.id.desc())
                           .limit(limit)).scalars().all()
    return [{"at": r.at, "operator": r.operator_name, "action": r.action, "detail": r.detail or "",
             "changed_by": r.changed_by} for r in rows]


# --- permissions --------------------------------------------------------------------------

def adjustment_limit(role: str, settings: Settings) -> int | None:
    """The largest adjustment (absolute credits) a role may make; None means no limit."""
    return None if role == "admin" else settings.support_adjustment_limit


def check_adjustment_allowed(identity: Identity, *, credits: int, settings: Settings) -> None:
    check_role(identity.role)
    limit = adjustment_limit(identity.role, settings)
    if limit is not None and abs(credits) > limit:
        raise PermissionDenied(f"support operators may adjust at most {limit} credits at a time "
                               f"({abs(credits)} requested); ask an admin")


def check_admin(identity: Identity, action: str) -> None:
    if not identity.is_admin:
        raise PermissionDenied(f"only an admin may {action}")


DAILY_WINDOW = timedelta(hours=24)


def adjusted_in_last_day(session: Session, *, operator: str, now: datetime | None = None) -> int:
    """Credits (absolute) this operator moved by manual adjustments in the last 24 hours."""
    since = (now or utcnow()) - DAILY_WINDOW
    return int(session.execute(select(func.coalesce(func.sum(func.abs(LedgerEntry.credits)), 0)).where(
        LedgerEntry.operator == operator, LedgerEntry.kind == "adjustment",
        LedgerEntry.created_at >= since)).scalar_one())


def check_daily_cap(session: Session, identity: Identity, *, credits: int, settings: Settings,
                    source_key: str | None = None) -> None:
    """Support operators: at most SUPPORT_DAILY_ADJUSTMENT_CAP credits within any 24 hours (raises OverDailyCap).
    The operator's row is locked first, so two adjustments at once can't both squeeze under the cap.
    An adjustment already applied under `source_key` (a form sent twice) is not counted again."""
    if identity.is_admin:
        return
    if source_key and session.execute(select(LedgerEntry.id).where(
            LedgerEntry.source_key.in_((source_key, f"{source_key}:0")))).first():
        return
    session.execute(db.for_update(select(Operator.id).where(Operator.name == identity.name), session)).first()
    used = adjusted_in_last_day(session, operator=identity.name)
    cap = settings.support_daily_adjustment_cap
    if used + abs(credits) > cap:
        raise OverDailyCap(f"{identity.name} has adjusted {used:,} credits in the last 24 hours; {abs(credits):,} "
                           f"more would pass the {cap:,}-credit daily cap for support, so an admin must approve it",
                           used=used, cap=cap)


def adjust_as(session: Session, *, identity: Identity, user_id: str, credits: int, reason: str,
              settings: Settings, allow_negative: bool = False, source_key: str | None = None) -> list:
    """A manual adjustment by a signed-in operator: checks the role's limits (per adjustment and, for support,
    per 24 hours: OverDailyCap), records the operator.
    A `source_key` already used makes it a no-op returning [] (a form submitted twice)."""
    check_adjustment_allowed(identity, credits=credits, settings=settings)
    if allow_negative and not identity.is_admin:
        raise PermissionDenied("only an admin may take a balance below zero")
    check_daily_cap(session, identity, credits=credits, settings=settings, source_key=source_key)
    return ledger.adjust(session, user_id=user_id, credits=credits, reason=reason, operator=identity.name,
                         allow_negative=allow_negative, source_key=source_key)
