"""SQLite's group-committed batch with a mapped table and a hook writes the batch's hook jobs in one statement
(issue 11's SQLite cells), not one a delivery. What must not change: a refused mapped row is that row's alone
(its batch-mates and its own contract row and job commit), a trigger's half-done work is undone, the jobs keep
their order, and a batch that fails leaves none behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from clerk_sync import migrations
from clerk_sync import outbox as outbox_module
from clerk_sync.changes import Hook
from clerk_sync.events import parse_envelope
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations._committer import GroupCommitter
from clerk_sync.mapping import Column, MappedTable, SchemaMapping, SoftDelete, migrate_schema
from clerk_sync.outbox import list_jobs
from clerk_sync.store import Store, create_engine
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.test_hook_path_cost import statements

B = 1_700_000_000_000
MAPPING = SchemaMapping(users=MappedTable(
    "accounts", "clerk_user_id",
    {"email": "email", "name": "full_name", "role": Column("public_metadata.role", default="member")},
    on_delete=SoftDelete("deleted_at"),
))


def _store(tmp_path: Path, *app_sql: str) -> Store:
    """A migrated SQLite database with the app's ``accounts`` table (its e-mail UNIQUE) and ``app_sql`` run
    after it (a trigger), and a store writing it through :data:`MAPPING` with one hook on every user change."""
    url = f"sqlite:///{tmp_path / 'app.db'}"
    engine = create_engine(url)
    migrations.upgrade(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE accounts (id INTEGER PRIMARY KEY, email VARCHAR(320) UNIQUE, "
                             "name VARCHAR(255), role VARCHAR(32) NOT NULL DEFAULT 'member')")
        conn.exec_driver_sql("CREATE TABLE audit (email TEXT)")
        for sql in app_sql:
            conn.exec_driver_sql(sql)
        migrate_schema(conn, MAPPING)
    return Store(engine, mapping=MAPPING, hooks=[Hook("count", lambda change: None, on=["user.*"])])


def _batch(*users: tuple[str, str]) -> list[tuple[str, Any]]:
    return [(f"msg_{uid}", parse_envelope(f.body_of(f.envelope("user.created", f.user(uid, B + n, email=email)))))
            for n, (uid, email) in enumerate(users)]


def _write(store: Store, batch: list[tuple[str, Any]]) -> list[str]:
    committer = GroupCommitter(WebhookProcessor(store, WebhookVerifier([f.SECRET])))
    with statements(store) as seen:
        results = committer.write(batch)
    assert [getattr(r, "status", r).value for r in results] == ["applied"] * len(batch), results
    return seen


def _rows(store: Store, sql: str) -> list[Any]:
    with store.connect() as conn:
        return [tuple(row) for row in conn.exec_driver_sql(sql)]


def test_a_refused_row_mid_batch_is_its_alone_and_the_batch_jobs_are_one_statement(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The middle delivery's e-mail is another account's (UNIQUE): its mapped row is refused, and the batch goes
    on in the same transaction: every contract row and inbox row, the other accounts, the refused user's account
    without the columns the user writes, and the three hook jobs (in delivery order, in one INSERT) commit."""
    store = _store(tmp_path)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO accounts (email) VALUES ('taken@example.com')")
    job_statements: list[int] = []  # (sqlite3's trace shows an executemany as one statement per row)
    real = outbox_module.sqlite_execute

    def counted(conn: Any, sql: str, rows: Any, *, many: bool = False) -> list[Any]:
        if sql.startswith("INSERT INTO hook_jobs"):
            job_statements.append(len(rows))
        return real(conn, sql, rows, many=many)

    monkeypatch.setattr(outbox_module, "sqlite_execute", counted)
    _write(store, _batch(("user_a", "a@example.com"), ("user_b", "taken@example.com"), ("user_c", "c@example.com")))
    assert job_statements == [3]
    assert _rows(store, "SELECT clerk_id FROM users ORDER BY clerk_id") == [("user_a",), ("user_b",), ("user_c",)]
    assert _rows(store, "SELECT email, clerk_user_id FROM accounts ORDER BY id") == [
        ("taken@example.com", None), ("a@example.com", "user_a"), (None, "user_b"), ("c@example.com", "user_c")]
    refused = _rows(store, "SELECT svix_id, last_error FROM webhook_events WHERE last_error IS NOT NULL")
    assert [r[0] for r in refused] == ["msg_user_b"] and "UNIQUE" in refused[0][1], refused
    with store.connect() as conn:
        queued = [job.change.clerk_id for job in list_jobs(conn, status="pending", limit=10)]
    assert queued == ["user_a", "user_b", "user_c"]  # (the refused row's role holds: its job is queued too)
    store.dispose()


def test_a_trigger_that_fails_half_done_is_undone_by_a_savepoint(tmp_path: Path) -> None:
    """An app trigger writes its audit row, then ``RAISE(FAIL)``: SQLite keeps what a FAIL statement had done
    (the account row and the audit row); the mapped row's savepoint undoes both, and the batch-mate's rows are
    written. (Why a mapped row keeps its savepoint on SQLite, whose default ABORT backs a failing statement out
    by itself: this.)"""
    store = _store(tmp_path, "CREATE TRIGGER audited AFTER INSERT ON accounts BEGIN "
                             "INSERT INTO audit VALUES (NEW.email); "
                             "SELECT RAISE(FAIL, 'no such domain') WHERE NEW.email LIKE '%@bad.example'; END")
    _write(store, _batch(("user_a", "a@example.com"), ("user_b", "b@bad.example")))
    # (user_b's account is written again without the columns the user sets, its e-mail among them: audited
    # with none; what the failed statement had done, b@bad.example's account and audit row, is gone)
    assert _rows(store, "SELECT email FROM audit") == [("a@example.com",), (None,)]
    assert _rows(store, "SELECT email, clerk_user_id FROM accounts ORDER BY id") == [
        ("a@example.com", "user_a"), (None, "user_b")]
    assert _rows(store, "SELECT clerk_id FROM users ORDER BY clerk_id") == [("user_a",), ("user_b",)]
    store.dispose()


