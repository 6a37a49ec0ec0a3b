"""Retention's hard deletion: a hard-deleted user came back on PostgreSQL and MariaDB (a guarded insert whose
snapshot predated the digest), and MySQL/MariaDB's 1451 is a row still referred to, not a missing parent."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
import structlog

from clerk_sync.config import DatabaseTimeouts, Settings
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.retention import Retention, RetentionPolicy
from clerk_sync.store import Store, create_engine
from clerk_sync.tables import users
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.conftest import SECRET
from tests.test_retention import deliver

SERVERS = [pytest.param("postgres", marks=pytest.mark.postgres), pytest.param("mariadb", marks=pytest.mark.mariadb)]
HARD = RetentionPolicy(delete_tombstones_after=timedelta(days=1))
PATIENT = DatabaseTimeouts(lock_s=120, statement_s=120, idle_in_transaction_s=0)  # the test decides the waits


def _clock(offset: timedelta) -> Callable[[], datetime]:
    return lambda: datetime.now(UTC) + offset


def _settled(passes: int = 1) -> Callable[[], datetime]:
    """The clock of a pass ``passes`` settle intervals on: it finds the digests of a pass now settled."""
    return _clock(passes * (HARD.digest_settle + timedelta(minutes=1)))


def _row(store: Store, clerk_id: str) -> str:
    """``live``, ``tombstone`` or ``gone``."""
    with store.connect() as conn:
        row = conn.execute(sa.select(users.c.deleted_at).where(users.c.clerk_id == clerk_id)).first()
    return "gone" if row is None else "live" if row.deleted_at is None else "tombstone"


def _deleted_days_ago(db_url: str, verifier: WebhookVerifier, *clerk_ids: str) -> dict[str, int]:
    """Users created and deleted three days ago (the store's clock stamps ``deleted_at``); their row ids."""
    past = Store(create_engine(db_url), now=_clock(-timedelta(days=3)))
    processor = WebhookProcessor(past, verifier)
    for clerk_id in clerk_ids:
        assert deliver(processor, f.envelope("user.created", f.user(clerk_id, 1000)), f"c_{clerk_id}") == "applied"
        assert deliver(processor, f.envelope("user.deleted", f.deleted("user", clerk_id)), f"d_{clerk_id}") == "applied"
    with past.connect() as conn:
        ids = dict(conn.execute(sa.select(users.c.clerk_id, users.c.id)).all())
    past.dispose()
    return {clerk_id: ids[clerk_id] for clerk_id in clerk_ids}


def _connection_id(conn: Any) -> int:
    """The server's id of a DBAPI connection (PostgreSQL's backend pid, MariaDB's thread id)."""
    raw = getattr(conn, "driver_connection", conn)
    return int(raw.thread_id()) if hasattr(raw, "thread_id") else int(raw.info.backend_pid)


class _Stall:
    """Where the test holds an insert: :meth:`held` says which connection is held there (None: none yet)."""

    def __init__(self, held: Callable[[], int | None], release: Callable[[], None]) -> None:
        self.held, self.release = held, release


@contextmanager
def _stalled_inserts(db_url: str, clerk_id: str) -> Iterator[_Stall]:
    """A trigger holding an insert of ``clerk_id`` into ``users`` once its statement read the digests (the guard,
    ``INSERT .. SELECT .. WHERE NOT EXISTS``) and before it meets the row it conflicts with, until released (the
    test's own trigger: it makes the window as wide as the test needs). Dropped at the end of the block, once the
    transactions that used it are over (dropping it waits for them)."""
    admin = sa.create_engine(db_url, isolation_level="AUTOCOMMIT")
    postgres = admin.dialect.name == "postgresql"
    name = f"stall_{uuid.uuid4().hex[:12]}"  # (advisory and named locks are the server's: the test's own)
    key = uuid.uuid4().int % (1 << 62)
    with admin.connect() as setup:
        if postgres:
            setup.exec_driver_sql(f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                                  f"PERFORM pg_advisory_xact_lock_shared({key}); RETURN NEW; END $$")
            setup.exec_driver_sql(f"CREATE TRIGGER {name} BEFORE INSERT ON users FOR EACH ROW "
                                  f"WHEN (NEW.clerk_id = '{clerk_id}') EXECUTE FUNCTION {name}()")
        else:
            setup.exec_driver_sql(f"CREATE TRIGGER {name} BEFORE INSERT ON users FOR EACH ROW BEGIN "
                                  f"IF NEW.clerk_id = '{clerk_id}' THEN DO GET_LOCK('{name}', 120); "
                                  f"DO RELEASE_LOCK('{name}'); END IF; END")
    with admin.connect() as holder:
        holder.exec_driver_sql(f"SELECT pg_advisory_lock({key})" if postgres else f"DO GET_LOCK('{name}', 0)")
        pid = _connection_id(holder.connection.dbapi_connection)
        params: dict[str, object]
        if postgres:
            waiting, params = "SELECT pid FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))", {"pid": pid}
        else:
            waiting = "SELECT id FROM information_schema.PROCESSLIST WHERE state = 'User lock' AND info LIKE :lock"
            params = {"lock": f"%{name}%"}
        released: list[bool] = []

        def held() -> int | None:
            with admin.connect() as look:
                return look.execute(sa.text(waiting), params).scalar()

        def release() -> None:
            if not released:
                holder.exec_driver_sql(f"SELECT pg_advisory_unlock({key})" if postgres
                                       else f"DO RELEASE_LOCK('{name}')")
                released.append(True)

        try:
            yield _Stall(held, release)
        finally:
            release()
    with admin.connect() as teardown:
        teardown.exec_driver_sql(f"DROP TRIGGER {name} ON users" if postgres else f"DROP TRIGGER {name}")
    admin.dispose()


class _HeldDelete:
    """Holds a transaction of ``engine`` that deleted from ``users`` open at its COMMIT until :meth:`release`."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.deleting: int | None = None  # the server's id of its connection, once it waits at COMMIT
        self.at_commit = threading.Event()
        self._go = threading.Event()
        sa.event.listen(engine, "before_cursor_execute", self._seen)
        sa.event.listen(engine, "commit", self._commit)

    def _seen(self, conn: sa.Connection, cursor: object, statement: str, *_: object) -> None:
        if statement.lstrip().upper().startswith("DELETE FROM USERS"):
            conn.info["deleted_users"] = True

    def _commit(self, conn: sa.Connection) -> None:
        if conn.info.pop("deleted_users", False):
            self.deleting = _connection_id(conn.connection.dbapi_connection)
            self.at_commit.set()
            self._go.wait(60)

    def release(self) -> None:
        self._go.set()

    def close(self) -> None:
        """Once the transaction is over (removing a listener while it runs is an error of its own)."""
        sa.event.remove(self.engine, "before_cursor_execute", self._seen)
        sa.event.remove(self.engine, "commit", self._commit)


def _until(condition: Callable[[], object], *alive: threading.Thread) -> None:
    deadline = time.monotonic() + 60  # (a bound on a broken run, not a race: each wait starts at once)
    while not condition():
        assert all(t.is_alive() for t in alive) and time.monotonic() < deadline, "never got there"
        time.sleep(0.02)


def _waits_for(engine: sa.Engine, waiter: int, holder: int) -> Callable[[], bool]:
    """Whether connection ``waiter`` waits for a row lock of connection ``holder``'s transaction."""
    sql = sa.text("SELECT :holder = ANY(pg_blocking_pids(:waiter))" if engine.dialect.name == "postgresql" else
                  "SELECT count(*) FROM information_schema.INNODB_TRX WHERE trx_mysql_thread_id = :waiter "
                  "AND trx_state = 'LOCK WAIT'")

    def waits() -> bool:
        with engine.connect() as conn:
            return bool(conn.execute(sql, {"waiter": waiter, "holder": holder}).scalar())
    return waits


@pytest.mark.parametrize("meets", ["its committed deletion", "its deletion's row lock"])
@pytest.mark.parametrize("db_url", SERVERS, indirect=True)
def test_a_guarded_insert_that_read_before_the_digest_does_not_bring_a_hard_deleted_user_back(
        db_url: str, verifier: WebhookVerifier, meets: str) -> None:
    """Fixed: a guarded insert (``INSERT .. SELECT .. WHERE NOT EXISTS`` a digest, then ``ON CONFLICT``)
    reads the digests on its snapshot, but meets the row it conflicts with as it is at that moment. One that read
    before the prune committed the digest, and reached the tombstone once the prune had deleted it (committed, or
    waiting on the DELETE's row lock until it was), found neither: the user was inserted again, live, on
    PostgreSQL and MariaDB (READ COMMITTED). A pass now writes the digests only; the rows go on a pass that finds
    their digests ``digest_settle`` old, when no writer can still read from before them."""
    _deleted_days_ago(db_url, verifier, "user_z")
    store = Store(create_engine(db_url, timeouts=PATIENT))
    processor = WebhookProcessor(store, verifier)
    statuses: list[str] = []
    reports: list[Any] = []
    failures: list[BaseException] = []

    def late_update() -> None:  # a user.updated Clerk sent before the deletion, retried late
        try:
            statuses.append(deliver(processor, f.envelope("user.updated", f.user("user_z", 2000)), "u_late"))
        except BaseException as exc:
            failures.append(exc)

    def prune() -> None:
        try:
            reports.append(Retention(store, HARD).prune())
        except BaseException as exc:
            failures.append(exc)

    writer, pruner = threading.Thread(target=late_update), threading.Thread(target=prune)
    held_delete = _HeldDelete(store.engine) if meets == "its deletion's row lock" else None
    with _stalled_inserts(db_url, "user_z") as stall:
        try:
            writer.start()
            _until(stall.held, writer)  # its guard has read the digests: none yet
            inserting = stall.held()
            assert inserting is not None
            pruner.start()
            _until(lambda: not pruner.is_alive() or (held_delete is not None and held_delete.at_commit.is_set()))
            stall.release()  # the insert goes on, to the row it conflicts with
            if held_delete is not None and held_delete.deleting is not None:  # (before the fix: the prune deleted)
                _until(_waits_for(store.engine, inserting, held_delete.deleting), writer)  # it waits on that row's lock
        finally:
            if held_delete is not None:
                held_delete.release()
            pruner.join(60)
            writer.join(60)
            if held_delete is not None:
                held_delete.close()
    assert failures == [] and not writer.is_alive() and not pruner.is_alive()
    assert (statuses, _row(store, "user_z")) == (["skipped"], "tombstone"), "a hard-deleted user came back"
    assert (reports[0].erased, reports[0].settling) == (0, 1)  # its digest written, the row left to a later pass
    assert "1 more on a later pass" in reports[0].summary()

    # A pass that finds the digest settled deletes the row; from then on the digest alone keeps the user out.
    assert Retention(store, HARD, now=_settled()).prune().erased == 1
    assert deliver(processor, f.envelope("user.updated", f.user("user_z", 3000)), "u_later") == "skipped"
    assert _row(store, "user_z") == "gone"
    store.dispose()


def test_a_pass_deletes_only_rows_whose_digests_settled(db_url: str, verifier: WebhookVerifier) -> None:
    """The rows of digests written by this pass (or a pass moments ago) wait; those of digests older than
    ``digest_settle`` go, and a late event for them is skipped all along (tombstone, then digest)."""
    _deleted_days_ago(db_url, verifier, "user_a")
    store = Store.from_url(db_url)
    processor = WebhookProcessor(store, verifier)
    first = Retention(store, HARD).prune()
    assert (first.erased, first.settling) == (0, 1)
    _deleted_days_ago(db_url, verifier, "user_b")
    early = Retention(store, HARD, now=_clock(HARD.digest_settle / 2)).prune()  # user_a's digest: too young yet
    assert (early.erased, early.settling) == (0, 2)
    assert [_row(store, u) for u in ("user_a", "user_b")] == ["tombstone", "tombstone"]
    assert deliver(processor, f.envelope("user.updated", f.user("user_a", 2000)), "u_a1") == "skipped"
    later = Retention(store, HARD, now=_settled()).prune()  # both digests settled by then
    assert (later.erased, later.settling) == (2, 0)
    assert [_row(store, u) for u in ("user_a", "user_b")] == ["gone", "gone"]
    assert deliver(processor, f.envelope("user.updated", f.user("user_a", 3000)), "u_a2") == "skipped"
    assert _row(store, "user_a") == "gone"
    store.dispose()


def _delete_statements(engine: sa.Engine) -> tuple[list[str], Callable[[], None]]:
    seen: list[str] = []

    def spy(conn: object, cursor: object, statement: str, *args: object) -> None:
        if statement.lstrip().upper().startswith("DELETE FROM USERS"):
            seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", spy)
    return seen, lambda: sa.event.remove(engine, "before_cursor_execute", spy)


def test_a_tombstone_an_apps_foreign_key_keeps_is_told_on_the_pass_that_tries_it_and_tried_once_a_batch_after(
        db_url: str, verifier: WebhookVerifier) -> None:
    """With passes a digest apart (as in production: the first pass writes the digests), the first pass that
    tries a row an app's table refers to (``orders.user_id REFERENCES users(id)``: MariaDB's 1451) keeps it and
    says so, deletes the others of its batch, and later passes try it once a batch, quietly; once the app's row
    is gone, so is the tombstone."""
    ids = _deleted_days_ago(db_url, verifier, "user_a", "user_b", "user_c")
    store = Store.from_url(db_url)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id BIGINT REFERENCES users (id))")
        conn.execute(sa.text("INSERT INTO orders (id, user_id) VALUES (1, :a)"), {"a": ids["user_b"]})
    assert Retention(store, HARD).prune().settling == 3

    with structlog.testing.capture_logs() as logs:
        report = Retention(store, HARD, now=_settled()).prune()
    assert (report.erased, report.settling) == (2, 0)
    assert [_row(store, u) for u in ("user_a", "user_b", "user_c")] == ["gone", "tombstone", "gone"]
    (said,) = [line for line in logs if "kept" in line["event"]]
    assert (said["event"], said["rows"], said["log_level"]) == ("tombstones_kept", 1, "warning")
    assert "foreign key" in said["reason"].lower() and "ON DELETE" in said["fix"]

    deletes, stop = _delete_statements(store.engine)
    try:
        with structlog.testing.capture_logs() as logs:
            assert Retention(store, HARD, now=_settled(2)).prune().erased == 0
    finally:
        stop()
    assert len(deletes) == 1, deletes  # kept on the pass before: one try for the batch, no error
    assert [(line["event"], line["rows"]) for line in logs if "kept" in line["event"]] == [("tombstones_still_kept", 1)]
    processor = WebhookProcessor(store, verifier)
    assert deliver(processor, f.envelope("user.updated", f.user("user_b", 2000)), "u_b") == "skipped"

    with store.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM orders")
    assert Retention(store, HARD, now=_settled(3)).prune().erased == 1
    assert _row(store, "user_b") == "gone"
    assert deliver(processor, f.envelope("user.updated", f.user("user_b", 3000)), "u_b2") == "skipped"
    assert _row(store, "user_b") == "gone"
    store.dispose()


