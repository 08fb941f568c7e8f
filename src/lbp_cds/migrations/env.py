"""Alembic environment: migrate the connection ``Store.migrate`` hands over (no URL, no ini)."""

from __future__ import annotations

from alembic import context

from lbp_cds.store import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through lbp_cds.store.Store.migrate, which passes the "
                       "database connection to Alembic")
context.configure(connection=connection, target_metadata=metadata,
                  # SQLite alters a table by copying it; Alembic's batch mode does that.
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
