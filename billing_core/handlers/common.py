"""What every handler family shares: the event as handlers see it, their answer, and finding the user and plan."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import String, bindparam, case, exists, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session

from .. import db, ledger
from ..catalog import CATALOG, CatalogItem, find_item_for_price
from ..models import Account, Dispute, Payment, Subscription, utcnow
from ..prepared import Prepared
from ..settings import Settings
from ..stripe_payloads import NeedsAttention, dig, id_of

# Payment statuses that a later "paid" must not overwrite.
SETTLED_PAYMENT_STATUSES = ("refunded", "partially_refunded", "disputed")


@dataclass
class EventContext:
    event: dict
    settings: Settings
    assigned_user_id: str | None = None
    source: str = "webhook"
    # What `prefetch` learned from Stripe before the write transaction: {"invoices": {payment_intent: invoice}}
    facts: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.event["id"]

    @property
    def type(self) -> str:
        return self.event["type"]

    @property
    def created(self) -> int:
        return int(self.event.get("created") or 0)

    @property
    def obj(self) -> dict:
        return self.event["data"]["object"]

    @property
    def previous_attributes(self) -> dict:
        return dig(self.event, "data", "previous_attributes") or {}


@dataclass
class Handled:
    user_id: str | None = None
    ignored: bool = False
    note: str | None = None


# --- plans -----------------------------------------------------------------------------------

PLANS_BY_LOOKUP_KEY = {item.lookup_key: item for item in CATALOG.values() if item.kind == "plan"}


def plan_for_price(price_id: str | None, settings: Settings) -> CatalogItem | None:
    item = find_item_for_price(price_id, settings)
    return item if item and item.kind == "plan" else None


def plan_named(key: Any) -> CatalogItem | None:
    item = CATALOG.get(key) if isinstance(key, str) else None
    return item if item is not None and item.kind == "plan" else None


def plan_for_price_object(price: Any, settings: Settings) -> CatalogItem | None:
    """The plan a price stands for: its configured id, else (a price replaced by sync-catalog, still on
    existing subscriptions) the catalog lookup key it carries, else its `metadata.item`."""
    plan = plan_for_price(id_of(price), settings)
    if plan is not None or not isinstance(price, dict):
        return plan
    lookup_key = price.get("lookup_key")
    if isinstance(lookup_key, str) and lookup_key in PLANS_BY_LOOKUP_KEY:
        return PLANS_BY_LOOKUP_KEY[lookup_key]
    return plan_named(dig(price, "metadata", "item"))


# --- finding the user ------------------------------------------------------------------------

def user_for_customer(session: Session, customer_id: str | None) -> str | None:
    if not customer_id:
        return None
    return session.execute(select(Account.user_id).where(Account.stripe_customer_id == customer_id)).scalar()


def resolve_user(session: Session, ctx: EventContext, *, explicit: str | None, subscription_id: str | None = None,
                 customer_id: str | None = None, what: str) -> str:
    """The event's own user id first, then the operator's assignment, then what we stored earlier."""
    if explicit:
        return explicit
    if ctx.assigned_user_id:
        return ctx.assigned_user_id
    if subscription_id:
        row = session.get(Subscription, subscription_id)
        if row is not None:
            return row.user_id
    user_id = user_for_customer(session, customer_id)
    if user_id:
        return user_id
    raise NeedsAttention(f"can't tell which user {what} belongs to: no metadata.user_id"
                         + (f", and customer {customer_id} is not linked to an account" if customer_id else "")
                         + "; assign the user and reprocess")


# --- the account ----------------------------------------------------------------------------
# What ledger.lock_account does for a handler (create the account, fill its email, link its Stripe customer
# when no other account has it), in statements built once: one on SQLite, whose transaction already holds the
# database's write lock. On PostgreSQL the ON CONFLICT DO UPDATE locks the row for the transaction, as
# lock_account's SELECT ... FOR UPDATE does, and the customer is linked by a second statement once the row is
# ours: put in the INSERT, two transactions creating one new account at the same moment would both write the
# customer into its unique index, and the second would fail instead of finding the account.
_ACCOUNT = Account.__table__
_CUSTOMER = bindparam("customer_id", type_=String)
_CUSTOMER_IF_FREE = select(_CUSTOMER).where(
    _CUSTOMER.is_not(None), ~exists().where(_ACCOUNT.c.stripe_customer_id == _CUSTOMER)).scalar_subquery()


def _ensure_account_statement(dialect: str):
    insert = (pg_insert if dialect == "postgresql" else sqlite_insert)(_ACCOUNT).values(
        user_id=bindparam("user_id"), email=bindparam("email"), stripe_customer_id=_CUSTOMER_IF_FREE,
        flagged=False, open_disputes=0, balance=0, debt=0, created_at=bindparam("now"), updated_at=bindparam("now"))
    changes = ((_ACCOUNT.c.email.is_(None) & insert.excluded.email.is_not(None))
               | (_ACCOUNT.c.stripe_customer_id.is_(None) & insert.excluded.stripe_customer_id.is_not(None)))
    return insert.on_conflict_do_update(index_elements=["user_id"], set_={
        "email": case((_ACCOUNT.c.email.is_(None), insert.excluded.email), else_=_ACCOUNT.c.email),
        "stripe_customer_id": case((_ACCOUNT.c.stripe_customer_id.is_(None), insert.excluded.stripe_customer_id),
                                   else_=_ACCOUNT.c.stripe_customer_id),
        "updated_at": case((changes, insert.excluded.updated_at), else_=_ACCOUNT.c.updated_at),
    })


# RETURNING the row's state: the upsert has locked the row (SQLite: BEGIN IMMEDIATE; PostgreSQL: ON CONFLICT DO
# UPDATE), so a ledger write that follows in this transaction needn't read the account again.
# `created`: the row is the one this statement inserted (only an insert sets created_at to this statement's time).
_ENSURE_ACCOUNT = {name: _ensure_account_statement(name).returning(
    *ledger.ACCOUNT_STATE_COLUMNS, (_ACCOUNT.c.created_at == bindparam("now")).label("created"))
    for name in ("sqlite", "postgresql")}
_P_ENSURE_ACCOUNT = {name: Prepared(statement) for name, statement in _ENSURE_ACCOUNT.items()}
_LINK_CUSTOMER = (update(_ACCOUNT).where(_ACCOUNT.c.user_id == bindparam("account_user_id"),
                                         _ACCOUNT.c.stripe_customer_id.is_(None),
                                         ~exists().where(_ACCOUNT.c.stripe_customer_id == _CUSTOMER))
                  .values(stripe_customer_id=_CUSTOMER, updated_at=bindparam("now")))


def ensure_account(session: Session, *, user_id: str, email: str | None = None,
                   stripe_customer_id: str | None = None) -> str:
    """The account exists (created when new), with this email and Stripe customer filled in where it had
    none (a customer another account has stays with that account); returns the checked user id."""
    return ensure_account_state(session, user_id=user_id, email=email, stripe_customer_id=stripe_customer_id).user_id


def ensure_account_state(session: Session, *, user_id: str, email: str | None = None,
                         stripe_customer_id: str | None = None):
    """ensure_account, returning the account's ledger.ACCOUNT_STATE_COLUMNS (locked for this transaction)."""
    user_id = ledger.check_user_id(user_id)
    connection = session.connection()
    postgresql = connection.dialect.name == "postgresql"
    values = {"user_id": user_id, "email": email.strip() if email and email.strip() else None,
              "customer_id": stripe_customer_id, "now": utcnow()}
    state = _P_ENSURE_ACCOUNT[connection.dialect.name].first(
        connection, values | ({"customer_id": None} if postgresql else {}))
    if postgresql and stripe_customer_id:
        connection.execute(_LINK_CUSTOMER, {"account_user_id": user_id, "customer_id": stripe_customer_id,
                                            "now": values["now"]})
    return state


