"""Alembic environment: runs on the connection handed over by billing_core.db.migrate()."""
from alembic import context
from sqlmodel import SQLModel

from billing_core import models  # noqa: F401  (registers the tables)
from billing_core.db import get_engine

config = context.config
target_metadata = SQLModel.metadata


def run_migrations(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    with get_engine(config.get_main_option("sqlalchemy.url")).begin() as conn:
        run_migrations(conn)
