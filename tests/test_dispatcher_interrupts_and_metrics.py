"""The hook dispatcher under interrupts, and its metrics: a ``KeyboardInterrupt`` that is not Ctrl-C is a job's failure, a real
stop gives back the job it interrupted, and the metrics count what was recorded (a success whose claim was
lost is ``lost``; a failure's duration is its handler's, not the recording's). On SQLite.

Handlers that hang block on events the test sets; the dispatcher's clock is ``tests.test_hooks.Clock``.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
import structlog.testing

from clerk_sync.changes import Change, Hook
from clerk_sync.hooks import Backoff, Dispatcher
from clerk_sync.metrics import Metrics
from clerk_sync.outbox import claim
from clerk_sync.store import Store
from tests import factories as f
from tests.test_hook_timeout import Hanging, join_runs
from tests.test_hooks import B, Clock, deliver, hooked, jobs
from tests.test_hooks_failure_recording_and_retry import _eventually


def _user(clerk_id: str = "user_1", version: int = B + 1000) -> dict[str, Any]:
    return f.envelope("user.created", f.user(clerk_id, version))


def _runs(metrics: Metrics, hook: str) -> dict[str, float]:
    return {o: metrics.hook_runs.labels(hook=hook, outcome=o)._value.get() for o in ("ok", "retry", "dead", "lost")}


# -- 4. KeyboardInterrupt ---------------------------------------------------------------------------------

def test_a_handler_raising_keyboard_interrupt_in_serves_thread_fails_its_job_and_the_thread_goes_on(
        sqlite_url: str) -> None:
    """Fixed: a ``KeyboardInterrupt`` raised by a handler in ``serve``'s dispatcher thread was taken
    for Ctrl-C: the thread ended for good while webhooks kept being accepted, and the job stayed ``running``
    until its lease ended. Ctrl-C comes to the main thread only: there it is the job's failure, retried."""
    retried = threading.Event()
    calls: list[str] = []

    def handler(change: Change) -> None:
        calls.append(change.clerk_id)
        if len(calls) == 1:
            raise KeyboardInterrupt
        retried.set()

    store = hooked(sqlite_url, Hook("mail", handler))
    deliver(store, _user())
    metrics = Metrics()
    dispatcher = Dispatcher(store, poll_s=0.01, backoff=Backoff(base_s=0), metrics=metrics)
    dispatcher.start()
    try:
        assert retried.wait(10), "the job was not run again"
        assert _eventually(lambda: jobs(store) == [])
        thread = dispatcher._thread
        assert thread is not None and thread.is_alive()
    finally:
        dispatcher.stop()
    assert calls == ["user_1", "user_1"]
    assert _runs(metrics, "mail") == {"ok": 1, "retry": 1, "dead": 0, "lost": 0}
    store.dispose()


def test_a_keyboard_interrupt_from_a_timeout_s_handlers_thread_is_its_jobs_failure(sqlite_url: str) -> None:
    """Fixed: with ``timeout_s`` the handler runs in a thread of its own; what it raised was re-raised
    in the dispatcher's thread, where a ``KeyboardInterrupt`` (in the main thread, ``clerk-sync worker``)
    stopped the dispatcher. It did not come from Ctrl-C: the job's failure, recorded, and the batch goes on."""
    clock = Clock()

    def handler(change: Change) -> None:
        if change.clerk_id == "user_1":
            raise KeyboardInterrupt

    store = hooked(sqlite_url, Hook("mail", handler, timeout_s=30), now=clock)
    deliver(store, _user("user_1"), _user("user_2"))
    metrics = Metrics()
    dispatcher = Dispatcher(store, now=clock, heartbeat_s=0, backoff=Backoff(base_s=5), metrics=metrics)
    try:
        claimed = dispatcher.run_once()
    except KeyboardInterrupt:
        pytest.fail("the handler's KeyboardInterrupt stopped the dispatcher")
    assert claimed == 2
    (job,) = jobs(store)
    assert (job["entity_key"].endswith(":user_1"), job["status"], job["attempts"], job["last_error"]) == (
        True, "pending", 1, "KeyboardInterrupt")
    assert _runs(metrics, "mail") == {"ok": 1, "retry": 1, "dead": 0, "lost": 0}
    store.dispose()


