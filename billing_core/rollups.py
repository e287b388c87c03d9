"""Rollup tables the dashboard reads instead of scanning the ledger and the payments.

They are maintained by database triggers (migration 0007), in the same transaction as the row that
changes them, so no application code has to remember them and they hold on SQLite and PostgreSQL alike.
Hours are UTC, as text `YYYY-MM-DD HH`; the dashboard folds them into the operator's days and months.

- `ledger_hourly`: credits and entries per hour and entry kind (ledger_entry is append-only: inserts only).
- `payment_hourly`: payments per hour of creation, kind, currency and collected or not, with their
  amounts, refunds, lost disputes and credits (inserts, updates and deletes of payment).
- `subscription_period`: for each subscription, the spans of time it was billed, each with the monthly
  amount it pays then (the invoice's amount paid for the period: discounts applied; a mid-period upgrade's
  proration invoice scaled to a whole month and added to the amount before). Spans of one subscription
  never overlap: a newer span ends the older one. `state` is `active`, or `past_due` from the moment the
  subscription went past due until it is paid or canceled. Cancelation ends the open spans.
- `mrr_hourly`: the change of MRR per hour, currency and state (+amount where a span starts, -amount
  where it ends), and the MRR of subscriptions that start (or restart after a gap) in that hour: MRR at
  any time is the running sum of the changes before it.

`shard` spreads hot rollup rows over 16 rows per hour on PostgreSQL (a hash of the user), so concurrent
writers for different accounts rarely wait for one another's row lock; on SQLite (one writer) it is 0.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Index
from sqlmodel import Field, SQLModel

FAR_FUTURE = "9999-12-31 00:00:00.000000"


class LedgerHourly(SQLModel, table=True):
    __tablename__ = "ledger_hourly"
    __table_args__ = ({"sqlite_with_rowid": False},)  # rows clustered by hour: range sums read no other page
    hour: str = Field(primary_key=True, max_length=13)
    kind: str = Field(primary_key=True, max_length=30)
    shard: int = Field(default=0, primary_key=True, sa_column_kwargs={"autoincrement": False})
    credits: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    entries: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))


class PaymentHourly(SQLModel, table=True):
    __tablename__ = "payment_hourly"
    __table_args__ = ({"sqlite_with_rowid": False},)
    hour: str = Field(primary_key=True, max_length=13)
    kind: str = Field(primary_key=True, max_length=10)  # plan, pack, other
    currency: str = Field(primary_key=True, max_length=3)
    collected: bool = Field(primary_key=True)
    shard: int = Field(default=0, primary_key=True, sa_column_kwargs={"autoincrement": False})
    payments: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    amount_cents: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    refunded_cents: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    disputed_lost_cents: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    credits_granted: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))


class SubscriptionPeriod(SQLModel, table=True):
    __tablename__ = "subscription_period"
    __table_args__ = (
        Index("ix_subscription_period_subscription", "subscription_id", "starts_at"),
        Index("ix_subscription_period_payment", "payment_id"),
        # churned MRR: spans that ended without a successor, by end time (covering)
        Index("ix_subscription_period_churn", "has_successor", "ends_at", "starts_at", "currency", "amount_cents"),
    )
    id: int | None = Field(default=None, primary_key=True)
    subscription_id: str = Field(max_length=100)
    user_id: str = Field(max_length=200)
    payment_id: int | None = None
    state: str = Field(max_length=20)  # active, past_due
    source: str = Field(max_length=30)  # the ledger entry kind or subscription status that opened it
    starts_at: datetime
    ends_at: datetime
    amount_cents: int = Field(sa_column=Column(BigInteger, nullable=False))
    currency: str = Field(max_length=3)
    is_new: bool = False  # no span of this subscription just before: new (or restarted) MRR
    has_successor: bool = False  # a later span took over: its end is no churn


class MrrHourly(SQLModel, table=True):
    __tablename__ = "mrr_hourly"
    __table_args__ = ({"sqlite_with_rowid": False},)
    hour: str = Field(primary_key=True, max_length=13)
    currency: str = Field(primary_key=True, max_length=3)
    state: str = Field(primary_key=True, max_length=20)
    change_cents: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    new_cents: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
