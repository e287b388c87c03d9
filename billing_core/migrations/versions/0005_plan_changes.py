"""plan changes: each mid-period change once, with its credits; a subscription's current period start

Revision ID: 0005
Revises: 0003
Create Date: 2026-11-29
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "plan_change",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("subscription_id", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("period_start", sa.BigInteger(), nullable=True),
        sa.Column("period_end", sa.BigInteger(), nullable=False),
        sa.Column("changed_at", sa.BigInteger(), nullable=False),
        sa.Column("from_tier", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("to_tier", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("fraction", sqlmodel.sql.sqltypes.AutoString(length=60), nullable=False),
        sa.Column("credits", sa.Integer(), nullable=False),
        sa.Column("applied", sa.Integer(), nullable=False),
        sa.Column("event_id", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True),
        sa.Column("invoice_id", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True),
        sa.Column("payment_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["account.user_id"]),
        sa.ForeignKeyConstraint(["payment_id"], ["payment.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id"),
    )
    op.create_index("ix_plan_change_user_id", "plan_change", ["user_id"])
    op.create_index("ix_plan_change_invoice_id", "plan_change", ["invoice_id"])
    op.create_index("ix_plan_change_period", "plan_change", ["subscription_id", "period_end"])
    with op.batch_alter_table("subscription") as batch:
        batch.add_column(sa.Column("current_period_start", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("subscription") as batch:
        batch.drop_column("current_period_start")
    op.drop_index("ix_plan_change_period", table_name="plan_change")
    op.drop_index("ix_plan_change_invoice_id", table_name="plan_change")
    op.drop_index("ix_plan_change_user_id", table_name="plan_change")
    op.drop_table("plan_change")
