"""ledger_entry is append-only: the database itself refuses UPDATE and DELETE

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for action in ("UPDATE", "DELETE"):
            op.execute(f"CREATE TRIGGER ledger_entry_no_{action.lower()} BEFORE {action} ON ledger_entry "
                       "BEGIN SELECT RAISE(ABORT, 'ledger_entry is append-only'); END")
    else:
        op.execute("CREATE FUNCTION ledger_entry_append_only() RETURNS trigger AS $$ BEGIN "
                   "RAISE EXCEPTION 'ledger_entry is append-only'; END; $$ LANGUAGE plpgsql")
        op.execute("CREATE TRIGGER ledger_entry_append_only BEFORE UPDATE OR DELETE ON ledger_entry "
                   "FOR EACH ROW EXECUTE FUNCTION ledger_entry_append_only()")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS ledger_entry_no_update")
        op.execute("DROP TRIGGER IF EXISTS ledger_entry_no_delete")
    else:
        op.execute("DROP TRIGGER IF EXISTS ledger_entry_append_only ON ledger_entry")
        op.execute("DROP FUNCTION IF EXISTS ledger_entry_append_only()")
