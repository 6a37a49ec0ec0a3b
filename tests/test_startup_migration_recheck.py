"""An embedded app whose migration was refused keeps re-reading the schema version whatever one read raises."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import structlog

from clerk_sync import migrations
from clerk_sync.integrations.starlette import StartupMigration
from clerk_sync.store import create_engine


def _reads(*outcomes: BaseException | str) -> Iterator[BaseException | str]:
    yield from outcomes


def test_a_recheck_that_raises_something_else_than_a_database_error_keeps_rechecking(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Only SQLAlchemy's errors were caught: another exception (a driver's own, a bug in a read) escaped the
    recheck's task, ending it and the prune schedule in the same task group, and deliveries waited until a
    restart."""
    outcomes = _reads(RuntimeError("the driver's own surprise"), "behind", "current")

    def schema_state(engine: Any) -> tuple[str, str | None]:
        outcome = next(outcomes)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome, None

    monkeypatch.setattr(migrations, "schema_state", schema_state)
    engine = create_engine(f"sqlite:///{tmp_path}/recheck.db")
    migration = StartupMigration(engine)
    migration.recheck_s = 0.0
    migration.refused = migration.error = "the start-up migration: refused (for the test)"

    async def main() -> None:
        with anyio.fail_after(30):
            await migration._until_migrated()

    try:
        with structlog.testing.capture_logs() as logs:
            anyio.run(main)
    finally:
        engine.dispose()
    assert migration.done and migration.refused is None, (migration.done, migration.refused)
    said = [e for e in logs if e["event"] == "migration_refused_recheck_failed"]
    assert said and "RuntimeError: the driver's own surprise" in said[0]["error"], logs
    assert [e["event"] for e in logs][-1] == "migrations_current", logs
