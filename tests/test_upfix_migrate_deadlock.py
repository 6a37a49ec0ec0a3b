"""`clerk-sync migrate` on PostgreSQL against live deliveries (rolling-upgrade walkthrough, finding 3): the upgrade
is one transaction that locks ``users`` (0006) and then needs ``webhook_events`` (0007), the opposite order of a
delivery (its inbox row, then the user). A real deadlock between the two, made deterministic: the delivery's
connection holds the inbox, the migration waits for it, then the delivery reads ``users``; the delivery's own
deadlock check is pushed out of the way so the migration's (the first to wait) finds the cycle and loses."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync import migrations
from clerk_sync.store import create_engine
from tests.conftest import pg_schema

pytestmark = pytest.mark.postgres

HEAD = migrations.head_revision()
# The migration's deadlock check runs this long after it starts waiting: the delivery's read of users must have
# begun by then (it starts within a few ms of the wait being seen; the margin is for a loaded machine).
MIGRATION_DEADLOCK_TIMEOUT_MS = 3000


@pytest.fixture
def at_0005() -> Iterator[str]:
    """A PostgreSQL schema migrated to 0005 (the release the walkthrough upgraded from): its URL, with the
    migration's connections checking for deadlocks after :data:`MIGRATION_DEADLOCK_TIMEOUT_MS`."""
    with pg_schema("upfix_") as url:
        engine = create_engine(url)
        migrations.upgrade(engine, "0005")
        engine.dispose()
        yield url


def _migration_engine(url: str) -> sa.Engine:
    return create_engine(f"{url}%20-cdeadlock_timeout%3D{MIGRATION_DEADLOCK_TIMEOUT_MS}")


class Delivery:
    """A delivery's transaction on its own connection: holds the inbox (``webhook_events``), then reads ``users``."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url)
        self.conn = self.engine.connect()
        self.conn.exec_driver_sql("SET deadlock_timeout = '60s'")  # the migration's check finds the cycle first
        self.conn.exec_driver_sql("LOCK TABLE webhook_events IN ROW EXCLUSIVE MODE")  # what its INSERT takes
        self.pid = self.conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        self.watcher = sa.create_engine(url)

    def wait_for_the_migration_to_queue_on_the_inbox(self) -> None:
        query = sa.text("SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE NOT l.granted "
                        "AND c.relname = 'webhook_events' AND c.relnamespace = current_schema()::regnamespace "
                        "AND l.pid <> :pid")
        deadline = time.monotonic() + 60
        with self.watcher.connect() as conn:
            while not conn.execute(query, {"pid": self.pid}).scalar():
                conn.rollback()
                assert time.monotonic() < deadline, "the migration never waited for the inbox"
                time.sleep(0.01)

    def read_users_and_commit(self) -> None:
        """Waits for the migration's lock on users: the deadlock. Returns once the migration lost it."""
        self.conn.exec_driver_sql("SELECT count(*) FROM users").scalar()
        self.conn.commit()

    def close(self) -> None:
        self.conn.close()
        self.engine.dispose()
        self.watcher.dispose()


@contextmanager
def migrating(url: str) -> Iterator[dict[str, Any]]:
    """``migrations.upgrade`` in a thread; its result (or error) in the dict once the block ends."""
    engine = _migration_engine(url)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = migrations.upgrade(engine)
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield outcome
    finally:
        thread.join(120)
        assert not thread.is_alive(), "the migration did not end"
        engine.dispose()


def test_a_deadlock_with_a_delivery_runs_the_upgrade_again(at_0005: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed: the job failed (exit 3) with "fix the cause, then run `clerk-sync migrate` again" while nothing
    was wrong but timing; the delivery went on, and so does the upgrade now, once the delivery committed."""
    delivered = threading.Event()
    waits: list[float] = []

    def sleep(seconds: float) -> None:  # the backoff: over once the delivery committed (no race with a timer)
        waits.append(seconds)
        assert delivered.wait(60)

    monkeypatch.setattr(migrations, "_sleep", sleep, raising=False)
    delivery = Delivery(at_0005)
    try:
        with migrating(at_0005) as outcome:
            delivery.wait_for_the_migration_to_queue_on_the_inbox()
            delivery.read_users_and_commit()  # the delivery wins: the migration lost the deadlock
            delivered.set()
    finally:
        delivery.close()
    assert "error" not in outcome, outcome.get("error")
    assert waits == [migrations.DEADLOCK_BACKOFF_S[0]]
    assert outcome["result"].start == "0005" and outcome["result"].steps[-1] == HEAD
    engine = create_engine(at_0005)
    assert migrations.current_revision(engine) == HEAD
    engine.dispose()


def test_a_deadlock_after_the_last_retry_says_nothing_was_applied_and_to_run_it_again(
        at_0005: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(migrations, "DEADLOCK_BACKOFF_S", (), raising=False)  # every retry spent: this deadlock is the last
    delivery = Delivery(at_0005)
    try:
        with migrating(at_0005) as outcome:
            delivery.wait_for_the_migration_to_queue_on_the_inbox()
            delivery.read_users_and_commit()
    finally:
        delivery.close()
    failed = outcome.get("error")
    assert isinstance(failed, migrations.MigrationError), outcome
    message = str(failed)
    assert message.startswith("migration 0007 failed: database error: DeadlockDetected: deadlock detected"), message
    assert "nothing was applied (the upgrade is one transaction)" in message
    assert "it deadlocked with live traffic" in message and "not a fault of the schema" in message
    assert message.endswith("run `clerk-sync migrate` again") and "fix the cause" not in message
    assert failed.revision == "0007"
    engine = create_engine(at_0005)
    assert migrations.current_revision(engine) == "0005"
    engine.dispose()
