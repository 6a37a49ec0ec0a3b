"""The mapped table's unique Clerk-id index, built CONCURRENTLY: ``migrate`` built the Clerk-id column's unique index
with a plain ``CREATE UNIQUE INDEX`` in a transaction, whose SHARE lock on PostgreSQL blocks every write
to the app's table for the whole build. ``migrate_mapping`` (every face's ``migrate``) builds it
CONCURRENTLY now: writes go on, a failed build leaves no INVALID index, one left from before is rebuilt."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync.cli.hooks import migrate_mapping
from clerk_sync.config import DatabaseTimeouts
from clerk_sync.errors import StoreDataError, StoreError
from clerk_sync.mapping import MappedTable, SchemaMapping, check_schema, migrate_schema
from clerk_sync.store import Store
from tests.conftest import _PG_PROBLEM, PG_URL, pg_schema_url, require_server

pytestmark = pytest.mark.postgres


class App:
    """A private schema holding one app table (a unique name: other tests look for theirs in
    pg_stat_activity too), its mapping, and a plain engine with no bounds (the app's own connections)."""

    def __init__(self, schema: str) -> None:
        self.url = pg_schema_url(schema)
        self.table = f"r3m_{uuid.uuid4().hex[:8]}"
        self.index = f"uq_{self.table}_clerk_user_id"
        self.mapping = SchemaMapping(users=MappedTable(self.table, "clerk_user_id", {"email": "email"}))
        self.engine = sa.create_engine(self.url)
        self.t = sa.table(self.table, sa.column("id"), sa.column("email"), sa.column("clerk_user_id"))
        with self.engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE TABLE {self.table} (id serial PRIMARY KEY, email text, "
                                 "clerk_user_id varchar(64), deleted_at timestamptz)")

    def store(self, lock_s: float = 30.0) -> Store:
        return Store.from_url(self.url, timeouts=DatabaseTimeouts(lock_s=lock_s))

    def insert(self, conn: sa.Connection, clerk_id: str | None) -> None:
        conn.execute(self.t.insert().values(email="a@example.com", clerk_user_id=clerk_id))

    def indexes(self) -> list[tuple[str, bool]]:
        """The table's indexes but its primary key, with whether each is valid (``indisvalid``)."""
        with self.engine.connect() as conn:
            return [(r[0], r[1]) for r in conn.execute(sa.text(
                "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE i.indrelid = to_regclass(:t) AND NOT i.indisprimary ORDER BY 1"), {"t": self.table})]

    def doctor(self) -> list[tuple[str, str]]:
        with self.engine.connect() as conn:
            return check_schema(conn, self.mapping)

    def leave_an_invalid_index(self) -> None:
        """What an interrupted or failed CONCURRENTLY build leaves: here one refused for duplicates, which
        are then removed (the index stays INVALID)."""
        with self.engine.begin() as conn:
            self.insert(conn, "user_dup")
            self.insert(conn, "user_dup")
        with self.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            with pytest.raises(sa.exc.IntegrityError):
                conn.exec_driver_sql(f"CREATE UNIQUE INDEX CONCURRENTLY {self.index} ON {self.table} (clerk_user_id)")
        with self.engine.begin() as conn:
            conn.execute(self.t.delete().where(self.t.c.id == sa.select(sa.func.max(self.t.c.id)).scalar_subquery()))
        assert self.indexes() == [(self.index, False)]


@pytest.fixture
def app() -> Iterator[App]:
    require_server("PostgreSQL", PG_URL, _PG_PROBLEM, "CLERK_SYNC_REQUIRE_POSTGRES")
    schema = f"r3_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    made = App(schema)
    try:
        yield made
    finally:
        made.engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


def _in_thread(store: Store, mapping: SchemaMapping) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["lines"] = migrate_mapping(store, mapping).lines
        except Exception as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _wait_for_index_build_waiting(app: App, timeout_s: float = 20.0) -> None:
    """Until a CREATE UNIQUE INDEX on the app's table waits for a lock (the open transaction's)."""
    deadline = time.monotonic() + timeout_s
    with app.engine.connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = "
                "'Lock' AND query ILIKE 'CREATE UNIQUE INDEX%' AND query LIKE '%' || :t || '%'"),
                {"t": app.table}).scalar_one()
            conn.rollback()
            if waiting:
                return
            time.sleep(0.05)
    raise AssertionError(f"no CREATE UNIQUE INDEX on {app.table} waited for a lock within {timeout_s} s")


