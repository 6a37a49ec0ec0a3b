"""What is particular to MariaDB/MySQL: collation, 4-byte UTF-8, strict mode, and waits that end in a
retryable error (deadlock, lock timeout) rather than a hang. The shared suite (convergence, crash
safety, concurrency, migrations, bad input) runs on MariaDB through the ``db_url`` fixture."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC

import pytest
import sqlalchemy as sa

from clerk_sync import migrations
from clerk_sync._db_errors import is_lock_wait_timeout
from clerk_sync.config import DatabaseTimeouts
from clerk_sync.errors import StoreDataError, StoreError
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.store import Store, create_engine
from clerk_sync.tables import users
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.conftest import mysql_database

pytestmark = pytest.mark.mariadb


@pytest.fixture
def maria_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A migrated MariaDB database (the ``db_url`` fixture's, without the other stores)."""
    with mysql_database() as url:
        engine = create_engine(url)
        migrations.upgrade(engine)
        engine.dispose()
        yield url


def _user(store: Store, clerk_id: str) -> sa.Row[tuple[str, str | None, str | None]] | None:
    with store.connect() as conn:
        return conn.execute(sa.select(users.c.clerk_id, users.c.first_name, users.c.email)
                            .where(users.c.clerk_id == clerk_id)).first()


def test_clerk_ids_differing_in_case_are_two_users(maria_url: str, verifier: WebhookVerifier) -> None:
    store = Store.from_url(maria_url)
    processor = WebhookProcessor(store, verifier)
    try:
        for i, clerk_id in enumerate(("user_2aBc", "user_2AbC")):
            out = processor.process(*f.signed(f.envelope("user.created", f.user(clerk_id, 1000, first_name=f"n{i}")),
                                              f"msg_case_{i}"))
            assert out.status == "applied"
        assert _user(store, "user_2aBc")[1] == "n0"  # type: ignore[index]
        assert _user(store, "user_2AbC")[1] == "n1"  # type: ignore[index]
    finally:
        store.dispose()


def test_four_byte_characters_round_trip(maria_url: str, verifier: WebhookVerifier) -> None:
    store = Store.from_url(maria_url)
    processor = WebhookProcessor(store, verifier)
    try:
        name = "Zoë 🦄 \U0001d504da"  # a unicorn and a Fraktur A: 4-byte UTF-8
        out = processor.process(*f.signed(f.envelope("user.created", f.user("user_emoji", 1000, first_name=name)),
                                          "msg_emoji"))
        assert out.status == "applied"
        assert _user(store, "user_emoji")[1] == name  # type: ignore[index]
    finally:
        store.dispose()


def test_tables_are_utf8mb4_bin_whatever_the_database_default() -> None:
    with mysql_database() as url:
        engine = create_engine(url)
        with engine.begin() as conn:  # an app's database created with an old default
            conn.exec_driver_sql(f"ALTER DATABASE `{engine.url.database}` CHARACTER SET latin1 COLLATE latin1_swedish_ci")
        migrations.upgrade(engine)
        with engine.connect() as conn:
            collations = set(conn.execute(sa.text(
                "SELECT DISTINCT table_collation FROM information_schema.tables WHERE table_schema = DATABASE() "
                "AND table_name NOT IN ('alembic_version', 'clerk_sync_alembic_version')")).scalars())
            columns = set(conn.execute(sa.text(
                "SELECT DISTINCT collation_name FROM information_schema.columns WHERE table_schema = DATABASE() "
                "AND collation_name IS NOT NULL AND table_name NOT IN ('alembic_version', 'clerk_sync_alembic_version')")).scalars())
        engine.dispose()
    assert collations == {"utf8mb4_bin"}
    assert columns <= {"utf8mb4_bin"}, columns  # JSON columns are longtext utf8mb4_bin too


