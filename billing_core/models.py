"""Tables. Times are timezone-aware UTC datetimes; money is integer minor units plus a currency."""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import BigInteger, Column, Index, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel


DISPUTE_KINDS_SQL = "kind IN ('dispute_hold', 'dispute_release')"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def from_epoch(seconds: int | None) -> datetime | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(int(seconds), timezone.utc)


class Account(SQLModel, table=True):
    """A DevOps Agent user, keyed by the agent's user id."""
    # the dashboard (migration 0007): credits outstanding and accounts by balance read this index only
    __table_args__ = (Index("ix_account_balance", "balance"),)
    user_id: str = Field(primary_key=True, max_length=200)
    email: str | None = Field(default=None, index=True, max_length=320)
    stripe_customer_id: str | None = Field(default=None, unique=True, max_length=100)
    # Set when a ledger write leaves the balance negative or a dispute is open.
    flagged: bool = Field(default=False, index=True)
    flag_reason: str | None = Field(default=None, max_length=200)
    open_disputes: int = 0
    # Kept by the ledger in the same transaction as the entries (see credit_lot): `balance` is every credit
    # held as of the account's last ledger write (open lots' remaining plus debt); `debt` is the sum of the
    # entries without a lot (<= 0). Read paths still leave out open lots whose expiry time has passed since.
    balance: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    debt: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class Subscription(SQLModel, table=True):
    """Stripe subscription state as last reported by the newest event we applied."""
    # the dashboard (migration 0007): subscribers by status and tier read this index only
    __table_args__ = (Index("ix_subscription_status_tier", "status", "tier"),)
    id: str = Field(primary_key=True, max_length=100)  # sub_...
    user_id: str = Field(foreign_key="account.user_id", index=True, max_length=200)
    tier: str = Field(default="none", max_length=40)
    price_id: str | None = Field(default=None, max_length=100)
    status: str = Field(default="incomplete", max_length=40)
    current_period_end: int | None = Field(default=None, sa_column=Column(BigInteger))
    current_period_start: int | None = Field(default=None, sa_column=Column(BigInteger))
    cancel_at_period_end: bool = False
    # `created` of the newest Stripe object snapshot applied; older snapshots are stale.
    state_at: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class Payment(SQLModel, table=True):
    """A paid (or failed) Checkout Session or invoice, and what it granted."""
    __table_args__ = (
        Index("ix_payment_created_at_status", "created_at", "status"),
        # covers the dashboard's revenue sums by time range (no table lookups at 200,000 payments)
        Index("ix_payment_revenue", "created_at", "status", "kind", "amount_cents", "amount_refunded",
              "amount_disputed_lost", "credits_granted"),
    )
    id: int | None = Field(default=None, primary_key=True)
    user_id: str | None = Field(default=None, foreign_key="account.user_id", index=True, max_length=200)
    source: str = Field(max_length=20)  # "checkout" or "invoice"
    checkout_session_id: str | None = Field(default=None, unique=True, max_length=100)
    invoice_id: str | None = Field(default=None, unique=True, max_length=100)
    payment_intent_id: str | None = Field(default=None, index=True, max_length=100)
    charge_id: str | None = Field(default=None, index=True, max_length=100)
    subscription_id: str | None = Field(default=None, index=True, max_length=100)
    item: str | None = Field(default=None, max_length=40)
    kind: str | None = Field(default=None, max_length=10)  # "plan" or "pack"
    amount_cents: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    currency: str = Field(default="usd", max_length=3)
    status: str = Field(default="paid", max_length=30)  # paid, unpaid, failed, refunded, partially_refunded, disputed
    amount_refunded: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    amount_disputed_lost: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    credits_granted: int = 0
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class LedgerEntry(SQLModel, table=True):
    """Append-only. Grants open a lot (lot_key = their own source_key); other entries draw on a lot
    or, when lot_key is NULL, stand alone (debt from a clawback beyond what was left)."""
    __tablename__ = "ledger_entry"
    __table_args__ = (
        Index("ix_ledger_user_lot", "user_id", "lot_key", "credits"),  # credits: lot sums read the index only
        Index("ix_ledger_user_created", "user_id", "created_at"),
        Index("ix_ledger_kind_created", "kind", "created_at"),
        # the dashboard: credit flows by time range (covering); lots by expiry time are read from credit_lot
        Index("ix_ledger_created_kind_credits", "created_at", "kind", "credits"),
        # what each dispute still holds in a lot, without reading the lot's spends
        Index("ix_ledger_dispute_lot", "lot_key", sqlite_where=text(DISPUTE_KINDS_SQL),
              postgresql_where=text(DISPUTE_KINDS_SQL)),
    )
    id: int | None = Field(default=None, primary_key=True)
    user_id: str = Field(foreign_key="account.user_id", max_length=200)
    credits: int
    kind: str = Field(max_length=30)
    source_key: str = Field(unique=True, max_length=255)
    lot_key: str | None = Field(default=None, max_length=255)
    lot_source: str | None = Field(default=None, max_length=20)  # grants only: subscription, pack, adjustment
    expires_at: datetime | None = None  # grants only; NULL never expires
    subscription_id: str | None = Field(default=None, max_length=100)
    period_end: int | None = Field(default=None, sa_column=Column(BigInteger))
    payment_id: int | None = Field(default=None, foreign_key="payment.id", index=True)
    reference: str | None = Field(default=None, max_length=200)
    operator: str | None = Field(default=None, max_length=200)
    reason: str | None = Field(default=None, max_length=500)
    # Subscription grants: the slice of the period's allowance this grant stands for, [from, to) in credits
    # (a base grant [0, plan), an upgrade [old plan, new plan)); grants cover the union of their slices once.
    allowance_from: int | None = None
    allowance_to: int | None = None
    created_at: datetime = Field(default_factory=utcnow)


