"""Migrations build exactly the tables the code declares, on SQLite and PostgreSQL, and reverse cleanly."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from clerk_sync import migrations
from clerk_sync.store import create_engine
from clerk_sync.tables import metadata


def test_migrated_schema_matches_the_tables(db_url: str) -> None:
    engine = create_engine(db_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
    assert migrations.is_current(engine)
    engine.dispose()


def test_downgrade_to_base_and_up_again(db_url: str) -> None:
    engine = create_engine(db_url)
    migrations.downgrade(engine, "base")
    names = set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
    assert not names & {"users", "organizations", "webhook_events"}
    assert not migrations.is_current(engine)
    migrations.upgrade(engine)
    migrations.upgrade(engine)  # idempotent
    assert migrations.is_current(engine)
    assert {"users", "organizations", "organization_memberships", "webhook_events", "audit_log"} <= set(sa.inspect(engine).get_table_names())
    engine.dispose()
