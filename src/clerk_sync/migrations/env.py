"""Alembic environment: the engine comes from the caller (``clerk_sync.migrations.upgrade``).

Replicas starting together migrate one at a time: PostgreSQL's transaction-scoped advisory lock, SQLite's
``BEGIN IMMEDIATE`` (the store's engine), MySQL/MariaDB's session lock ``GET_LOCK``, which is released only
once the migration's transaction committed (the last version bump with it): a replica waiting for the lock
must read the revision the first one reached, or it runs the last migration again."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import sqlalchemy as sa
from alembic import context
from alembic.runtime.migration import MigrationContext, MigrationInfo

from clerk_sync.errors import StoreError
from clerk_sync.migrations import _PROGRESS, VERSION_TABLE, adopt, refuse_untrusted_trigger_creation
from clerk_sync.tables import metadata

# Any fixed 64-bit number: replicas starting together on PostgreSQL migrate one at a time.
_MIGRATION_LOCK = 0x636C65726B73796E

engine = context.config.attributes["engine"]
# What upgrade() reports when a step fails: the revision the run started from, the steps applied since.
progress: dict[str, Any] = {}
context.config.attributes[_PROGRESS] = progress


def _applied(ctx: MigrationContext, step: MigrationInfo, heads: Collection[Any], run_args: Mapping[str, Any]) -> None:
    if step.is_upgrade:
        progress["applied"].append(step.up_revision_id)


with engine.connect() as connection:
    mysql = connection.dialect.name in ("mysql", "mariadb")
    if mysql:
        # MySQL's DDL commits as it goes, so the lock is the session's. Waiting for a replica migrating
        # first, or a long index build, must not hit the service's statement bound.
        version = str(connection.exec_driver_sql("SELECT VERSION()").scalar()).lower()
        bound = "max_statement_time" if "mariadb" in version else "max_execution_time"
        # Set back after: this connection returns to the service's pool.
        connection.exec_driver_sql(f"SET @clerk_sync_bound = @@SESSION.{bound}, SESSION {bound} = 0")
        got = connection.exec_driver_sql("SELECT GET_LOCK('clerk_sync_migrations', 600)").scalar()
        connection.commit()  # (a session lock: it outlives the transaction SQLAlchemy began for these)
    try:
        if mysql and got != 1:
            raise StoreError("another process held the migration lock for 10 minutes (GET_LOCK "
                             "'clerk_sync_migrations'): check for a stuck `clerk-sync migrate`, then retry")
        with connection.begin():
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql("SET LOCAL statement_timeout = 0")  # an index build may take long
                connection.exec_driver_sql("SET LOCAL lock_timeout = 0")  # wait for a replica migrating first
                connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
                # DDL keeps the bound: queued behind live traffic, it would block every query on its table.
                connection.exec_driver_sql("SET LOCAL lock_timeout = DEFAULT")
            adopt(connection)  # a database a release before VERSION_TABLE migrated (once, under the lock)
            context.configure(connection=connection, target_metadata=metadata, render_as_batch=True,
                              version_table=VERSION_TABLE, on_version_apply=_applied)
            progress.update(start=context.get_context().get_current_revision(), applied=[])
            if mysql:  # before any step: a refusal of its triggers would leave the step half-done
                refuse_untrusted_trigger_creation(connection, progress["start"], context.get_revision_argument())
            context.run_migrations()
        # Committed (the last version bump with it) before the lock is released, below.
    finally:
        if mysql:
            try:
                if got == 1:
                    connection.exec_driver_sql("SELECT RELEASE_LOCK('clerk_sync_migrations')")
                connection.exec_driver_sql(f"SET SESSION {bound} = @clerk_sync_bound")
                connection.commit()
            except sa.exc.SQLAlchemyError:  # the connection broke: closed, the server releases its lock
                connection.invalidate()