def reread_after_lock(session: Session, row) -> None:
    """A row read before the account was locked, read again now on PostgreSQL, where another transaction
    may have changed it meanwhile; on SQLite the transaction held the write lock from its start, so the
    row just loaded is current and isn't read twice."""
    if session.get_bind().dialect.name == "postgresql":
        session.refresh(row)


def forget_loaded(session: Session, model, key) -> None:
    """A row written here by a Core statement: an ORM copy of it loaded earlier in the session (resolve_user's)
    is expired, so the session never hands out the row as it was."""
    loaded = db.loaded_copy(session, model, key)
    if loaded is not None:
        session.expire(loaded)


# --- payments --------------------------------------------------------------------------------

def apply_earlier_reversals(session: Session, payment: Payment) -> None:
    """A refund or dispute recorded before the payment's credits were granted (e.g. against the failed first
    attempt of a renewal that was paid on retry) applies to them now; both are idempotent."""
    reversed_cents = (payment.amount_refunded or 0) + (payment.amount_disputed_lost or 0)
    if reversed_cents:
        ledger.clawback_for_payment(session, payment=payment, reversed_cents=reversed_cents)
    open_disputes = session.execute(select(Dispute.id).where(Dispute.payment_id == payment.id,
                                                            Dispute.status == "open")).scalars().all()
    for dispute_id in open_disputes:
        ledger.hold_for_dispute(session, dispute_id=dispute_id, payment=payment)
