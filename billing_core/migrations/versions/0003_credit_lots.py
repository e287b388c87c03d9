"""credit lots and account totals, kept with the ledger entries; back-filled from the entries

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""
from datetime import datetime, timezone

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

DISPUTE_KINDS_SQL = "kind IN ('dispute_hold', 'dispute_release')"


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.create_table(
        "credit_lot",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("lot_key", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
        sa.Column("user_id", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("source", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
        sa.Column("granted", sa.Integer(), nullable=False),
        sa.Column("remaining", sa.Integer(), nullable=False),
        sa.Column("held", sa.Integer(), server_default="0", nullable=False),
        sa.Column("expires_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("subscription_id", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True),
        sa.Column("period_end", sa.BigInteger(), nullable=True),
        sa.Column("payment_id", sa.Integer(), nullable=True),
        sa.Column("allowance_from", sa.Integer(), nullable=True),
        sa.Column("allowance_to", sa.Integer(), nullable=True),
        sa.Column("closed", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("closed_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["payment_id"], ["payment.id"]),
        sa.ForeignKeyConstraint(["user_id"], ["account.user_id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("lot_key"),
    )
    with op.batch_alter_table("account") as batch_op:
        batch_op.add_column(sa.Column("balance", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("debt", sa.Integer(), server_default="0", nullable=False))

    _backfill_lots()
    op.create_index("ix_credit_lot_open", "credit_lot", ["user_id", "expires_at"],
                    sqlite_where=sa.text("closed = 0"), postgresql_where=sa.text("closed = false"))
    op.create_index("ix_credit_lot_subscription", "credit_lot", ["subscription_id", "period_end"])
    _backfill_totals()

    op.create_index("ix_credit_lot_payment", "credit_lot", ["payment_id"])
    op.create_index("ix_ledger_dispute_lot", "ledger_entry", ["lot_key"],
                    sqlite_where=sa.text(DISPUTE_KINDS_SQL), postgresql_where=sa.text(DISPUTE_KINDS_SQL))
    if not sqlite:
        op.execute("ANALYZE credit_lot")
        op.execute("ANALYZE account")


def _backfill_lots() -> None:
    """One lot per grant entry (lot_source set), its remaining and held summed from the entries naming it.

    Closed as the ledger closes lots: an `expire` entry, an expiry time already passed, or a pack or
    adjustment lot with nothing left and nothing held. A lot granted without a payment and claimed later
    (`payment_link`) carries the claiming payment."""
    now = datetime.now(timezone.utc)
    statement = sa.text(f"""
        INSERT INTO credit_lot (lot_key, user_id, source, granted, remaining, held, expires_at, subscription_id,
                                period_end, payment_id, allowance_from, allowance_to, closed, closed_at, created_at)
        SELECT g.source_key, g.user_id, g.lot_source, g.credits, COALESCE(s.total, 0), COALESCE(s.held, 0),
               g.expires_at, g.subscription_id, g.period_end, COALESCE(g.payment_id, s.claimed_by),
               g.allowance_from, g.allowance_to,
               CASE WHEN {_closed_sql()} THEN {_true()} ELSE {_false()} END,
               CASE WHEN {_closed_sql()} THEN :now ELSE NULL END,
               g.created_at
        FROM ledger_entry g
        LEFT JOIN (
            SELECT lot_key, user_id,
                   SUM(credits) AS total,
                   -SUM(CASE WHEN {DISPUTE_KINDS_SQL} THEN credits ELSE 0 END) AS held,
                   SUM(CASE WHEN kind = 'expire' THEN 1 ELSE 0 END) AS marks,
                   MAX(CASE WHEN kind = 'payment_link' THEN payment_id END) AS claimed_by
            FROM ledger_entry
            WHERE lot_key IS NOT NULL
            GROUP BY lot_key, user_id
        ) s ON s.lot_key = g.source_key AND s.user_id = g.user_id
        WHERE g.lot_source IS NOT NULL
        ORDER BY g.id
    """).bindparams(sa.bindparam("now", value=now, type_=sqlmodel.sql.sqltypes.UTCDateTime()))
    op.execute(statement)


def _closed_sql() -> str:
    return ("(COALESCE(s.marks, 0) > 0 OR (g.expires_at IS NOT NULL AND g.expires_at <= :now)"
            " OR (g.lot_source <> 'subscription' AND COALESCE(s.total, 0) = 0 AND COALESCE(s.held, 0) = 0))")


def _true() -> str:
    return "1" if op.get_bind().dialect.name == "sqlite" else "true"


def _false() -> str:
    return "0" if op.get_bind().dialect.name == "sqlite" else "false"


def _backfill_totals() -> None:
    """debt: the entries without a lot; balance: debt plus the open lots' remaining credits."""
    op.execute(f"""
        UPDATE account SET
            debt = COALESCE((SELECT SUM(e.credits) FROM ledger_entry e
                             WHERE e.user_id = account.user_id AND e.lot_key IS NULL), 0),
            balance = COALESCE((SELECT SUM(e.credits) FROM ledger_entry e
                                WHERE e.user_id = account.user_id AND e.lot_key IS NULL), 0)
                      + COALESCE((SELECT SUM(l.remaining) FROM credit_lot l
                                  WHERE l.user_id = account.user_id AND l.closed = {_false()}), 0)
    """)


def downgrade() -> None:
    op.drop_index("ix_ledger_dispute_lot", table_name="ledger_entry")
    op.drop_index("ix_credit_lot_payment", table_name="credit_lot")
    op.drop_index("ix_credit_lot_subscription", table_name="credit_lot")
    op.drop_index("ix_credit_lot_open", table_name="credit_lot")
    op.drop_table("credit_lot")
    for column in ("debt", "balance"):  # SQLite >= 3.35 drops a column in place (no table copy under foreign keys)
        op.execute(f"ALTER TABLE account DROP COLUMN {column}")