def test_the_app_table_takes_inserts_while_its_unique_index_is_built(app: App) -> None:
    """Fixed: a plain CREATE UNIQUE INDEX asks for a SHARE lock, which queues behind an open
    writer and makes every INSERT after it queue too: the app's users table stopped taking writes for the
    whole build. Built CONCURRENTLY, it waits for the open transaction while a third connection inserts."""
    store = app.store()
    holder = app.engine.connect()
    app.insert(holder, "user_open")  # a transaction open on the table: the build must wait for it
    thread, out = _in_thread(store, app.mapping)
    try:
        _wait_for_index_build_waiting(app)
        with app.engine.connect() as writer:
            writer.exec_driver_sql("SET lock_timeout = '3s'")  # the old build's SHARE lock: refused after 3 s
            app.insert(writer, "user_new")
            writer.commit()
        assert thread.is_alive()  # still waiting for the holder: the insert did not wait for it
        holder.commit()
        thread.join(30)
        assert out == {"lines": [f"mapping: created unique index {app.index}"]}
        assert app.indexes() == [(app.index, True)]
        assert app.doctor() == []
    finally:
        holder.close()
        thread.join(35)
        store.dispose()


def test_duplicate_clerk_ids_fail_clearly_and_leave_no_invalid_index(app: App) -> None:
    """Two rows with one Clerk id: the build fails (CONCURRENTLY leaves an INVALID index behind, dropped
    here), and the error names the column, how many ids, the query that finds them and what to do."""
    with app.engine.begin() as conn:
        for clerk_id in ("user_dup", "user_dup", "user_ok", None, None):
            app.insert(conn, clerk_id)
    store = app.store()
    try:
        with pytest.raises(StoreDataError) as err:
            migrate_mapping(store, app.mapping)
        message = str(err.value)
        assert message.startswith(f"{app.table}.clerk_user_id: building its unique index {app.index}")
        assert "1 Clerk id(s) are held by several rows; the INVALID index it left was dropped" in message
        find = f"SELECT clerk_user_id, count(*) FROM {app.table} WHERE clerk_user_id IS NOT NULL "  # noqa: S608
        assert find + "GROUP BY clerk_user_id HAVING count(*) > 1" in message
        assert message.endswith("then run migrate again")
        assert app.indexes() == []
        assert ("fail", f"{app.table}.clerk_user_id has no unique index: run `clerk-sync migrate --mapping ...`"
                ) in app.doctor()
        with app.engine.begin() as conn:
            conn.execute(app.t.update().where(app.t.c.id == 2).values(clerk_user_id=None))
        assert migrate_mapping(store, app.mapping).lines == [f"mapping: created unique index {app.index}"]
        assert app.indexes() == [(app.index, True)]
    finally:
        store.dispose()


@pytest.mark.parametrize("path", ["migrate_mapping", "migrate_schema"])
def test_an_invalid_index_from_before_is_rebuilt_not_taken_as_present(app: App, path: str) -> None:
    """An INVALID index (an interrupted build's) enforces nothing reliably and ON CONFLICT ignores it: the
    doctor says the column has no unique index, and either migrate path drops it and builds it again."""
    app.leave_an_invalid_index()
    assert ("fail", f"{app.table}.clerk_user_id has no unique index: run `clerk-sync migrate --mapping ...`"
            ) in app.doctor()
    expected = [f"dropped invalid index {app.index} (a build that failed or was interrupted)",
                f"created unique index {app.index}"]
    store = app.store()
    try:
        if path == "migrate_mapping":
            assert migrate_mapping(store, app.mapping).lines == [f"mapping: {line}" for line in expected]
        else:  # the in-transaction path (an app's own Alembic migration calls it)
            with store.engine.begin() as conn:
                assert migrate_schema(conn, app.mapping) == expected
        assert app.indexes() == [(app.index, True)]
        assert app.doctor() == []
    finally:
        store.dispose()