def test_a_stop_mid_handler_gives_its_job_back_with_the_attempt_counted(sqlite_url: str) -> None:
    """Ctrl-C in the main thread during a handler (``clerk-sync worker``) still stops the dispatcher; its job
    was left ``running`` until its lease ended (a minute of nothing for that entity after a restart). It is
    given back, due at once, its attempt counted; on its last attempt it is left to its lease (then dead), so
    a handler that raises ``KeyboardInterrupt`` itself cannot stop a restarted worker forever."""
    clock = Clock()

    def handler(change: Change) -> None:
        raise KeyboardInterrupt

    store = hooked(sqlite_url, Hook("mail", handler), now=clock)
    deliver(store, _user())
    for attempt in (1, 2):
        with pytest.raises(KeyboardInterrupt):
            Dispatcher(store, now=clock, heartbeat_s=0, backoff=Backoff(max_attempts=3)).run_once()
        assert [(j["status"], j["attempts"], j["claim_token"]) for j in jobs(store)] == [("pending", attempt, None)]
    with pytest.raises(KeyboardInterrupt):  # the last attempt: kept claimed, dead once its lease ended
        Dispatcher(store, now=clock, heartbeat_s=0, backoff=Backoff(max_attempts=3)).run_once()
    assert [(j["status"], j["attempts"]) for j in jobs(store)] == [("running", 3)]
    clock.advance(61)
    assert Dispatcher(store, now=clock, heartbeat_s=0, backoff=Backoff(max_attempts=3)).run_once() == 0
    assert [j["status"] for j in jobs(store)] == ["dead"]
    store.dispose()


def _waiting_for_the_run(main: threading.Thread) -> bool:
    """Whether the main thread waits in ``_Run.wait`` (for a ``timeout_s`` handler's thread)."""
    frame = sys._current_frames().get(main.ident or 0)
    while frame is not None:
        if frame.f_code.co_name == "wait" and frame.f_code.co_filename.endswith("clerk_sync/hooks/__init__.py"):
            return True
        frame = frame.f_back
    return False


def test_ctrl_c_while_a_timeout_s_run_goes_on_keeps_its_job_claimed_until_the_run_ends(sqlite_url: str) -> None:
    """The safe part of giving back: Ctrl-C (a real SIGINT) while the dispatcher waits for a ``timeout_s``
    handler stops it, but that handler's thread runs on, so its job is not given back (another dispatcher
    would run it beside the live run): it stays claimed, and once the run ends the next turn records it."""
    main = threading.main_thread()
    assert threading.current_thread() is main
    clock = Clock()
    crm = Hanging()
    store = hooked(sqlite_url, Hook("crm", crm, timeout_s=30), now=clock)
    deliver(store, _user())
    dispatcher = Dispatcher(store, now=clock, heartbeat_s=0)

    def ctrl_c() -> None:
        assert _eventually(lambda: bool(crm.started) and _waiting_for_the_run(main))
        signal.pthread_kill(main.ident or 0, signal.SIGINT)

    presser = threading.Thread(target=ctrl_c)
    presser.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            dispatcher.run_once()
        presser.join(10)
        assert [(j["status"], j["attempts"]) for j in jobs(store)] == [("running", 1)]
        assert dispatcher.overdue == 1
    finally:
        crm.release.set()
        join_runs()
    assert dispatcher.run_once() == 0  # records the run that ended: done
    assert jobs(store) == []
    store.dispose()


# -- 5. metrics -----------------------------------------------------------------------------------------

def _lose_the_claim(store: Store, clock: Clock) -> None:
    """Another dispatcher takes the job over: the lease (60 s) has run out."""
    clock.advance(61)
    with store.transaction() as writer:
        assert len(claim(writer.conn, clock(), lease=timedelta(seconds=60), limit=10, max_attempts=10)) == 1


def test_a_success_whose_claim_was_lost_counts_as_lost(sqlite_url: str) -> None:
    """Fixed: a success was counted ``ok`` before its job was finished, so one whose claim had been
    lost (another dispatcher runs the job again) counted ``ok`` and never ``lost``."""
    clock = Clock()
    holder: list[Store] = []

    def slow(change: Change) -> None:
        _lose_the_claim(holder[0], clock)

    store = hooked(sqlite_url, Hook("slow", slow), now=clock)
    holder.append(store)
    deliver(store, _user())
    metrics = Metrics()
    assert Dispatcher(store, lease_s=60, heartbeat_s=0, now=clock, metrics=metrics).run_once() == 1
    assert [(j["status"], j["attempts"]) for j in jobs(store)] == [("running", 2)]  # the other claim's
    assert _runs(metrics, "slow") == {"ok": 0, "retry": 0, "dead": 0, "lost": 1}
    store.dispose()


