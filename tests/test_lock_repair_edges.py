"""The lockout repair and the lock-end rule at their edges: the repair goes through the app's mapped table and
the hooks, leaves a believed end ahead alone, and a downgrade keeps an earlier lock's row locked; an end counted
on a clock behind Clerk's is not taken for an earlier lock's."""
from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa

from clerk_sync import migrations
from clerk_sync.auth.authenticator import DenyList
from clerk_sync.changes import Change, Hook
from clerk_sync.events import lock_in_force, user_record
from clerk_sync.hooks import Dispatcher
from clerk_sync.mapping import MappedTable, SchemaMapping
from clerk_sync.reconcile import Reconciler
from clerk_sync.store import Store, create_engine
from clerk_sync.tables import hook_jobs, users
from clerk_sync.testing import EmulatorServer
from tests.test_lock_expiry import T0_MS, Clock, _client, _row
from tests.test_lock_expiry_upgrade import _lock_row


def test_the_repair_reaches_the_mapped_table_and_the_hooks(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    md = sa.MetaData()
    sa.Table("app_users", md, sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
             sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("email", sa.String(255)),
             sa.Column("is_locked", sa.Boolean), sa.Column("lock_ends", sa.BigInteger), sa.Column("deleted_at", sa.DateTime(timezone=True)))
    md.create_all(engine)
    engine.dispose()
    mapping = SchemaMapping(users=MappedTable("app_users", "clerk_user_id",
                                              {"email": "email", "is_locked": "locked"}))
    seen: list[object] = []
    clock = Clock()
    store = Store(create_engine(db_url), now=clock.utc, mapping=mapping, hooks=[Hook("crm", seen.append)])
    with EmulatorServer(clock=clock) as emu, _client(emu) as clerk:
        user = emu.create_user(email="old@example.com")
        emu.request("POST", f"/v1/users/{user['id']}/lock")
        Reconciler(store, clerk, page_size=50).run()
        with store.transaction() as writer:  # as 0016 leaves a row an earlier release locked
            writer.conn.execute(users.update().where(users.c.clerk_id == user["id"]).values(locked_until=None))
        with store.connect() as conn:
            jobs_before = conn.execute(sa.select(sa.func.count()).select_from(hook_jobs)).scalar_one()
        clock.at += 2 * 3600
        report = Reconciler(store, clerk, page_size=50, now=clock.utc, with_hooks=True).run()
        assert (report.counts["users"].updated, report.counts["users"].lockouts_ended) == (0, 1)
        assert _row(store, user["id"]).locked is False          # clerk-sync's table: unlocked
        with store.connect() as conn:
            app = conn.execute(sa.text("SELECT is_locked, lock_ends FROM app_users")).one()
            jobs_after = conn.execute(sa.select(sa.func.count()).select_from(hook_jobs)).scalar_one()
        assert bool(app[0]) is False, f"app_users still locked: {tuple(app)}"
        assert jobs_after > jobs_before, "no hook job for the unlock"
    store.dispose()


def test_a_downgrade_keeps_a_relocked_row_with_an_earlier_locks_end_locked(db_url: str) -> None:
    """Old release re-locked at version now-60s, leaving the end of an earlier lock (now-2h): 6e6834d's own
    rule says that lock is live (not believed end); the downgrade unlocks it anyway."""
    store = Store(create_engine(db_url))
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    _lock_row(store, "user_relocked", locked_until=now_ms - 7_200_000, version=now_ms - 60_000,
              lock_version=now_ms - 7_300_000)  # (the earlier lock's write)
    deny = DenyList(store, refresh_s=3600)
    assert deny.blocked_reason("user_relocked") == "locked"  # new code: live
    migrations.downgrade(store.engine, "0015")
    try:
        with store.connect() as conn:
            locked = conn.execute(sa.select(users.c.locked).where(users.c.clerk_id == "user_relocked")).scalar_one()
        assert locked is True, "downgrade let a live (re-)lock through"
    finally:
        migrations.upgrade(store.engine)
        store.dispose()


def test_the_repair_leaves_a_believed_end_ahead_to_end_by_itself(db_url: str) -> None:
    """Stored row locked with a believable end 1h ahead; Clerk's page (fetched earlier / lagging) lists the user
    unlocked at the same updated_at: the repair unlocks at once, though the row would have ended by itself."""
    clock = Clock()
    store = Store(create_engine(db_url), now=clock.utc)
    with EmulatorServer(clock=clock) as emu, _client(emu) as clerk:
        user = emu.create_user(email="x@example.com")
        _lock_row(store, user["id"], locked_until=int(clock.at * 1000) + 3_600_000, version=user["updated_at"])
        Reconciler(store, clerk, page_size=50, now=clock.utc).run()
        assert _row(store, user["id"]).locked is True, "a row with a live end ahead was unlocked by the repair"
    store.dispose()


def test_an_end_counted_on_a_clock_behind_clerks_is_not_an_earlier_locks(db_url: str) -> None:
    """JIT stamps the end from the local clock, the version is Clerk's clock: local 30 s behind, a user updated
    (role change) 20 s before their lockout ends -> end < version -> locked for good (until a reconcile)."""
    U = T0_MS  # Clerk's updated_at
    data = {"id": "user_d", "object": "user", "updated_at": U, "created_at": U - 10**7, "locked": True,
            "lockout_expires_in_seconds": 20, "email_addresses": [], "public_metadata": {}, "private_metadata": {},
            "unsafe_metadata": {}}
    rec = user_record(data, fetched_ms=U - 30_000)  # local clock 30 s behind Clerk
    assert not lock_in_force(True, rec.locked_until, now_ms=U + 3_600_000, version_ms=rec.clerk_updated_at,
                             lock_version=rec.lock_version), \
        "an hour after the lock ended (by any clock) the user is still refused"


def test_the_repair_has_an_idempotency_key_and_version_of_its_own(db_url: str) -> None:
    """The unlock shares the lock's ``updated_at`` (a lockout's end bumps none): described at that version, its
    key was the lock's, and a receiver deduplicating on it (or keeping the newest version) dropped the unlock
    and kept the user locked. It is versioned 1 ms after: newer than the lock, below any later real update."""
    seen: list[Change] = []
    clock = Clock()
    store = Store(create_engine(db_url), now=clock.utc, hooks=[Hook("crm", seen.append, on=["user.*"])])
    with EmulatorServer(clock=clock) as emu, _client(emu) as clerk:
        user = emu.create_user(email="locked@example.com")
        run = lambda: Reconciler(store, clerk, page_size=50, now=clock.utc, with_hooks=True).run()  # noqa: E731
        run()
        clock.at += 5
        emu.request("POST", f"/v1/users/{user['id']}/lock")
        run()
        clock.at += 2 * 3600  # the lockout ended in Clerk, its updated_at unchanged
        run()
        version = emu.request("GET", f"/v1/users/{user['id']}")["updated_at"]
    Dispatcher(store, now=clock.utc).drain()
    store.dispose()
    updates = [c for c in seen if c.kind == "updated"]
    assert [(c.values["locked"], c.version) for c in updates] == [(True, version), (False, version + 1)]
    assert len({c.idempotency_key for c in seen}) == len(seen), [c.idempotency_key for c in seen]
    assert updates[1].values["clerk_updated_at"] == version  # the row's own version is still Clerk's
