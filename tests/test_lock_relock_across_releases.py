"""A lock re-written by a release that does not keep ``users.lock_version`` (0017), during a rolling upgrade.

Such a release writes ``locked`` and ``clerk_updated_at`` and leaves ``locked_until`` (it may not know the
column either) as the last lock left it. Found by review: after this release locked a user for an hour, an
older replica unlocked them and then locked them for good; this release believed the first lock's end (ahead
of the new version) and let the user in an hour later, and the downgrade of 0016 unlocked them too. An end is
now believed only when the row's ``lock_version`` is its version. On SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from clerk_sync import migrations
from clerk_sync.auth.authenticator import DenyList
from clerk_sync.auth.users import read_user, standing_error
from clerk_sync.engine import Entity, Upsert
from clerk_sync.errors import UserLocked
from clerk_sync.events import user_record
from clerk_sync.reconcile import Reconciler
from clerk_sync.store import Store, create_engine
from clerk_sync.tables import users
from clerk_sync.testing import EmulatorServer
from tests import factories as f
from tests.test_lock_expiry import T0, T0_MS, Clock, _client, _row

HOUR_MS = 3_600_000


def _this_release_locks(store: Store, clerk_id: str, at_ms: int, seconds: int | None) -> None:
    data = f.user(clerk_id, at_ms) | {"locked": True, "lockout_expires_in_seconds": seconds}
    with store.transaction() as writer:
        writer.apply(Upsert(Entity.USER, user_record(data, event_ms=at_ms)))


def _older_release_writes(store: Store, clerk_id: str, version: int, *, locked: bool,
                          locked_until: int | str | None = "kept") -> None:
    """What a release before 0017 writes: the columns it knows. One before 0016 keeps ``locked_until`` as it
    was ("kept"); one of 0016 writes it too. Neither knows ``lock_version``."""
    values: dict[str, object] = {"locked": locked, "clerk_updated_at": version}
    if locked_until != "kept":
        values["locked_until"] = locked_until
    with store.transaction() as writer:
        writer.conn.execute(users.update().where(users.c.clerk_id == clerk_id).values(**values))


def _refused(store: Store, clerk_id: str, clock: Clock) -> tuple[str | None, bool]:
    deny = DenyList(store, refresh_s=3600, wall=clock.utc)
    user = read_user(store, clerk_id)
    assert user is not None
    return deny.blocked_reason(clerk_id), isinstance(standing_error(user, deny.now_ms()), UserLocked)


@pytest.mark.parametrize("older", ["before 0016", "0016"])
def test_a_lock_for_good_written_by_an_older_release_does_not_end_with_an_earlier_lock(db_url: str,
                                                                                       older: str) -> None:
    clock = Clock(T0)
    store = Store(create_engine(db_url), now=clock.utc)
    _this_release_locks(store, "user_r", T0_MS, 3600)  # ends at T0 + 1 h
    assert _row(store, "user_r").locked_until == T0_MS + HOUR_MS
    end = "kept" if older == "before 0016" else None
    _older_release_writes(store, "user_r", T0_MS + 60_000, locked=False, locked_until=end)  # an admin unlocks
    _older_release_writes(store, "user_r", T0_MS + 120_000, locked=True, locked_until=end)  # then locks for good
    clock.at = T0 + 3601  # past the first lock's end
    assert _refused(store, "user_r", clock) == ("locked", True)
    store.dispose()


def test_a_temporary_relock_by_an_older_release_is_kept_until_clerk_says_otherwise(db_url: str) -> None:
    """Its end (written by a 0016 release without ``lock_version``) is not believed either: locked past it
    (fail closed) until a full reconcile finds the user unlocked at the same version, which unlocks the row."""
    clock = Clock(T0)
    store = Store(create_engine(db_url), now=clock.utc)
    with EmulatorServer(clock=clock) as emu, _client(emu) as clerk:
        user = emu.create_user(email="r@example.com")
        version = user["updated_at"]
        _this_release_locks(store, user["id"], version - 60_000, 3600)
        _older_release_writes(store, user["id"], version, locked=True, locked_until=version + 60_000)
        clock.at += 120  # past the 0016 release's end: not believed
        assert _refused(store, user["id"], clock) == ("locked", True)
        report = Reconciler(store, clerk, page_size=50, now=clock.utc).run()  # Clerk: unlocked, same version
        assert (report.counts["users"].updated, report.counts["users"].lockouts_ended) == (0, 1)
        assert _refused(store, user["id"], clock) == (None, False)
    store.dispose()


def test_this_releases_own_lock_still_ends_by_itself(db_url: str) -> None:
    clock = Clock(T0)
    store = Store(create_engine(db_url), now=clock.utc)
    _this_release_locks(store, "user_o", T0_MS, 3600)
    assert _refused(store, "user_o", clock) == ("locked", True)
    clock.at = T0 + 3601
    assert _refused(store, "user_o", clock) == (None, False)
    store.dispose()


def test_the_downgrade_keeps_a_user_an_older_release_locked_for_good_locked(db_url: str) -> None:
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    t1 = now_ms - 2 * HOUR_MS  # a one-hour lock two hours ago: its end an hour ago
    store = Store(create_engine(db_url))
    _this_release_locks(store, "user_d", t1, 3600)
    _this_release_locks(store, "user_ended", t1, 3600)  # this release's own lock, ended: the downgrade unlocks it
    _older_release_writes(store, "user_d", t1 + 60_000, locked=False)
    _older_release_writes(store, "user_d", t1 + 120_000, locked=True)  # for good (before 0016: the end kept)
    migrations.downgrade(store.engine, "0015")
    try:
        with store.connect() as conn:
            locked = dict(conn.execute(sa.select(users.c.clerk_id, users.c.locked)).all())
    finally:
        migrations.upgrade(store.engine)
        store.dispose()
    assert locked == {"user_d": True, "user_ended": False}


def test_rows_from_before_0017_do_not_believe_their_end(db_url: str) -> None:
    """0017 leaves ``lock_version`` NULL: which release wrote the end is unknown, so it is not believed (as for
    rows from before 0016); a downgrade to 0016 and back shows it."""
    clock = Clock(T0)
    store = Store(create_engine(db_url), now=clock.utc)
    _this_release_locks(store, "user_p", T0_MS, 3600)
    migrations.downgrade(store.engine, "0016")
    migrations.upgrade(store.engine)
    assert _row(store, "user_p").locked_until == T0_MS + HOUR_MS  # (this release's own end survives 0017's round trip)
    with store.connect() as conn:
        assert conn.execute(sa.select(users.c.lock_version)).scalar_one() is None
    clock.at = T0 + 3601
    assert _refused(store, "user_p", clock) == ("locked", True)
    store.dispose()