def test_an_overdue_success_whose_claim_was_lost_counts_as_lost(sqlite_url: str) -> None:
    """The same for a ``timeout_s`` run recorded after it ended (``_reap``)."""
    clock = Clock()
    crm = Hanging()
    store = hooked(sqlite_url, Hook("crm", crm, timeout_s=0.05), now=clock)
    deliver(store, _user())
    metrics = Metrics()
    dispatcher = Dispatcher(store, lease_s=60, heartbeat_s=0, now=clock, metrics=metrics)
    try:
        assert dispatcher.run_once() == 1
        assert dispatcher.overdue == 1
        _lose_the_claim(store, clock)  # no heartbeat: the overdue job's lease ran out
    finally:
        crm.release.set()
        join_runs()
    assert dispatcher.run_once() == 0
    assert dispatcher.overdue == 0
    assert _runs(metrics, "crm") == {"ok": 0, "retry": 0, "dead": 0, "lost": 1}
    store.dispose()


SLOW_WRITE_S = 100.0  # how long the failure's write takes, on the dispatcher's own (faked) clock


class _SteppedTime:
    """The ``time`` module as the dispatcher sees it, with a ``perf_counter`` a test can move forward (no sleep)."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def perf_counter(self) -> float:
        return time.perf_counter() + self.ahead

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.mark.parametrize("timeout_s", [None, 30.0], ids=["inline", "own-thread"])
def test_a_failures_duration_is_its_handlers_not_the_recordings(sqlite_url: str, timeout_s: float | None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed: a failure's seconds were taken after its recording (a database write), so a slow
    database showed as slow handlers. The handler fails at once; the write of its failure takes 100 s of the
    dispatcher's clock (moved forward by the write itself, not slept)."""
    import clerk_sync.hooks as hooks_module

    clock, stepped = Clock(), _SteppedTime()
    monkeypatch.setattr(hooks_module, "time", stepped)

    def fail_now(change: Change) -> None:
        raise RuntimeError("refused")

    store = hooked(sqlite_url, Hook("crm", fail_now, timeout_s=timeout_s), now=clock)
    deliver(store, _user())

    def slow_failure_write(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE HOOK_JOBS") and "last_error" in statement:
            stepped.ahead += SLOW_WRITE_S  # the database, slow to record the failure

    sa.event.listen(store.engine, "before_cursor_execute", slow_failure_write)
    metrics = Metrics()
    assert Dispatcher(store, now=clock, heartbeat_s=0, metrics=metrics).run_once() == 1
    assert [j["last_error"] for j in jobs(store)] == ["RuntimeError: refused"]  # (the write was made, slowly)
    assert _runs(metrics, "crm")["retry"] == 1
    seconds = metrics.hook_seconds.labels(hook="crm")._sum.get()
    assert seconds < SLOW_WRITE_S, f"{seconds:.3f}s counted for a handler that failed at once"
    store.dispose()


def test_the_failure_log_line_names_the_error_type_under_a_plain_key(sqlite_url: str) -> None:
    """Fixed: the "hook failed" line carried the type under ``exception``, a key structlog's console
    renderer prints as a traceback, on a line of its own. It is ``error_type`` now."""
    clock = Clock()

    def refuse(change: Change) -> None:
        raise ValueError("no")

    store = hooked(sqlite_url, Hook("crm", refuse), now=clock)
    deliver(store, _user())
    with structlog.testing.capture_logs() as logs:
        Dispatcher(store, now=clock, heartbeat_s=0).run_once()
    (line,) = [entry for entry in logs if entry["event"] == "hook failed"]
    assert line["error_type"] == "ValueError" and "exception" not in line
    rendered = structlog.dev.ConsoleRenderer(colors=False)(None, "warning", dict(line))
    assert "\n" not in rendered.strip() and "error_type=ValueError" in rendered
    store.dispose()