def test_the_batch_jobs_keep_each_users_order_across_batches(tmp_path: Path) -> None:
    """Held for one statement, the jobs still get ids in the order their changes were applied: a user created
    in one batch and updated twice in the next is queued created, updated, updated."""
    store = _store(tmp_path)
    _write(store, _batch(("user_a", "a@example.com"), ("user_b", "b@example.com")))
    updates = [(f"msg_u{n}", parse_envelope(f.body_of(f.envelope(
        "user.updated", f.user(uid, B + 10 + n, email=f"{uid}{n}@example.com")))))
        for n, uid in enumerate(["user_b", "user_a", "user_b"])]
    _write(store, updates)
    with store.connect() as conn:
        queued = [(job.change.clerk_id, job.change.kind, job.change.values.get("email"))
                  for job in list_jobs(conn, status="pending", limit=10)]
    assert queued == [("user_a", "created", "a@example.com"), ("user_b", "created", "b@example.com"),
                      ("user_b", "updated", "user_b0@example.com"), ("user_a", "updated", "user_a1@example.com"),
                      ("user_b", "updated", "user_b2@example.com")]
    store.dispose()


def test_jobs_held_for_the_batch_are_dropped_with_a_batch_that_fails(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch's job statement failing (here: a bug) names no delivery: each goes alone, its job with it,
    and nothing is queued twice."""
    store = _store(tmp_path)
    real = outbox_module.sqlite_execute

    def broken(conn: Any, sql: str, rows: Any, *, many: bool = False) -> list[Any]:
        if sql.startswith("INSERT INTO hook_jobs"):
            raise RuntimeError("job statement bug")
        return real(conn, sql, rows, many=many)

    monkeypatch.setattr(outbox_module, "sqlite_execute", broken)
    committer = GroupCommitter(WebhookProcessor(store, WebhookVerifier([f.SECRET])))
    from clerk_sync.integrations._committer import ALONE

    batch = _batch(("user_a", "a@example.com"), ("user_b", "b@example.com"))
    assert committer.write(batch) == [ALONE, ALONE]
    assert _rows(store, "SELECT count(*) FROM hook_jobs") == [(0,)]
    assert _rows(store, "SELECT count(*) FROM users") == [(0,)]
    monkeypatch.undo()
    for delivery in batch:  # (as the service then writes each: alone)
        _write(store, [delivery])
    with store.connect() as conn:
        assert [job.change.clerk_id for job in list_jobs(conn, status="pending", limit=10)] == ["user_a", "user_b"]
    store.dispose()


def test_a_batch_holds_at_most_so_many_jobs_before_writing_them(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Held job rows are written once they reach the bound (an organization's deletion queues one a member and
    hook), in order, the rest at the batch's end."""
    monkeypatch.setattr(outbox_module, "_HELD_JOBS_MAX", 2)
    written: list[list[str]] = []
    real = outbox_module.sqlite_execute

    def counted(conn: Any, sql: str, rows: Any, *, many: bool = False) -> list[Any]:
        if sql.startswith("INSERT INTO hook_jobs"):
            written.append([row[3].split(":")[1] for row in rows])  # (the idempotency key names the user)
        return real(conn, sql, rows, many=many)

    monkeypatch.setattr(outbox_module, "sqlite_execute", counted)
    store = _store(tmp_path)
    _write(store, _batch(("user_a", "a@example.com"), ("user_b", "b@example.com"), ("user_c", "c@example.com")))
    assert written == [["user_a", "user_b"], ["user_c"]]
    with store.connect() as conn:
        assert [job.change.clerk_id for job in list_jobs(conn, status="pending", limit=10)] == [
            "user_a", "user_b", "user_c"]
    store.dispose()


def test_held_jobs_refused_at_the_bound_blame_no_one_delivery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows written at the bound are several deliveries' jobs: refused there, the batch names none (each goes
    alone), not the delivery that happened to reach the bound (isolated, and each retry blaming the next)."""
    from clerk_sync.integrations._committer import ALONE

    monkeypatch.setattr(outbox_module, "_HELD_JOBS_MAX", 2)
    real, failed = outbox_module.sqlite_execute, []

    def once(conn: Any, sql: str, rows: Any, *, many: bool = False) -> list[Any]:
        if sql.startswith("INSERT INTO hook_jobs") and not failed:
            failed.append(len(rows))
            raise RuntimeError("job statement refused once")
        return real(conn, sql, rows, many=many)

    monkeypatch.setattr(outbox_module, "sqlite_execute", once)
    store = _store(tmp_path)
    committer = GroupCommitter(WebhookProcessor(store, WebhookVerifier([f.SECRET])))
    batch = _batch(("user_a", "a@example.com"), ("user_b", "b@example.com"), ("user_c", "c@example.com"))
    assert committer.write(batch) == [ALONE, ALONE, ALONE]
    assert failed == [2] and _rows(store, "SELECT count(*) FROM hook_jobs") == [(0,)]
    store.dispose()
