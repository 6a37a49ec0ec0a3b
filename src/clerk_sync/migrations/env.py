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
        connection.exec_driver_sql("SET LOCAL statement_timeout = 0")  # an index build may take long
        connection.exec_driver_sql("SET LOCAL lock_timeout = 0")  # wait for a replica migrating first
        connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
        # DDL keeps the bound: queued behind live traffic, it would block every query on its table.
        connection.exec_driver_sql("SET LOCAL lock_timeout = DEFAULT")
    elif connection.dialect.name in ("mysql", "mariadb"):
        # MySQL's DDL commits as it goes, so the lock is the session's, released once migrated. Waiting for
        # a replica migrating first, or a long index build, must not hit the service's statement bound.
        version = str(connection.exec_driver_sql("SELECT VERSION()").scalar()).lower()
        bound = "max_statement_time" if "mariadb" in version else "max_execution_time"
        # Set back after: this connection returns to the service's pool.
        connection.exec_driver_sql(f"SET @clerk_sync_bound = @@SESSION.{bound}, SESSION {bound} = 0")
        got = connection.exec_driver_sql("SELECT GET_LOCK('clerk_sync_migrations', 600)").scalar()
        if got != 1:
            connection.exec_driver_sql(f"SET SESSION {bound} = @clerk_sync_bound")
            raise RuntimeError("another process held the migration lock for 10 minutes (GET_LOCK "
                               "'clerk_sync_migrations'): check for a stuck `clerk-sync migrate`, then retry")
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    try:
        context.run_migrations()
    finally:
        if connection.dialect.name in ("mysql", "mariadb"):
            connection.exec_driver_sql("SELECT RELEASE_LOCK('clerk_sync_migrations')")
            connection.exec_driver_sql(f"SET SESSION {bound} = @clerk_sync_bound")
