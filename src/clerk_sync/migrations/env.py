"""Alembic environment: the engine comes from the caller (``clerk_sync.migrations.upgrade``)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from clerk_sync.tables import metadata

# Any fixed 64-bit number: replicas starting together on PostgreSQL migrate one at a time.
_MIGRATION_LOCK = 0x636C65726B73796E

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    if connection.dialect.name == "postgresql":
        connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    context.run_migrations()
