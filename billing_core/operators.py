"""Operator accounts for the dashboard: local accounts with salted scrypt password hashes, roles,
and the mapping of OIDC emails to roles.

Roles: `admin` may do everything; `support` may view, issue checkout links and adjust credits up to
`settings.support_adjustment_limit` credits (absolute value) per adjustment.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlmodel import Session

from . import ledger
from .models import Operator, utcnow
from .settings import Settings

ROLES = ("admin", "support")
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,99}$")

# scrypt cost: ~50 ms per hash on a laptop; stored with the hash so it can be raised later.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1
SCRYPT_MAXMEM = 64 * 1024 * 1024
HASH_SCHEME = "scrypt"


class OperatorError(ValueError):
    """A refused operator change; the message says why."""


class OperatorExists(OperatorError):
    pass


class PermissionDenied(OperatorError):
    pass


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
        if scheme != HASH_SCHEME:
            return False
        expected = base64.b64decode(digest)
        actual = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


_DUMMY_HASH = hash_password(secrets.token_hex(16))


# --- accounts -----------------------------------------------------------------------------

def find_operator(session: Session, name: str) -> Operator | None:
    return session.execute(select(Operator).where(Operator.name == name)).scalars().first()


def create_operator(session: Session, *, name: str, role: str, password: str) -> Operator:
    """A new local operator; refuses a taken name (OperatorExists), a bad role or a short password."""
    name, role, password = check_name(name), check_role(role), check_password(password)
    if find_operator(session, name) is not None:
        raise OperatorExists(f"operator {name!r} already exists")
    operator = Operator(name=name, role=role, password_hash=hash_password(password), created_at=utcnow())
    session.add(operator)
    session.flush()
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


def adjust_as(session: Session, *, identity: Identity, user_id: str, credits: int, reason: str,
              settings: Settings, allow_negative: bool = False, source_key: str | None = None) -> list:
    """A manual adjustment by a signed-in operator: checks the role's limit, records the operator.
    A `source_key` already used makes it a no-op returning [] (a form submitted twice)."""
    check_adjustment_allowed(identity, credits=credits, settings=settings)
    if allow_negative and not identity.is_admin:
        raise PermissionDenied("only an admin may take a balance below zero")
    return ledger.adjust(session, user_id=user_id, credits=credits, reason=reason, operator=identity.name,
                         allow_negative=allow_negative, source_key=source_key)