def test_a_second_migrate_does_nothing_and_the_pool_keeps_its_bounds(app: App) -> None:
    """Idempotent; and the session whose statement bound was lifted for the build never returns to the
    pool: the store's connections still carry the service's 15 s."""
    with app.engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE {app.table} DROP COLUMN clerk_user_id")
    store = app.store()
    try:
        assert migrate_mapping(store, app.mapping).lines == [f"mapping: added {app.table}.clerk_user_id",
                                                       f"mapping: created unique index {app.index}"]
        assert migrate_mapping(store, app.mapping).lines == ["mapping: mapped tables already have what the mapping needs"]
        assert app.indexes() == [(app.index, True)]
        for _ in range(3):  # whichever pooled connection comes out
            with store.engine.connect() as conn:
                assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "15s"
    finally:
        store.dispose()


def test_the_lock_bound_holds_and_the_next_run_cleans_up(app: App) -> None:
    """The build keeps the store's lock bound: a transaction open longer fails it, saying why and what to
    do; what it left (the drop waits for the same transaction) the next run drops and builds again."""
    store = app.store(lock_s=0.5)
    holder = app.engine.connect()
    app.insert(holder, "user_open")
    try:
        with pytest.raises(StoreError) as err:
            migrate_mapping(store, app.mapping)
        message = str(err.value)
        assert f"{app.table}.clerk_user_id: building its unique index {app.index} (CONCURRENTLY) failed" in message
        assert "waited longer than lock_timeout" in message and "CLERK_SYNC_DB_LOCK_TIMEOUT_S" in message
        assert "the INVALID index it left is still there (the next migrate drops it and builds again)" in message
        holder.rollback()
        assert migrate_mapping(store, app.mapping).lines == [
            f"mapping: dropped invalid index {app.index} (a build that failed or was interrupted)",
            f"mapping: created unique index {app.index}"]
        assert app.indexes() == [(app.index, True)]
    finally:
        holder.close()
        store.dispose()


def test_an_apps_own_index_under_the_name_is_never_dropped(app: App) -> None:
    """Fixed: a failed build dropped whatever carried the index's name (the app's own index on the
    table, or one of another schema on the search path). A name taken by something that is not an INVALID
    index of this table is refused before building, and nothing is dropped."""
    with app.engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE INDEX {app.index} ON {app.table} (email)")  # the app's, not unique
    store = app.store(lock_s=0.5)
    try:
        with pytest.raises(StoreError, match=f"something else is named {app.index} already"):
            migrate_mapping(store, app.mapping)
        assert app.indexes() == [(app.index, True)]
    finally:
        store.dispose()


def test_a_long_table_names_invalid_index_is_found_and_rebuilt(app: App) -> None:
    """Fixed: PostgreSQL cuts names to 63 bytes; the lookup compared the full name, so an INVALID
    index of a long-named table was "something else" and migrate stayed stuck for good."""
    long = App.__new__(App)
    long.url, long.engine = app.url, app.engine
    long.table = f"{app.table}_organization_memberships_of_the_application"
    long.index = f"uq_{long.table}_clerk_user_id"[:63]
    long.mapping = SchemaMapping(users=MappedTable(long.table, "clerk_user_id", {"email": "email"}))
    long.t = sa.table(long.table, sa.column("id"), sa.column("email"), sa.column("clerk_user_id"))
    with app.engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {long.table} (id serial PRIMARY KEY, email text, "
                             "clerk_user_id varchar(64), deleted_at timestamptz)")
    long.leave_an_invalid_index()
    store = long.store()
    try:
        lines = migrate_mapping(store, long.mapping).lines
        assert lines[-1] == f"mapping: created unique index {long.index}", lines
        assert long.indexes() == [(long.index, True)]
    finally:
        store.dispose()


def test_waiting_for_another_replicas_build_is_bounded_and_names_it(app: App) -> None:
    """Fixed: a replica polled for the other's turn for ever (a stuck migrate, a pooled session
    keeping the lock). It waits ``wait_s``, then says which session holds the turn."""
    from clerk_sync.mapping import _INDEX_LOCK, build_unique_indexes_concurrently

    holder = app.engine.connect()
    pid = holder.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    holder.execute(sa.select(sa.func.pg_advisory_lock(_INDEX_LOCK)))
    store = app.store()
    try:
        with pytest.raises(StoreError, match=f"another session building the mapped tables' indexes \\(pid {pid}\\)"):
            build_unique_indexes_concurrently(store.engine, app.mapping, wait_s=0.5)
        assert app.indexes() == []
    finally:
        holder.execute(sa.select(sa.func.pg_advisory_unlock(_INDEX_LOCK)))
        holder.close()
        store.dispose()