def test_a_row_still_referred_to_is_told_from_a_missing_parent(db_url: str, verifier: WebhookVerifier) -> None:
    """``is_foreign_key_violation`` (a missing parent: mapped rows retried while it may still arrive) did not know
    MySQL/MariaDB's 1451, "cannot delete or update a parent row", so retention read it itself. It is another
    refusal, a row another table still refers to (waiting never heals it): ``is_row_referenced``. PostgreSQL
    (23503) and SQLite say the same for both; there the statement tells them apart."""
    from clerk_sync._db_errors import is_foreign_key_violation, is_row_referenced

    ids = _deleted_days_ago(db_url, verifier, "user_p")
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id BIGINT REFERENCES users (id))")
        conn.execute(sa.text("INSERT INTO orders (id, user_id) VALUES (1, :p)"), {"p": ids["user_p"]})

    def refusal(sql: str, **params: object) -> Any:
        with pytest.raises(sa.exc.IntegrityError) as caught, engine.begin() as conn:
            conn.execute(sa.text(sql), params)
        return caught.value.orig

    missing_parent = refusal("INSERT INTO orders (id, user_id) VALUES (2, :u)", u=ids["user_p"] + 1000)
    referenced = refusal("DELETE FROM users WHERE id = :u", u=ids["user_p"])
    assert is_foreign_key_violation(missing_parent) and is_row_referenced(referenced)
    if engine.dialect.name in ("mysql", "mariadb"):  # the error number says which side
        assert (missing_parent.args[0], referenced.args[0]) == (1452, 1451)
        assert not is_row_referenced(missing_parent) and not is_foreign_key_violation(referenced)
    engine.dispose()


