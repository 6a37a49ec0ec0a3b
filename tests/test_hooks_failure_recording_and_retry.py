"""How the hook dispatcher, its sinks and ``hooks retry`` record failures: a failure the database cannot store,
an exception that is not an ``Exception``, secrets and personal data in errors and logs, and a retry of
every dead job at once. On SQLite, PostgreSQL and MariaDB (the ``db_url`` fixture)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import structlog.testing

import clerk_sync.hooks as hooks_module
from clerk_sync.changes import Change, Hook
from clerk_sync.errors import StoreDataError, StoreError
from clerk_sync.hooks import Backoff, Dispatcher
from clerk_sync.hooks.sinks import StandardWebhookSink
from clerk_sync.outbox import fail
from clerk_sync.store import Store
from clerk_sync.tables import hook_jobs
from tests import factories as f
from tests.test_hooks import B, Clock, Recorder, deliver, hooked, jobs

FORWARD_SECRET = "whsec_" + "c2VjcmV0LWZvci10aGUtYXBwLXRoYXQtcmVjZWl2ZXM="


def _users(n: int) -> list[dict[str, Any]]:
    return [f.envelope("user.created", f.user(f"user_{i}", B + 1000)) for i in range(1, n + 1)]


def _failing_for(clerk_id: str, raised: BaseException, seen: list[str]) -> Any:
    def handler(change: Change) -> None:
        seen.append(change.clerk_id)
        if change.clerk_id == clerk_id:
            raise raised

    return handler


# -- 1. a failure message the database cannot store ----------------------------------------------------

@pytest.mark.parametrize(("message", "stored"), [("nul \x00 byte", "nul \\0 byte"),
                                                 ("lone \ud800 surrogate", "lone \\ud800 surrogate")],
                         ids=["nul", "surrogate"])
def test_a_failure_message_the_database_cannot_store_is_recorded_cleaned_and_the_batch_goes_on(
        db_url: str, message: str, stored: str) -> None:
    """Fixed: PostgreSQL refuses a NUL in text and every backend a lone surrogate; the error
    escaped ``_run``, the batch was abandoned, and the jobs after the failing one went dead unrun."""
    clock, seen = Clock(), list[str]()
    store = hooked(db_url, Hook("mail", _failing_for("user_1", RuntimeError(message), seen)), now=clock)
    deliver(store, *_users(3))
    assert Dispatcher(store, now=clock, heartbeat_s=0).run_once() == 3
    assert seen == ["user_1", "user_2", "user_3"]
    (job,) = jobs(store)
    assert (job["status"], job["attempts"], job["last_error"]) == ("pending", 1, f"RuntimeError: {stored}")
    store.dispose()


def test_an_exception_whose_str_raises_is_recorded_by_its_name(db_url: str) -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise ValueError("no")

    clock, seen = Clock(), list[str]()
    store = hooked(db_url, Hook("mail", _failing_for("user_1", Unprintable(), seen)), now=clock)
    deliver(store, *_users(2))
    assert Dispatcher(store, now=clock, heartbeat_s=0).run_once() == 2
    (job,) = jobs(store)
    assert (seen, job["last_error"]) == (["user_1", "user_2"], "Unprintable: <exception str() failed>")
    store.dispose()


def test_a_failure_the_database_still_refuses_is_recorded_by_the_exceptions_name(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    clock, seen = Clock(), list[str]()
    store = hooked(db_url, Hook("mail", _failing_for("user_1", RuntimeError("whatever it said"), seen)), now=clock)
    deliver(store, *_users(2))

    def picky(conn: Any, job: Any, error: str, retry_at: datetime | None) -> bool:
        if error != "RuntimeError":
            raise StoreDataError("database error: DataError: refused")
        return fail(conn, job, error, retry_at)

    monkeypatch.setattr(hooks_module, "fail", picky)
    assert Dispatcher(store, now=clock, heartbeat_s=0).run_once() == 2
    (job,) = jobs(store)
    assert (seen, job["status"], job["last_error"]) == (["user_1", "user_2"], "pending", "RuntimeError")
    store.dispose()


def test_an_abandoned_batch_gives_back_the_jobs_it_never_started(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """When recording a failure fails (the database is away), the jobs after it in the batch are released at
    once, not left claimed for a lease and charged an attempt each time."""
    clock, seen = Clock(), list[str]()
    store = hooked(db_url, Hook("mail", _failing_for("user_1", RuntimeError("down"), seen)), now=clock)
    deliver(store, *_users(3))

    def blip(*_: Any, **__: Any) -> bool:
        raise StoreError("connection reset")

    monkeypatch.setattr(hooks_module, "fail", blip)
    with pytest.raises(StoreError, match="connection reset"):
        Dispatcher(store, now=clock, heartbeat_s=0).run_once()
    assert seen == ["user_1"]
    assert [(j["status"], j["attempts"]) for j in jobs(store)] == [("running", 1), ("pending", 0), ("pending", 0)]
    store.dispose()


def _sink_client(answers: dict[str, httpx.Response], posted: list[str]) -> httpx.Client:
    def answer(request: httpx.Request) -> httpx.Response:
        posted.append(str(request.url))
        clerk_id = httpx.Response(200, content=request.content).json()["data"]["clerk_id"]
        return answers.get(clerk_id, httpx.Response(204))

    return httpx.Client(transport=httpx.MockTransport(answer))


# -- 1 and 3. the sink: a binary error body, and no secret or reply text in the logs ------------------------

def test_a_receivers_binary_500_is_recorded_without_secrets_and_logged_without_its_text(db_url: str) -> None:
    """Fixed: a receiver answering 500 with a binary body (a NUL in the error) abandoned the batch
    on PostgreSQL; the error named the sink's URL with its password and token; and the log line carried the
    reply's text (receivers echo the refused e-mail), which erasure does not reach. The excerpt stays in
    ``last_error``, which erasure redacts; the log has the hook, the job, the type and the status."""
    posted: list[str] = []
    reply = httpx.Response(500, content=b"\x00\xffrefused user_1@example.com")
    url = "https://ops:hunter2@hooks.example.com:8443/in/clerk?token=s3cret"
    sink = StandardWebhookSink(url, FORWARD_SECRET, client=_sink_client({"user_1": reply}, posted))
    clock = Clock()
    store = hooked(db_url, Hook("forward", sink), now=clock)
    deliver(store, *_users(3))
    with structlog.testing.capture_logs() as logs:
        assert Dispatcher(store, now=clock, heartbeat_s=0).run_once() == 3
    assert len(posted) == 3 and posted[0] == url  # the password and token are still sent to the receiver
    (job,) = jobs(store)
    assert job["last_error"] == ("RuntimeError: https://hooks.example.com:8443/in/clerk answered 500: "
                                 "\\0\ufffdrefused user_1@example.com")
    (line,) = [entry for entry in logs if entry["event"] == "hook failed"]
    assert {k: line[k] for k in ("hook", "job", "error_type", "status")} == {
        "hook": "forward", "job": job["id"], "error_type": "RuntimeError", "status": 500}
    said = repr(logs)
    assert "hunter2" not in said and "s3cret" not in said and "example.com" not in said
    store.dispose()


@pytest.mark.parametrize(("url", "named"), [
    ("https://u:p@h.example/a/b?token=x#frag", "https://h.example/a/b"),
    ("http://[::1]:8080/x?k=v", "http://[::1]:8080/x"),
    ("https://h.example", "https://h.example/"),
], ids=["userinfo-query", "ipv6-port", "bare"])
def test_a_gone_receivers_error_names_the_url_without_its_secrets(url: str, named: str) -> None:
    reply = httpx.Response(410, content=b"gone")
    sink = StandardWebhookSink(url, FORWARD_SECRET, client=_sink_client({"user_1": reply}, []))
    change = Change.from_json({"entity": "users", "clerk_id": "user_1", "kind": "created", "version": 1,
                               "values": {}})
    with pytest.raises(Exception, match="answered 410") as raised:
        sink(change)
    assert str(raised.value).startswith(f"{named} answered 410: gone (")
    sink.close()


def test_a_handlers_failure_is_logged_without_its_message(db_url: str) -> None:
    clock, seen = Clock(), list[str]()
    store = hooked(db_url, Hook("crm", _failing_for("user_1", ValueError("CRM refused ada@example.com"), seen)),
                   now=clock)
    deliver(store, *_users(1))
    with structlog.testing.capture_logs() as logs:
        Dispatcher(store, now=clock, heartbeat_s=0).run_once()
    (line,) = [entry for entry in logs if entry["event"] == "hook failed"]
    assert line["error_type"] == "ValueError" and "ada@example.com" not in repr(logs)
    assert jobs(store)[0]["last_error"] == "ValueError: CRM refused ada@example.com"  # (erasure redacts it there)
    store.dispose()


# -- 2. exceptions that are not an Exception ------------------------------------------------------------

@pytest.mark.parametrize(("raised", "stored"), [(asyncio.CancelledError(), "CancelledError"),
                                                (SystemExit(3), "SystemExit: 3")], ids=["cancelled", "exit"])
def test_a_handler_raising_a_base_exception_fails_its_job_and_the_batch_goes_on(
        db_url: str, raised: BaseException, stored: str) -> None:
    """Fixed: ``asyncio.CancelledError`` or ``SystemExit`` from a handler escaped the dispatcher
    and ended ``serve``'s dispatcher thread for good, while ``serve`` kept queueing jobs."""
    clock, seen = Clock(), list[str]()
    store = hooked(db_url, Hook("mail", _failing_for("user_1", raised, seen)), now=clock)
    deliver(store, *_users(2))
    assert Dispatcher(store, now=clock, heartbeat_s=0, backoff=Backoff(base_s=5)).run_once() == 2
    (job,) = jobs(store)
    assert (seen, job["status"], job["attempts"], job["last_error"]) == (
        ["user_1", "user_2"], "pending", 1, stored)
    store.dispose()