class CreditLot(SQLModel, table=True):
    """One row per lot, kept by the ledger in the same transaction as the entries that change it.

    `remaining` is the sum of the lot's entries (net of dispute holds), `held` what disputes hold in it.
    A lot is `closed` once it can never count again: an `expire` entry closed it, its `expires_at` passed
    (closed on the account's next write; reads leave it out meanwhile), or it is a pack or adjustment lot
    with nothing left and nothing held. Spends and balances read only open lots (partial index)."""
    __tablename__ = "credit_lot"
    __table_args__ = (
        Index("ix_credit_lot_open", "user_id", "expires_at", sqlite_where=text("closed = 0"),
              postgresql_where=text("closed = false")),
        # no user_id here: the open-lots index must be the one a query by user finds
        Index("ix_credit_lot_subscription", "subscription_id", "period_end"),
        Index("ix_credit_lot_payment", "payment_id"),
        # the dashboard (migration 0007): credits lapsed by expiry time per month, and open lots past it
        Index("ix_credit_lot_expiry", "expires_at", "remaining"),
        Index("ix_credit_lot_open_expiry", "expires_at", "remaining", "source", "user_id",
              sqlite_where=text("closed = 0"),
              postgresql_where=text("closed = false")),
    )
    id: int | None = Field(default=None, primary_key=True)
    lot_key: str = Field(unique=True, max_length=255)  # the grant entry's source_key
    user_id: str = Field(foreign_key="account.user_id", max_length=200)
    source: str = Field(max_length=20)  # subscription, pack, adjustment
    granted: int
    remaining: int
    held: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    expires_at: datetime | None = None  # NULL never expires
    subscription_id: str | None = Field(default=None, max_length=100)
    period_end: int | None = Field(default=None, sa_column=Column(BigInteger))
    payment_id: int | None = Field(default=None, foreign_key="payment.id")  # granted with it or claimed by it
    allowance_from: int | None = None
    allowance_to: int | None = None
    closed: bool = Field(default=False, sa_column_kwargs={"server_default": text("false")})
    closed_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)