def test_the_digest_settle_is_positive_and_covers_the_database_bounds() -> None:
    """A row deleted with its digest (no settle) is the race above again; the settings' bounds on a statement and
    an idle transaction lengthen it (a writer's read lives that long), never shorten it."""
    with pytest.raises(ValueError, match="digest_settle"):
        RetentionPolicy(digest_settle=timedelta(0))

    def settle(**env: str) -> timedelta:
        settings = Settings.from_env({"DATABASE_URL": "sqlite://", "CLERK_WEBHOOK_SIGNING_SECRET": SECRET, **env})
        return RetentionPolicy.from_settings(settings).digest_settle

    assert settle() == RetentionPolicy().digest_settle == timedelta(minutes=15)
    assert settle(CLERK_SYNC_DB_STATEMENT_TIMEOUT_S="0", CLERK_SYNC_DB_IDLE_IN_TRANSACTION_TIMEOUT_S="0") \
        == timedelta(minutes=15)
    assert settle(CLERK_SYNC_DB_STATEMENT_TIMEOUT_S="600", CLERK_SYNC_DB_IDLE_IN_TRANSACTION_TIMEOUT_S="60") \
        == timedelta(seconds=4 * (2 * 600 + 60))


@pytest.mark.parametrize("batch", [500, 1])
def test_a_dry_run_counts_the_tombstone_rows_a_pass_would_erase_and_those_left_settling(
        db_url: str, verifier: WebhookVerifier, batch: int) -> None:
    """Fixed: the dry run counted every due tombstone as "would erase", though a pass deletes only rows
    whose digests settled (the first pass writes them: all settling), and never filled ``settling``. It now says
    what the pass right after it does, on the first pass and on one after the settle time."""
    _deleted_days_ago(db_url, verifier, "user_a", "user_b")
    store = Store.from_url(db_url)
    policy = RetentionPolicy(delete_tombstones_after=timedelta(days=1), batch=batch)
    for clock, expected in ((_clock(timedelta(0)), (0, 2)), (_settled(), (2, 0))):
        dry = Retention(store, policy, now=clock).prune(dry_run=True)
        assert (dry.erased, dry.settling) == expected
        assert "(2 more on a later pass" in dry.summary() if expected == (0, 2) else "later pass" not in dry.summary()
        real = Retention(store, policy, now=clock).prune()
        assert (real.erased, real.settling) == (dry.erased, dry.settling)
    assert [_row(store, u) for u in ("user_a", "user_b")] == ["gone", "gone"]
    store.dispose()
