"""Lockout ends across releases: rows locked before ``users.locked_until`` existed, rows a release without it
wrote during a rolling upgrade, and a downgrade. Clerk sends nothing when a lockout ends, so none of these
may leave a user refused for good, and none may let a live lock through."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from clerk_sync import migrations
from clerk_sync.auth.authenticator import DenyList
from clerk_sync.auth.users import JitUsers, read_user, standing_error
from clerk_sync.errors import UserLocked
from clerk_sync.events import lock_in_force
from clerk_sync.freshness import read_snapshot
from clerk_sync.reconcile import Reconciler
from clerk_sync.store import Store, create_engine
from clerk_sync.tables import users
from clerk_sync.testing import EmulatorServer
from tests.test_lock_expiry import T0, T0_MS, Clock, _client, _row


def test_an_end_older_than_its_row_belongs_to_an_earlier_lock() -> None:
    """A release without ``locked_until`` re-locked the row (version T0+2h) and left the last lock's end (T0+1h):
    that end is not believed, the user stays locked until Clerk says otherwise."""
    hour = 3_600_000
    assert lock_in_force(True, T0_MS + hour, now_ms=T0_MS + 3 * hour, version_ms=T0_MS + 2 * hour,
                         lock_version=T0_MS + 2 * hour)
    assert not lock_in_force(True, T0_MS + hour, now_ms=T0_MS + 3 * hour, version_ms=T0_MS,
                             lock_version=T0_MS)  # its own lock: over


def _lock_row(store: Store, clerk_id: str, *, locked_until: int | None, version: int,
              lock_version: int | str | None = "version") -> None:
    """A locked row as a release wrote it: this one (``lock_version`` the row's version, the default), or one
    without ``lock_version`` (None, or the version of the earlier write it left behind)."""
    now = datetime.fromtimestamp(T0, UTC)
    with store.transaction() as writer:
        writer.conn.execute(users.insert().values(
            clerk_id=clerk_id, email=f"{clerk_id}@example.com", email_addresses=[], public_metadata={},
            private_metadata={}, unsafe_metadata={}, locked=True, locked_until=locked_until,
            lock_version=version if lock_version == "version" else lock_version,
            clerk_created_at=T0_MS, clerk_updated_at=version, created_at=now, updated_at=now))


def test_the_deny_list_and_the_row_checks_do_not_believe_an_earlier_locks_end(db_url: str) -> None:
    clock = Clock(T0 + 3 * 3600)
    store = Store(create_engine(db_url), now=clock.utc)
    _lock_row(store, "user_relocked", locked_until=T0_MS + 3_600_000, version=T0_MS + 7_200_000,
              lock_version=T0_MS)  # (re-locked by a release before 0017: T0's write left behind)
    _lock_row(store, "user_over", locked_until=T0_MS + 3_600_000, version=T0_MS)
    deny = DenyList(store, refresh_s=3600, wall=clock.utc)
    assert (deny.blocked_reason("user_relocked"), deny.blocked_reason("user_over")) == ("locked", None)
    relocked, over = read_user(store, "user_relocked"), read_user(store, "user_over")
    assert relocked is not None and over is not None
    assert isinstance(standing_error(relocked, deny.now_ms()), UserLocked)
    assert standing_error(over, deny.now_ms()) is None
    store.dispose()


def test_a_downgrade_unlocks_the_locks_that_have_ended(db_url: str) -> None:
    """Without ``locked_until`` the code before 0016 would refuse a user whose lock has ended for good."""
    store = Store(create_engine(db_url))
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    _lock_row(store, "user_ended", locked_until=now_ms - 60_000, version=now_ms - 3_600_000)
    _lock_row(store, "user_live", locked_until=now_ms + 3_600_000, version=now_ms - 60_000)
    _lock_row(store, "user_forever", locked_until=None, version=now_ms - 60_000)
    migrations.downgrade(store.engine, "0015")
    try:
        with store.connect() as conn:
            locked = dict(conn.execute(sa.select(users.c.clerk_id, users.c.locked)).all())
        assert locked == {"user_ended": False, "user_live": True, "user_forever": True}
    finally:
        migrations.upgrade(store.engine)
        store.dispose()


@pytest.mark.parametrize("dry_run", [False, True])
def test_reconcile_unlocks_a_row_whose_lockout_ended_before_its_end_was_kept(db_url: str, dry_run: bool) -> None:
    """A row locked before 0016 (no end): Clerk later lists the user unlocked with the same ``updated_at`` (a
    lockout's end bumps nothing), which the version guard used to skip: locked for good. Reconcile repairs it."""
    clock = Clock()
    store = Store(create_engine(db_url), now=clock.utc)
    with EmulatorServer(clock=clock) as emu, _client(emu) as clerk:
        user = emu.create_user(email="old@example.com")
        emu.request("POST", f"/v1/users/{user['id']}/lock")
        Reconciler(store, clerk, page_size=50).run()
        with store.transaction() as writer:  # as 0016 leaves a row an earlier release locked
            writer.conn.execute(users.update().where(users.c.clerk_id == user["id"]).values(locked_until=None))
        clock.at += 2 * 3600  # the lockout is over in Clerk: same updated_at, no event
        with pytest.raises(UserLocked):
            JitUsers(store, wall=clock.utc).get_auth_user(user["id"])
        changes: list[object] = []
        report = Reconciler(store, clerk, page_size=50, now=clock.utc, on_change=changes.append).run(dry_run=dry_run)
        assert (report.counts["users"].updated, report.counts["users"].lockouts_ended) == (0, 1)
        assert _row(store, user["id"]).locked is dry_run  # a dry run only reports it
        if not dry_run:
            assert JitUsers(store, wall=clock.utc).get_auth_user(user["id"]).clerk_id == user["id"]
            # tidied, not drift: Clerk sends nothing when a lockout ends, so no delivery was missed (review:
            # as an update it paged ClerkSyncNoDeliveriesWhileDrift, and doctor --freshness failed)
            assert read_snapshot(store).reconcile_last_drift == {"created": 0, "updated": 0, "deleted": 0}
        else:
            assert [getattr(c, "clerk_id", None) for c in changes] == [user["id"]]
    store.dispose()