class Consumption(SQLModel, table=True):
    """One spend by the DevOps Agent, idempotent per (user, reference)."""
    __table_args__ = (UniqueConstraint("user_id", "reference", name="uq_consumption_user_reference"),)
    id: int | None = Field(default=None, primary_key=True)
    user_id: str = Field(foreign_key="account.user_id", max_length=200)
    reference: str = Field(max_length=200)
    credits: int
    balance_after: int
    spendable_after: int
    created_at: datetime = Field(default_factory=utcnow)
    token_name: str | None = Field(default=None, max_length=100)  # which credits-API token made the spend


class Dispute(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=100)  # dp_...
    user_id: str | None = Field(default=None, foreign_key="account.user_id", index=True, max_length=200)
    payment_id: int | None = Field(default=None, foreign_key="payment.id")
    charge_id: str | None = Field(default=None, max_length=100)
    amount_cents: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    status: str = Field(default="open", max_length=40)  # open, won, lost
    created_at: datetime = Field(default_factory=utcnow)
    closed_at: datetime | None = None


class CheckoutLink(SQLModel, table=True):
    """Every Checkout Session link an operator issued."""
    __tablename__ = "checkout_link"
    __table_args__ = (Index("ix_checkout_link_user_created", "user_id", "created_at"),)
    id: int | None = Field(default=None, primary_key=True)
    session_id: str = Field(unique=True, max_length=255)
    idempotency_key: str = Field(index=True, max_length=255)
    user_id: str = Field(foreign_key="account.user_id", max_length=200)
    item: str = Field(max_length=40)
    url: str = Field(sa_column=Column(Text, nullable=False))
    operator: str | None = Field(default=None, max_length=200)
    status: str = Field(default="open", max_length=20)  # open, complete, expired
    created_at: datetime = Field(default_factory=utcnow, index=True)
    expires_at: datetime
    completed_at: datetime | None = None


class StripeEvent(SQLModel, table=True):
    """Every verified delivery, stored before it is processed."""
    __tablename__ = "stripe_event"
    __table_args__ = (Index("ix_stripe_event_status_received", "status", "received_at"),)
    id: str = Field(primary_key=True, max_length=100)  # evt_...
    type: str = Field(max_length=100, index=True)
    api_version: str | None = Field(default=None, max_length=40)
    livemode: bool = False
    created: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    payload: str = Field(sa_column=Column(Text, nullable=False))
    received_at: datetime = Field(default_factory=utcnow, index=True)
    # received, processed, ignored, needs_attention, failed
    status: str = Field(default="received", max_length=20)
    error: str | None = Field(default=None, sa_column=Column(Text))
    attempts: int = 0
    processed_at: datetime | None = None
    source: str = Field(default="webhook", max_length=20)  # webhook, reconcile, success_page, replay
    assigned_user_id: str | None = Field(default=None, max_length=200)
    reprocessed_by: str | None = Field(default=None, max_length=200)  # the operator who last reprocessed it
    user_id: str | None = Field(default=None, index=True, max_length=200)


class Operator(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=100)
    role: str = Field(max_length=20)  # admin or support
    password_hash: str = Field(max_length=300)
    disabled: bool = False
    created_at: datetime = Field(default_factory=utcnow)


class SignInAttempt(SQLModel, table=True):
    """Every local sign-in attempt, kept in the database so every dashboard process throttles alike."""
    __tablename__ = "sign_in_attempt"
    __table_args__ = (
        Index("ix_sign_in_attempt_name_at", "name", "at"),
        Index("ix_sign_in_attempt_client_at", "client_address", "at"),
    )
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=100)  # lower-cased as typed (unknown names too), cut to 100 characters
    client_address: str = Field(max_length=64)
    success: bool = False
    at: datetime = Field(default_factory=utcnow, index=True)


