"""Drop ix_ledger_expires_at: lots by expiry are read from credit_lot (its own expiry indexes, 0006/0007), and
no query filters ledger entries by expires_at any more, yet every entry written paid for the index.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29
"""
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_ledger_expires_at", table_name="ledger_entry")


def downgrade() -> None:
    op.create_index("ix_ledger_expires_at", "ledger_entry", ["expires_at", "user_id", "source_key"], unique=False)