def test_strict_mode_refuses_instead_of_truncating(maria_url: str) -> None:
    store = Store.from_url(maria_url)
    try:
        with pytest.raises(StoreDataError, match="Data too long"), store.transaction() as w:
            w.conn.execute(users.insert().values(clerk_id="user_long", first_name="x" * 300, email_addresses=[],
                                                 public_metadata={}, private_metadata={}, unsafe_metadata={},
                                                 clerk_updated_at=1, created_at=w.now, updated_at=w.now))
        assert _user(store, "user_long") is None
    finally:
        store.dispose()


def test_duplicate_key_errors_do_not_carry_the_value(maria_url: str) -> None:
    store = Store.from_url(maria_url)
    row = {"email_addresses": [], "public_metadata": {}, "private_metadata": {}, "unsafe_metadata": {},
           "clerk_updated_at": 1}
    try:
        insert = users.insert().values(clerk_id="user_secret@example.com", **row)
        with store.transaction() as w:
            w.conn.execute(insert.values(created_at=w.now, updated_at=w.now))
        with pytest.raises(StoreError) as caught, store.transaction() as w:
            w.conn.execute(insert.values(created_at=w.now, updated_at=w.now))
        assert "secret" not in str(caught.value) and "Duplicate entry" in str(caught.value)
    finally:
        store.dispose()