def test_the_dispatcher_thread_outlives_a_cancelled_handler(db_url: str) -> None:
    cancelled = threading.Event()

    def handler(change: Change) -> None:
        if change.clerk_id == "user_1" and not cancelled.is_set():
            cancelled.set()
            raise asyncio.CancelledError

    done = Recorder()
    store = hooked(db_url, Hook("mail", handler), Hook("done", done, on=["user.updated"]))
    deliver(store, *_users(1))
    dispatcher = Dispatcher(store, poll_s=0.01, backoff=Backoff(base_s=0))
    dispatcher.start()
    try:
        assert _eventually(cancelled.is_set)
        deliver(store, f.envelope("user.updated", f.user("user_1", B + 2000, role="admin")))
        assert _eventually(lambda: bool(done.seen))
        assert _eventually(lambda: jobs(store) == [])
    finally:
        dispatcher.stop()
    store.dispose()


def test_a_turn_that_crashed_is_logged_and_the_loop_goes_on(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    done = Recorder()
    store = hooked(db_url, Hook("done", done))
    deliver(store, *_users(1))
    dispatcher = Dispatcher(store, poll_s=0.01)
    real, turns = dispatcher._run_batch, list[int]()

    def once(*, stopped_before: bool) -> int:  # (the loop's turn)
        turns.append(1)
        if len(turns) == 1:
            raise asyncio.CancelledError  # from somewhere in the turn's bookkeeping, not a handler
        return real(stopped_before=stopped_before)

    monkeypatch.setattr(dispatcher, "_run_batch", once)
    with structlog.testing.capture_logs() as logs:
        dispatcher.start()
        try:
            assert _eventually(lambda: bool(done.seen))
        finally:
            dispatcher.stop()
    assert any(entry["event"].startswith("hook dispatch crashed") for entry in logs)
    store.dispose()


def test_keyboard_interrupt_and_an_exit_on_stop_still_stop_the_dispatcher(db_url: str) -> None:
    """Ctrl-C in the main thread (here raised by the handler: the same to the dispatcher), or an exit once
    ``stop`` was asked, stops it; the job whose run was cut short is given back with the jobs not started,
    its attempt counted (it was left ``running`` until its lease ended)."""
    clock = Clock()
    holder: list[Dispatcher] = []
    interrupted: list[str] = []

    def handler(change: Change) -> None:
        if not interrupted:
            interrupted.append(change.clerk_id)
            raise KeyboardInterrupt
        holder[-1].stop(timeout_s=0)  # a SIGTERM handler: stop, then exit
        raise SystemExit(0)

    store = hooked(db_url, Hook("mail", handler), now=clock)
    deliver(store, *_users(3))
    holder.append(Dispatcher(store, now=clock, heartbeat_s=0, batch=1))
    with pytest.raises(KeyboardInterrupt):
        holder[0].run_once()
    assert [(j["status"], j["attempts"]) for j in jobs(store)] == [("pending", 1), ("pending", 0), ("pending", 0)]
    holder.append(Dispatcher(store, now=clock, heartbeat_s=0))
    with pytest.raises(SystemExit):
        holder[-1].run_once()
    # user_1: its run exited, given back with its second attempt counted; user_2 and user_3: not started
    assert [(j["status"], j["attempts"]) for j in jobs(store)] == [("pending", 2), ("pending", 0), ("pending", 0)]
    store.dispose()


def _eventually(check: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# -- 4. hooks retry --all, page by page -------------------------------------------------------------------

def _dead_jobs(db_url: str) -> tuple[Store, list[tuple[str, int]]]:
    """Seven dead jobs over three users (user_1 at three versions); returns the store and their order."""
    store = hooked(db_url, Hook("sync", Recorder()))
    deliver(store, *_users(3),
            f.envelope("user.updated", f.user("user_1", B + 2000, role="admin")),
            f.envelope("user.updated", f.user("user_2", B + 2000, role="admin")),
            f.envelope("user.updated", f.user("user_1", B + 3000, role="owner")),
            f.envelope("user.updated", f.user("user_3", B + 2000, role="admin")))
    with store.transaction() as writer:
        writer.conn.execute(hook_jobs.update().values(status="dead", attempts=10, last_error="RuntimeError: down"))
    order = [(j["payload"]["clerk_id"], j["payload"]["version"]) for j in jobs(store)]
    return store, order


@pytest.mark.parametrize("named", [False, True], ids=["all", "ids"])
def test_retry_requeues_dead_jobs_a_page_at_a_time_in_order(db_url: str, named: bool) -> None:
    """Fixed: ``hooks retry --all`` read every dead row with its payload and locked them all in one
    transaction. A page of ids at a time now, one transaction each; the order per entity and the
    out-of-order warnings are the same."""
    from clerk_sync.cli.hooks import _retry_dead

    store, order = _dead_jobs(db_url)
    with store.connect() as conn:
        ids = list(conn.execute(sa.select(hook_jobs.c.id).order_by(hook_jobs.c.id)).scalars())
    commits = list[int]()
    sa.event.listen(store.engine, "commit", lambda conn: commits.append(1))
    count, stale = _retry_dead(store, [*reversed(ids), ids[0]] if named else None, datetime.now(UTC), page=2)
    assert count == 7 and len(commits) >= 4  # four pages of at most two
    retried = jobs(store)
    assert [(j["payload"]["clerk_id"], j["payload"]["version"]) for j in retried] == order
    assert all(j["status"] == "pending" and j["attempts"] == 0 for j in retried)
    older = {(clerk_id, version) for clerk_id, version in order
             if version < max(v for c, v in order if c == clerk_id)}
    assert len(stale) == len(older) == 4 and all("out of order" in line for line in stale)
    assert {(line.split(" of ")[1].split(",")[0], int(line.split("version ")[1].split(")")[0])) for line in stale} == older
    assert _retry_dead(store, None, datetime.now(UTC), page=2) == (0, [])
    store.dispose()


def test_retry_all_stops_at_the_jobs_dead_when_it_began(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed (review): a job queued again goes to the tail under a new id; a worker that ran it and lost it
    again between two pages (a receiver still answering 410, ``HookGaveUp``) made it dead past the pages
    done, and ``--all`` queued it again, and again: it never ended. Here a "worker" kills every pending job
    before each page is read."""
    import clerk_sync.cli.hooks as cli_hooks

    store, order = _dead_jobs(db_url)
    real = cli_hooks._next_page
    pages = list[list[int]]()

    def worker_between_pages(conn: sa.Connection, *args: Any, **kwargs: Any) -> list[int]:
        conn.execute(hook_jobs.update().where(hook_jobs.c.status == "pending").values(status="dead"))
        pages.append(real(conn, *args, **kwargs))
        assert len(pages) <= 10, "still paging: it queues again what died after it began"
        return pages[-1]

    monkeypatch.setattr(cli_hooks, "_next_page", worker_between_pages)
    count, _ = cli_hooks._retry_dead(store, None, datetime.now(UTC), page=2)
    assert count == len(order) == 7 and [len(p) for p in pages] == [2, 2, 2, 1, 0]
    store.dispose()


def test_hooks_retry_all_commits_a_page_at_a_time(db_url: str, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The command itself: ``hooks retry --all`` over seven dead jobs, two a page, commits once a page (it
    was one transaction holding every row), and says what it did as before."""
    from clerk_sync.cli import hooks as cli_hooks

    store, order = _dead_jobs(db_url)
    for name in [n for n in os.environ if n.startswith("CLERK_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setattr(cli_hooks, "_RETRY_PAGE", 2, raising=False)
    commits = list[int]()

    def committed(conn: Any) -> None:
        commits.append(1)

    capsys.readouterr()  # (the deliveries' log lines)
    sa.event.listen(sa.engine.Engine, "commit", committed)
    try:
        cli_hooks.retry_command(ids=None, all_=True)
    finally:
        sa.event.remove(sa.engine.Engine, "commit", committed)
    out, err = capsys.readouterr()
    assert out.strip() == "7 dead job(s) queued again" and len(err.splitlines()) == 4
    assert len(commits) == 5, commits  # pages of 2, 2, 2 and 1, then the read that finds no more
    assert [(j["payload"]["clerk_id"], j["payload"]["version"], j["status"]) for j in jobs(store)] == [
        (clerk_id, version, "pending") for clerk_id, version in order]
    store.dispose()
