"""DPO walkthrough, finding 4: ``users erase`` of an id whose tombstone ``prune`` had already hard-deleted
(``CLERK_SYNC_TOMBSTONE_DELETE_AFTER_DAYS``) said "no row for it; tombstone written" while its digest kept
any row out (no row was written): a DPO reading it thought a new record of the person had been made."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from clerk_sync.engine import Entity, Tombstone, Upsert
from clerk_sync.events import user_record
from clerk_sync.retention import Retention, RetentionPolicy
from clerk_sync.store import Store, is_erased
from clerk_sync.tables import users
from tests import factories as f
from tests.test_cli import run

HARD = RetentionPolicy(delete_tombstones_after=timedelta(days=1))


def hard_delete_tombstone(store: Store, clerk_id: str) -> None:
    """The user deleted (a tombstone), then pruned three days later in two passes (digest, then the row)."""
    with store.transaction() as w:
        w.apply(Upsert(Entity.USER, user_record(f.user(clerk_id, 5, email="gone@example.com"))))
        w.apply(Tombstone(Entity.USER, clerk_id, 6))
    later = datetime.now(UTC) + timedelta(days=3)
    Retention(store, HARD, now=lambda: later).prune()
    settled = later + HARD.digest_settle + timedelta(minutes=1)
    Retention(store, HARD, now=lambda: settled).prune()
    with store.connect() as conn:
        assert conn.execute(sa.select(users.c.id).where(users.c.clerk_id == clerk_id)).first() is None
        assert is_erased(conn, Entity.USER, clerk_id)


def test_users_erase_of_a_hard_deleted_tombstone_says_nothing_was_written(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gone.db'}"
    assert run("migrate", env={"DATABASE_URL": url}).returncode == 0
    store = Store.from_url(url)
    hard_delete_tombstone(store, "user_gone")

    result = run("users", "erase", "user_gone", "--reason", "DSR-1", env={"DATABASE_URL": url})
    out = " ".join(result.stdout.split())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tombstone written" not in out, out
    assert "user_gone: already erased" in out and "no row written" in out, out
    with store.connect() as conn:  # as it says: still no row
        assert conn.execute(sa.select(users.c.id).where(users.c.clerk_id == "user_gone")).first() is None
    # the other outcomes are unchanged
    forced = run("users", "erase", "user_never_seen", "--force", env={"DATABASE_URL": url})
    assert forced.returncode == 0 and "user_never_seen: no row for it; tombstone written" in forced.stdout
    store.dispose()