def _two_writers(url: str, first: list[str], second: list[str], *, lock_s: float) -> list[BaseException | None]:
    """Two transactions that each lock their first key, meet, then lock their second key."""
    stores = [Store(create_engine(url, timeouts=DatabaseTimeouts(lock_s=lock_s))) for _ in range(2)]
    met = threading.Barrier(2, timeout=30)
    results: list[BaseException | None] = [None, None]

    def work(i: int, keys: list[str]) -> None:
        try:
            with stores[i].transaction() as w:
                w.lock(keys[:1])
                met.wait()
                w.lock(keys[1:])
        except BaseException as exc:  # the outcome is the assertion
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i, keys)) for i, keys in enumerate((first, second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for s in stores:
        s.dispose()
    return results


def test_a_deadlock_is_a_retryable_store_error(maria_url: str) -> None:
    a, b = f"user:{uuid.uuid4().hex}", f"org:{uuid.uuid4().hex}"
    results = _two_writers(maria_url, [a, b], [b, a], lock_s=30)
    failed = [r for r in results if r is not None]
    assert len(failed) == 1, results  # InnoDB picks one victim; the other commits
    assert isinstance(failed[0], StoreError) and not isinstance(failed[0], StoreDataError)
    assert "deadlock" in str(failed[0]) and "retry later" in str(failed[0])


def test_a_lock_held_elsewhere_ends_in_a_timeout_not_a_hang(maria_url: str) -> None:
    key = f"user:{uuid.uuid4().hex}"
    holder = Store(create_engine(maria_url))
    waiter = Store(create_engine(maria_url, timeouts=DatabaseTimeouts(lock_s=1)))
    try:
        with holder.transaction() as held:
            held.lock([key])
            with pytest.raises(StoreError, match="innodb_lock_wait_timeout"), waiter.transaction() as w:
                w.lock([key])
    finally:
        holder.dispose()
        waiter.dispose()


def test_database_messages_never_quote_the_value() -> None:
    from clerk_sync.errors import database_message

    dup = Exception(1062, "Duplicate entry 'o'brien.secret@example.com' for key 'uq_accounts_email'")
    bad = Exception(1366, "Incorrect string value: '\\xF0\\x9F' for column `t`.`users`.`first_name` at row 1")
    assert database_message(dup) == "(1062, \"Duplicate entry '…' for key 'uq_accounts_email'\")"
    assert "secret" not in database_message(dup) and "brien" not in database_message(dup)
    assert "xF0" not in database_message(bad) and "first_name" in database_message(bad)


def test_an_aware_timestamp_is_stored_in_utc(maria_url: str) -> None:
    from datetime import datetime, timedelta, timezone

    from clerk_sync.tables import revoked_sessions

    store = Store.from_url(maria_url)
    at = datetime(2026, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    try:
        with store.transaction() as w:
            w.conn.execute(revoked_sessions.insert().values(session_id="sess_tz", reason="revoked", revoked_at=at))
        with store.connect() as conn:
            stored = conn.execute(sa.select(revoked_sessions.c.revoked_at)).scalar_one()
            newer = conn.execute(sa.select(sa.func.count()).select_from(revoked_sessions)
                                 .where(revoked_sessions.c.revoked_at >= datetime(2026, 1, 1, 10, 30, tzinfo=UTC)))
        assert stored == datetime(2026, 1, 1, 10, 0)  # naive UTC, as SQLite gives it back
        assert newer.scalar_one() == 0
    finally:
        store.dispose()


def test_an_entity_held_elsewhere_costs_its_batch_mates_two_seconds_not_the_lock_wait(maria_url: str) -> None:
    """Review finding: the batch's lock pass waited the configured lock wait (here 10 s) for each held entity
    before its batch-mates went alone (PostgreSQL's batch waits 50 ms). It waits at most 2 s now, and
    the connection's own bound is restored after it."""
    import time

    from clerk_sync.events import parse_envelope
    from clerk_sync.integrations._committer import ALONE, GroupCommitter

    store = Store(create_engine(maria_url, timeouts=DatabaseTimeouts(lock_s=10)))
    holder = Store(create_engine(maria_url))
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    committer = GroupCommitter(processor)
    batch = [("msg_held", parse_envelope(f.body_of(f.envelope("user.updated", f.user("user_h2", 2))))),
             ("msg_free", parse_envelope(f.body_of(f.envelope("user.created", f.user("user_f2", 2)))))]
    try:
        with holder.transaction() as held:
            held.lock(["user:user_h2"])
            started = time.monotonic()
            assert committer.write(batch) == [ALONE, ALONE]  # type: ignore[arg-type]
            waited = time.monotonic() - started
        assert waited < 6, waited  # the two seconds' bound (and the work), not the configured ten
        with store.connect() as conn:
            assert conn.exec_driver_sql("SELECT @@SESSION.innodb_lock_wait_timeout").scalar() == 10
    finally:
        store.dispose()
        holder.dispose()


def test_a_lock_pass_that_fails_otherwise_restores_the_lock_wait_and_keeps_its_error(
        maria_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review suspicion: the lock pass restored the connection's lock wait in a ``finally`` that ran only
    when the connection was valid, and a failing restore replaced the pass's own error. A failure other
    than a lock wait (a bug, here) now keeps its error, and the pooled connection its configured bound."""
    from clerk_sync.events import parse_envelope
    from clerk_sync.integrations._committer import GroupCommitter
    from clerk_sync.store import Writer

    store = Store(create_engine(maria_url, timeouts=DatabaseTimeouts(lock_s=10), pool_size=1, max_overflow=0))
    committer = GroupCommitter(WebhookProcessor(store, WebhookVerifier([f.SECRET])), writers=1)

    def broken(self: Writer, intents: object, extra: object = ()) -> None:
        raise RuntimeError("lock pass bug")

    monkeypatch.setattr(Writer, "lock_entities", broken)
    batch = [("msg_bug", parse_envelope(f.body_of(f.envelope("user.created", f.user("user_bug", 2)))))]
    try:
        with pytest.raises(RuntimeError, match="lock pass bug"):
            committer._attempt(batch, pipelined=False)
        with store.connect() as conn:  # the pool's one connection: the one the pass used
            assert conn.exec_driver_sql("SELECT @@SESSION.innodb_lock_wait_timeout").scalar() == 10

        def spoiled(self: Writer, intents: object, extra: object = ()) -> None:  # and the restore fails too
            self.conn.exec_driver_sql("SET @clerk_sync_lock_wait = 'not a number'")
            raise RuntimeError("lock pass bug")

        monkeypatch.setattr(Writer, "lock_entities", spoiled)
        with pytest.raises(RuntimeError, match="lock pass bug"):  # not the restore's error
            committer._attempt(batch, pipelined=False)
    finally:
        store.dispose()


def test_an_entity_held_by_another_transaction_does_not_fail_its_batch_mates(maria_url: str) -> None:
    """A batch takes the lock rows of all its entities first: one held by another replica's transaction
    timed the whole batch out, every batch-mate answered 503. Now each goes alone, in its own transaction."""
    from clerk_sync.events import parse_envelope
    from clerk_sync.integrations._committer import ALONE, GroupCommitter

    store = Store(create_engine(maria_url, timeouts=DatabaseTimeouts(lock_s=1)))
    holder = Store(create_engine(maria_url))
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    committer = GroupCommitter(processor)

    def parsed(event: dict[str, object]) -> object:
        return parse_envelope(f.body_of(event))

    try:
        committer.write([("msg_seed", parsed(f.envelope("user.created", f.user("user_held", 1))))])  # type: ignore[list-item]
        batch = [("msg_held", parsed(f.envelope("user.updated", f.user("user_held", 2)))),
                 ("msg_free", parsed(f.envelope("user.created", f.user("user_free", 2)))),
                 ("msg_org", parsed(f.envelope("organization.created", f.organization("org_free", 2))))]
        with holder.transaction() as held:
            held.lock(["user:user_held"])
            assert committer.write(batch) == [ALONE] * 3  # type: ignore[arg-type]
            # alone, a user's upsert needs no lock row (its own row lock orders it): none waits
            assert [processor.apply_alone(*job).status for job in batch] == ["applied"] * 3  # type: ignore[arg-type]
    finally:
        store.dispose()
        holder.dispose()


def test_the_mapped_clerk_id_column_tells_ids_that_differ_only_in_case_apart(maria_url: str) -> None:
    """Review finding: ``migrate --mapping`` added the Clerk-id column in the table's collation, on this
    server case-insensitive: ``user_2aBc``'s row took ``user_2abc``'s e-mail and then its deletion. The column
    is added with a binary collation, and ``doctor`` warns of one that compares without regard to case."""
    from clerk_sync.mapping import HardDelete, MappedTable, SchemaMapping, SoftDelete, check_schema, migrate_schema

    engine = sa.create_engine(maria_url)
    meta = sa.MetaData()
    sa.Table("ci_accounts", meta, sa.Column("id", sa.Integer, primary_key=True), sa.Column("email", sa.String(320)),
             mysql_collate="utf8mb4_general_ci", mysql_charset="utf8mb4")
    sa.Table("ci_legacy", meta, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("email", sa.String(320)),
             mysql_collate="utf8mb4_general_ci", mysql_charset="utf8mb4")
    meta.create_all(engine)
    mapping = SchemaMapping(users=MappedTable("ci_accounts", "clerk_user_id", {"email": "email"},
                                              on_delete=SoftDelete("deleted_at")))
    with engine.begin() as conn:
        migrate_schema(conn, mapping)
        assert check_schema(conn, mapping) == []
        legacy = check_schema(conn, SchemaMapping(users=MappedTable("ci_legacy", "clerk_user_id", {"email": "email"},
                                                                    on_delete=HardDelete())))
    assert [severity for severity, _ in legacy] == ["warn"] and "utf8mb4_general_ci" in legacy[0][1], legacy
    assert "MODIFY clerk_user_id varchar(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin (" in legacy[0][1]
    store = Store.from_url(maria_url, mapping=mapping)
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    for n, event in enumerate([f.envelope("user.created", f.user("user_2aBc", 1, email="upper@example.com")),
                               f.envelope("user.created", f.user("user_2abc", 1, email="lower@example.com")),
                               f.envelope("user.deleted", f.deleted("user", "user_2abc"))]):
        headers, body = f.signed(event, f"msg_ci_{n}")
        assert processor.process(headers, body).status == "applied"
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT clerk_user_id, email, deleted_at IS NULL FROM ci_accounts "
                                    "ORDER BY clerk_user_id")).all()
    assert [tuple(r) for r in rows] == [("user_2aBc", "upper@example.com", 1), ("user_2abc", "lower@example.com", 0)]
    store.dispose()
    engine.dispose()


def test_a_table_held_elsewhere_ends_in_the_lock_bound_not_the_statement_bound(maria_url: str) -> None:
    """Left alone last session: a metadata-lock wait (a table under LOCK TABLES, an ALTER queued behind a long
    transaction) was bounded by max_statement_time only, not by the lock bound as on PostgreSQL."""
    holder = sa.create_engine(maria_url)
    waiter = Store(create_engine(maria_url, timeouts=DatabaseTimeouts(lock_s=1, statement_s=20)))
    try:
        with holder.connect() as conn:
            conn.exec_driver_sql("LOCK TABLES users WRITE")
            try:
                with pytest.raises(StoreError, match="lock_wait_timeout") as waited, waiter.transaction() as w:
                    w.conn.execute(sa.select(sa.func.count()).select_from(users)).scalar()
                assert is_lock_wait_timeout(getattr(waited.value.__cause__, "orig", None))
            finally:
                conn.exec_driver_sql("UNLOCK TABLES")
        with waiter.engine.connect() as conn:  # and the pooled connection keeps the bound
            assert conn.exec_driver_sql("SELECT @@SESSION.lock_wait_timeout").scalar() == 1
    finally:
        holder.dispose()
        waiter.dispose()


def test_a_deadlock_in_a_batchs_lock_pass_sends_its_deliveries_alone(maria_url: str) -> None:
    """Review finding: a transaction that inserted a new lock row rolled back while two batches waited on that
    row, and InnoDB broke the tie by a deadlock (1213): the victim's lock pass raised it and its whole batch,
    an unrelated organization's delivery included, was answered 503. Now each of its deliveries goes alone."""
    from clerk_sync.events import parse_envelope
    from clerk_sync.integrations._committer import ALONE, GroupCommitter

    store = Store(create_engine(maria_url, timeouts=DatabaseTimeouts(lock_s=5)))
    holder = Store(create_engine(maria_url))
    watcher = sa.create_engine(maria_url)
    committer = GroupCommitter(WebhookProcessor(store, WebhookVerifier([f.SECRET])))
    tag = uuid.uuid4().hex[:8]
    new_user = f"user_{tag}"
    results: dict[str, list[object]] = {}

    def batch(name: str, version: int) -> list[tuple[str, object]]:
        return [(f"msg_{tag}_{name}_u", parse_envelope(f.body_of(f.envelope("user.updated", f.user(new_user, version))))),
                (f"msg_{tag}_{name}_o", parse_envelope(f.body_of(f.envelope(
                    "organization.created", f.organization(f"org_{tag}_{name}", 1)))))]

    def write(name: str, version: int) -> None:
        results[name] = committer.write(batch(name, version))  # type: ignore[arg-type]

    def waiting() -> int:
        with watcher.connect() as conn:
            return int(conn.execute(sa.text(  # (innodb_trx listed no waiter here)
                "SELECT COUNT(*) FROM information_schema.processlist WHERE db = DATABASE() AND command = 'Query' "
                "AND info LIKE 'INSERT INTO clerk_sync_locks%'")).scalar_one())

    class RolledBack(Exception):
        pass

    threads = [threading.Thread(target=write, args=(name, version)) for name, version in (("b", 3), ("c", 4))]

    def hold_then_roll_back() -> None:
        with holder.transaction() as held:
            held.lock([f"user:{new_user}"])  # a new lock row, not committed: both batches' lock passes wait on it
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 10
            while waiting() < 2:  # (each batch waits two seconds at most: well before, both are waiting)
                assert time.monotonic() < deadline, "the batches never waited on the lock row"
                time.sleep(0.005)
            raise RolledBack  # the insert rolled back: InnoDB makes one waiter a deadlock's victim

    try:
        with pytest.raises(RolledBack):
            hold_then_roll_back()
        for thread in threads:
            thread.join(30)
        outcomes = [o for name in ("b", "c") for o in results[name]]
        assert not [o for o in outcomes if isinstance(o, BaseException)], results
        assert ALONE in outcomes, results  # the victim's deliveries, each to go alone (this test's deadlock)
    finally:
        store.dispose()
        holder.dispose()
        watcher.dispose()
