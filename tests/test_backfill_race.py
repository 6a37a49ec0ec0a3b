"""``migrate --mapping .. --backfill`` on a live install: a delivery, deletion or erasure that commits while
the backfill runs is what the mapped table ends with, never the backfill's stale page (mapping review,
2026-12-04). SQLite is left out: the backfill's transaction holds its write lock, so nothing commits between
the page read and the projection."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync.cli.hooks import migrate_mapping
from clerk_sync.engine import plan_delivery
from clerk_sync.events import parse_envelope
from clerk_sync.mapping import Anonymise, DeletePolicy, HardDelete, MappedTable, SchemaMapping, SoftDelete
from clerk_sync.retention import Retention
from clerk_sync.store import Store
from tests import factories as f
from tests.test_hooks import B, deliver


def _app_table(db_url: str, name: str) -> sa.Engine:
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        sa.Table(name, sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("email", sa.String(320)), sa.Column("name", sa.String(200))).create(conn)
    return engine


def _mapped(policy: DeletePolicy, name: str) -> SchemaMapping:
    return SchemaMapping(users=MappedTable(name, "clerk_user_id", {"email": "email", "name": "full_name"},
                                           on_delete=policy))


def _rows(engine: sa.Engine, name: str, clerk_id: str = "clerk_user_id") -> list[dict[str, Any]]:
    with engine.connect() as conn:  # (a policy's own column too: deleted_at)
        table = sa.Table(name, sa.MetaData(), autoload_with=conn)
        rows = conn.execute(sa.select(table).order_by(table.c[clerk_id])).mappings().all()
    return [{k: v for k, v in row.items() if k != "id"} for row in rows]


def _installed(db_url: str, name: str, policy: DeletePolicy) -> tuple[Store, sa.Engine]:
    """An install with user_x (and user_y) synced, then a mapping added and backfilled once."""
    engine = _app_table(db_url, name)
    plain = Store.from_url(db_url)  # before the mapping: clerk-sync's tables only
    assert deliver(plain, f.envelope("user.created", f.user("user_x", B + 1000, email="x@example.com")),
                   f.envelope("user.created", f.user("user_y", B + 1000, email="y@example.com"))) == ["applied"] * 2
    plain.dispose()
    mapping = _mapped(policy, name)
    store = Store.from_url(db_url, mapping=mapping)
    migrate_mapping(store, mapping, backfill=True)
    assert [row["email"] for row in _rows(engine, name)] == ["x@example.com", "y@example.com"]
    return store, engine


@contextmanager
def _after_page_read(store: Store, competing: Callable[[], None], table: str = "users") -> Iterator[None]:
    """Run ``competing`` (committed on a store of its own) once, right after the backfill read its first page
    of ``table``, before it projects any row of it."""
    fired: list[bool] = []

    def after(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        sql = " ".join(statement.upper().split())
        if (not fired and sql.startswith("SELECT") and f"FROM {table.upper()}" in sql and "LIMIT" in sql
                and "FOR UPDATE" not in sql):
            fired.append(True)
            competing()

    sa.event.listen(store.engine, "after_cursor_execute", after)
    try:
        yield
    finally:
        sa.event.remove(store.engine, "after_cursor_execute", after)
    assert fired, "the backfill read no page"


def _deliver_deletion(other: Store) -> None:
    _deliver_deletion_of(other, "user_x")


def _deliver_update(other: Store) -> None:
    event = f.envelope("user.updated", f.user("user_x", B + 2000, email="new@example.com", first_name="Grace"))
    assert deliver(other, event) == ["applied"]


def _erase(other: Store) -> None:
    Retention(other).erase_user("user_x", reason="gdpr")


_RACES = {  # delete policy, what commits between the page read and the projection
    "hard_delete": (HardDelete(), _deliver_deletion),
    "soft_delete_erased": (SoftDelete(), _erase),
    "anonymise_deleted": (Anonymise(), _deliver_deletion),
    "updated": (SoftDelete(), _deliver_update),
}


@pytest.mark.parametrize("race", list(_RACES))
def test_what_commits_after_the_page_read_is_what_the_backfill_leaves(db_url: str, race: str) -> None:
    """The review's reproduction: a hard-deleted user's row came back, an erased or anonymised row's personal
    columns were filled again, a newer e-mail replaced by the older one."""
    if db_url.startswith("sqlite"):
        pytest.skip("SQLite: the backfill holds the write lock, nothing commits between its read and its write")
    policy, competing = _RACES[race]
    name = f"bf_{race}"
    store, engine = _installed(db_url, name, policy)
    other = Store.from_url(db_url, mapping=store.mapping)  # a serving replica
    delivered: list[list[dict[str, Any]]] = []

    def commit_then_look() -> None:
        competing(other)
        delivered.append(_rows(engine, name))

    with _after_page_read(store, commit_then_look):
        migrate_mapping(store, _mapped(policy, name), backfill=True)
    after = _rows(engine, name)
    other.dispose()
    store.dispose()
    engine.dispose()
    assert after == delivered[0]
    x = [row for row in after if row["clerk_user_id"] == "user_x"]
    if race == "hard_delete":
        assert x == []
    elif race == "updated":
        assert (x[0]["email"], x[0]["name"]) == ("new@example.com", "Grace Lovelace")
    else:  # erased, anonymised: personal columns stay cleared
        assert (x[0]["email"], x[0]["name"]) == (None, None)
    assert [row["email"] for row in after if row["clerk_user_id"] == "user_y"] == ["y@example.com"]


def test_a_membership_deleted_with_its_user_after_the_page_read_stays_deleted(db_url: str) -> None:
    """A user's deletion cascades to their memberships under the user's lock (and the memberships' rows):
    the membership's mapped row, deleted with it, is not written back."""
    if db_url.startswith("sqlite"):
        pytest.skip("SQLite: the backfill holds the write lock, nothing commits between its read and its write")
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        sa.Table("bf_seats", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("role", sa.String(64))).create(conn)
    plain = Store.from_url(db_url)
    assert deliver(plain, f.envelope("user.created", f.user("user_m", B + 1000)),
                   f.envelope("organizationMembership.created",
                              f.membership("orgmem_1", "org_1", "user_m", B + 1000))) == ["applied"] * 2
    plain.dispose()
    mapping = SchemaMapping(memberships=MappedTable("bf_seats", "clerk_membership_id", {"role": "role"},
                                                    on_delete=HardDelete()))
    store = Store.from_url(db_url, mapping=mapping)
    migrate_mapping(store, mapping, backfill=True)
    assert len(_rows(engine, "bf_seats", "clerk_membership_id")) == 1
    other = Store.from_url(db_url, mapping=mapping)
    with _after_page_read(store, lambda: _deliver_deletion_of(other, "user_m"), "organization_memberships"):
        migrate_mapping(store, mapping, backfill=True)
    rows = _rows(engine, "bf_seats", "clerk_membership_id")
    other.dispose()
    store.dispose()
    engine.dispose()
    assert rows == []


def _deliver_deletion_of(other: Store, clerk_id: str) -> None:
    assert deliver(other, f.envelope("user.deleted", f.deleted("user", clerk_id), B + 2000)) == ["applied"]


def test_a_backfill_waits_for_a_delivery_in_progress_then_projects_what_it_wrote(db_url: str) -> None:
    """A delivery holding the user's lock (its transaction open): the backfill waits for it, then projects the
    row it committed. Before, it projected the value it had read before the delivery, once the delivery's row
    lock on the mapped row was released."""
    if db_url.startswith("sqlite"):
        pytest.skip("SQLite: the delivery and the backfill are one writer at a time")
    name = "bf_wait"
    store, engine = _installed(db_url, name, SoftDelete())
    other = Store.from_url(db_url, mapping=store.mapping)
    event = f.envelope("user.updated", f.user("user_x", B + 2000, email="new@example.com"))
    intent = plan_delivery(parse_envelope(json.dumps(event))).intent
    assert intent is not None
    failed: list[BaseException] = []

    def backfill() -> None:
        try:
            migrate_mapping(store, _mapped(SoftDelete(), name), backfill=True)
        except BaseException as exc:  # (seen by the test's thread)
            failed.append(exc)

    thread = threading.Thread(target=backfill)
    with other.transaction() as writer:
        writer.apply(intent)  # the user's lock, its contract row and its mapped row: held to COMMIT
        thread.start()
        _wait_until_blocked(writer.conn, thread, failed)
    thread.join(timeout=60)
    rows = _rows(engine, name)
    other.dispose()
    store.dispose()
    engine.dispose()
    assert not thread.is_alive() and failed == []
    assert [row["email"] for row in rows] == ["new@example.com", "y@example.com"]


def _wait_until_blocked(conn: sa.Connection, thread: threading.Thread, failed: list[BaseException]) -> None:
    """Until the backfill waits on a lock ``conn``'s open transaction holds, as the server says: on PostgreSQL
    its blocking pids; MariaDB names none, so a statement of the backfill in progress that cannot end while
    the delivery is open (the user's lock row, before: the user's mapped row)."""
    if conn.dialect.name == "postgresql":
        me = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        waiting = sa.text("SELECT count(*) FROM pg_stat_activity WHERE :me = ANY(pg_blocking_pids(pid))")
    else:
        me = conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar_one()
        waiting = sa.text("SELECT count(*) FROM information_schema.processlist WHERE db = DATABASE() "
                          "AND id NOT IN (:me, CONNECTION_ID()) AND command = 'Query' "
                          "AND (info LIKE 'INSERT INTO clerk_sync_locks%' OR info LIKE 'UPDATE bf_wait%')")
    deadline = time.monotonic() + 30
    with conn.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as watcher:
        while not watcher.execute(waiting, {"me": me}).scalar_one():
            assert thread.is_alive(), f"the backfill ended without waiting for the delivery: {failed}"
            assert time.monotonic() < deadline, "the backfill never waited for the delivery"
            time.sleep(0.01)