class OperatorAudit(SQLModel, table=True):
    """Every change to an operator account and who made it."""
    __tablename__ = "operator_audit"
    id: int | None = Field(default=None, primary_key=True)
    operator_name: str = Field(max_length=100, index=True)  # the account changed
    action: str = Field(max_length=40)  # created, disabled, enabled, password_reset, role_changed, password_rehashed
    detail: str | None = Field(default=None, max_length=200)
    changed_by: str = Field(max_length=200)
    at: datetime = Field(default_factory=utcnow, index=True)


class AdjustmentRequest(SQLModel, table=True):
    """A support adjustment beyond the operator's rolling 24-hour cap, waiting for an admin (maker-checker)."""
    __tablename__ = "adjustment_request"
    __table_args__ = (Index("ix_adjustment_request_status_requested", "status", "requested_at"),)
    id: int | None = Field(default=None, primary_key=True)
    user_id: str = Field(foreign_key="account.user_id", index=True, max_length=200)
    credits: int
    reason: str = Field(max_length=500)
    requested_by: str = Field(max_length=200)
    requested_at: datetime = Field(default_factory=utcnow)
    form_key: str = Field(unique=True, max_length=255)  # the form's idempotency key: one request per submit
    status: str = Field(default="pending", max_length=20)  # pending, approved, rejected
    decided_by: str | None = Field(default=None, max_length=200)
    decided_at: datetime | None = None
    decision_reason: str | None = Field(default=None, max_length=500)


class PlanChange(SQLModel, table=True):
    """A mid-period plan change, reported by a subscription event, by the invoice carrying its proration, or by
    both (matched by subscription, period, plans and change time). Its credits are fixed by the first report;
    the ledger entries it causes carry source keys `plan-change:<id>:...`, so it is applied once."""
    __tablename__ = "plan_change"
    __table_args__ = (Index("ix_plan_change_period", "subscription_id", "period_end"),)

    id: int | None = Field(default=None, primary_key=True)
    user_id: str = Field(foreign_key="account.user_id", index=True, max_length=200)
    subscription_id: str = Field(max_length=100)
    period_start: int | None = Field(default=None, sa_column=Column(BigInteger))
    period_end: int = Field(sa_column=Column(BigInteger, nullable=False))
    changed_at: int = Field(sa_column=Column(BigInteger, nullable=False))
    from_tier: str = Field(max_length=40)
    to_tier: str = Field(max_length=40)
    fraction: str = Field(max_length=60)  # of the period left at the change, "numerator/denominator"
    credits: int  # + top-up of an upgrade, - take-back of a downgrade (before the cap at unspent credits)
    applied: int = 0  # credits granted (+) or taken back (-) so far
    event_id: str | None = Field(default=None, unique=True, max_length=100)  # customer.subscription.updated
    invoice_id: str | None = Field(default=None, index=True, max_length=100)  # the invoice carrying its proration
    payment_id: int | None = Field(default=None, foreign_key="payment.id")  # that invoice's payment, once paid
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class RefundRequest(SQLModel, table=True):
    """A refund an operator created from the console (Stripe's refund id, who, why, for how much).
    The ledger changes only when Stripe's `charge.refunded` arrives: the request is pending until the
    payment's `amount_refunded` reaches `refunded_after` (the charge's cumulative refund with this one)."""
    __tablename__ = "refund_request"
    __table_args__ = (Index("ix_refund_request_payment_created", "payment_id", "created_at"),)
    id: int | None = Field(default=None, primary_key=True)
    payment_id: int = Field(foreign_key="payment.id")
    user_id: str | None = Field(default=None, max_length=200)
    amount_cents: int = Field(sa_column=Column(BigInteger, nullable=False))
    currency: str = Field(max_length=3)
    refunded_after: int = Field(sa_column=Column(BigInteger, nullable=False))
    stripe_refund_id: str = Field(unique=True, max_length=100)
    idempotency_key: str = Field(max_length=255)
    operator: str = Field(max_length=200)
    reason: str = Field(max_length=500)
    created_at: datetime = Field(default_factory=utcnow)


from .rollups import LedgerHourly, MrrHourly, PaymentHourly, SubscriptionPeriod  # noqa: E402,F401  (registers them)
