"""``Hook(timeout_s=)``: a handler that hangs no longer stalls its dispatcher.

The hanging handlers block on a :class:`threading.Event` the test sets at the end (always, in a ``finally``),
so a run goes overdue because it is blocked, never because a machine was slow; the leases move with the
hand-moved clock of ``tests.test_hooks`` and the test's own ``extend_leases()`` calls (the heartbeat's
beats), and a run that ended is waited for by joining its thread, not by sleeping.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, MutableMapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog.testing

from clerk_sync.changes import Change, Hook
from clerk_sync.hooks import Backoff, Dispatcher
from clerk_sync.metrics import Metrics
from clerk_sync.store import Store, create_engine
from tests import factories as f
from tests.test_hooks import B, Clock, Recorder, deliver, hooked, jobs

OVERDUE = "hook handler past its timeout_s"
AT_BOUND = "hook runs overdue at max_overdue"


class Hanging:
    """A handler that blocks until the test sets ``release`` (only for the ids in ``hang``, all when None),
    then returns, or raises ``error``."""

    def __init__(self, hang: set[str] | None = None, error: Exception | None = None) -> None:
        self.release = threading.Event()
        self.hang = hang
        self.error = error
        self.started: list[str] = []  # clerk id and kind of each run, as it started

    def __call__(self, change: Change) -> None:
        self.started.append(f"{change.clerk_id}:{change.kind}")
        if self.hang is None or change.clerk_id in self.hang:
            assert self.release.wait(60), "the test never released the handler"
        if self.error is not None:
            raise self.error


@pytest.fixture
def crm() -> Iterator[Hanging]:
    handler = Hanging()
    try:
        yield handler
    finally:
        handler.release.set()  # a failing test must not leave a thread blocked
        join_runs()


def join_runs() -> None:
    """Wait for the handler threads (``clerk-sync-hook-<hook>-<job>``) to end: a run that ended is recorded
    at the dispatcher's next turn."""
    for thread in threading.enumerate():
        if thread.name.startswith("clerk-sync-hook-"):
            thread.join(30)
            assert not thread.is_alive(), f"{thread.name} still runs"


def org_created(org_id: str) -> dict[str, Any]:
    return f.envelope("organization.created", f.organization(org_id, B + 1000))


def job_of(store: Store, clerk_id: str) -> dict[str, Any]:
    (job,) = [j for j in jobs(store) if j["entity_key"].endswith(f":{clerk_id}")]
    return job


def lease_of(store: Store, clerk_id: str) -> datetime:
    value = job_of(store, clerk_id)["lease_until"]
    assert isinstance(value, datetime)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def said(logs: Sequence[MutableMapping[str, Any]], start: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"].startswith(start)]


# -- an overdue run: the dispatcher goes on, the job stays claimed ---------------------------------------

@pytest.mark.parametrize("error", [None, RuntimeError("CRM timed out")], ids=["succeeds", "fails"])
def test_a_hanging_handler_does_not_stall_the_dispatcher_and_keeps_its_job(
        db_url: str, crm: Hanging, error: Exception | None) -> None:
    """The CRM hook's handler hangs on org_hang: past its timeout_s the dispatcher runs the mail hook's jobs
    of the same batch and of the next, the CRM job stays claimed (its lease extended by the beats, a second
    dispatcher finds nothing to take even past the claim's lease), and once the handler returns its outcome
    is recorded at the next turn: the job finished, or its failure queued for a retry."""
    clock = Clock()
    crm.error = error
    mail = Recorder()
    store = hooked(db_url, Hook("crm", crm, on=["organization.created"], timeout_s=0.05),
                   Hook("mail", mail, on=["user.created"]), now=clock)
    deliver(store, org_created("org_hang"), f.envelope("user.created", f.user("user_1", B + 1000)),
            f.envelope("user.created", f.user("user_2", B + 1000)))
    metrics = Metrics()
    dispatcher = Dispatcher(store, lease_s=60, heartbeat_s=0, now=clock, metrics=metrics,
                            backoff=Backoff(base_s=10))
    rival = Dispatcher(store, lease_s=60, heartbeat_s=0, now=clock)
    claimed_at = clock()
    with structlog.testing.capture_logs() as logs:
        assert dispatcher.run_once() == 3
    assert crm.started == ["org_hang:created"] and [c.clerk_id for c in mail.seen] == ["user_1", "user_2"]
    job = job_of(store, "org_hang")
    assert len(jobs(store)) == 1 and (job["status"], job["attempts"]) == ("running", 1)  # not finished nor failed
    (line,) = said(logs, OVERDUE)
    assert {k: line[k] for k in ("hook", "job", "type", "timeout_s")} == {
        "hook": "crm", "job": job["id"], "type": "organization.created", "timeout_s": 0.05}
    assert "values" not in str(line) and "Acme" not in str(line)  # not the payload
    assert metrics.hook_overdue.labels(hook="crm")._value.get() == 1

    clock.advance(50)
    assert dispatcher.extend_leases() == 1  # a beat, after the batch: the overdue job is still held
    assert lease_of(store, "org_hang") == claimed_at + timedelta(seconds=110)
    clock.advance(30)  # past the claim's own lease (60 s)
    assert rival.run_once() == 0
    deliver(store, f.envelope("user.created", f.user("user_3", B + 1000)))
    assert dispatcher.run_once() == 1  # a later batch runs while the handler still hangs
    assert [c.clerk_id for c in mail.seen][-1] == "user_3" and crm.started == ["org_hang:created"]
    assert [j["entity_key"].split("|")[0] for j in jobs(store)] == ["crm"]  # the mail jobs all finished

    crm.release.set()
    join_runs()
    assert dispatcher.run_once() == 0  # the next turn records the outcome
    if error is None:
        assert jobs(store) == []
        assert metrics.hook_runs.labels(hook="crm", outcome="ok")._value.get() == 1
    else:
        job = job_of(store, "org_hang")
        assert (job["status"], job["attempts"], job["last_error"]) == ("pending", 1, "RuntimeError: CRM timed out")
        assert metrics.hook_runs.labels(hook="crm", outcome="retry")._value.get() == 1
        clock.advance(10)  # the backoff's first delay
        crm.error = None
        assert dispatcher.run_once() == 1  # the retry (the handler is released: it returns at once)
        join_runs()
        dispatcher.run_once()  # (recorded now, were the retry's run overdue on a slow machine)
        assert jobs(store) == [] and crm.started == ["org_hang:created"] * 2
    assert crm.started[0] == "org_hang:created" and len(mail.seen) == 3
    store.dispose()


def test_a_later_job_of_the_same_entity_waits_for_the_overdue_one(db_url: str, crm: Hanging) -> None:
    """Order per entity holds: the organization's update is not claimed, here or by a second dispatcher,
    while its creation's run is overdue; it runs once that run's success is recorded."""
    clock = Clock()
    store = hooked(db_url, Hook("crm", crm, on=["organization.*"], timeout_s=0.05), now=clock)
    crm.hang = {"org_1"}
    deliver(store, org_created("org_1"),
            f.envelope("organization.updated", f.organization("org_1", B + 2000, name="Acme Ltd")))
    dispatcher = Dispatcher(store, lease_s=60, heartbeat_s=0, now=clock)
    rival = Dispatcher(store, lease_s=60, heartbeat_s=0, now=clock)
    assert dispatcher.run_once() == 1  # the creation only: the update waits behind it
    assert dispatcher.run_once() == 0 and rival.run_once() == 0
    assert [(j["type"], j["status"]) for j in jobs(store)] == [
        ("organization.created", "running"), ("organization.updated", "pending")]
    crm.release.set()
    join_runs()
    assert dispatcher.run_once() == 1  # records the creation, then claims the update
    join_runs()
    dispatcher.run_once()  # (recorded now, were the update's run overdue on a slow machine)
    assert crm.started == ["org_1:created", "org_1:updated"] and jobs(store) == []
    store.dispose()


@pytest.mark.parametrize("db_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_the_heartbeat_thread_keeps_an_overdue_jobs_lease_across_batches_and_polls(db_url: str, crm: Hanging) -> None:
    """The heartbeat (a real thread here) goes on after the batch whose run went overdue, through turns that
    claim nothing, for as long as the run lasts and until its outcome is recorded; it ends by itself once no
    overdue run is left."""
    clock = Clock()
    store = hooked(db_url, Hook("crm", crm, on=["organization.created"], timeout_s=0.05), now=clock)
    deliver(store, org_created("org_hang"))
    dispatcher = Dispatcher(store, lease_s=60, heartbeat_s=0.01, now=clock)
    assert dispatcher.run_once() == 1
    assert dispatcher.run_once() == 0  # a poll that finds nothing due
    clock.advance(45)
    deadline = time.monotonic() + 10
    while lease_of(store, "org_hang") < clock() + timedelta(seconds=60):
        assert time.monotonic() < deadline, "no beat extended the overdue job's lease"
        time.sleep(0.005)  # waiting for the beat, not for a threshold
    crm.release.set()
    join_runs()
    assert dispatcher.run_once() == 0 and jobs(store) == []  # recorded (done, or failed: due again later)
    while dispatcher._beater is not None:
        assert time.monotonic() < deadline, "the heartbeat outlived the overdue run"
        time.sleep(0.005)
    store.dispose()


def test_at_max_overdue_the_dispatcher_claims_nothing_new(db_url: str, crm: Hanging) -> None:
    """With ``max_overdue=1`` and two hanging jobs in one claim: once the first is overdue the second is
    given back unstarted (pending, its attempt not counted), no later turn claims anything until the first
    ends, and a log line says so, once, with what to do."""
    clock = Clock()
    store = hooked(db_url, Hook("crm", crm, on=["organization.created"], timeout_s=0.2), now=clock)
    deliver(store, org_created("org_a"), org_created("org_b"))
    dispatcher = Dispatcher(store, lease_s=60, heartbeat_s=0, now=clock, max_overdue=1)
    with structlog.testing.capture_logs() as logs:
        assert dispatcher.run_once() == 2
        assert dispatcher.run_once() == 0 and dispatcher.drain() == 0
    assert crm.started == ["org_a:created"]
    assert (job_of(store, "org_b")["status"], job_of(store, "org_b")["attempts"]) == ("pending", 0)
    (line,) = said(logs, AT_BOUND)
    assert line["max_overdue"] == 1 and line["released"] == 1 and line["jobs"] == [job_of(store, "org_a")["id"]]
    assert "timeout" in line["event"] and "raise the hook's timeout_s" in line["event"]
    crm.release.set()
    join_runs()
    assert dispatcher.run_once() == 1  # org_a recorded; org_b claimed and run (it returns at once now)
    join_runs()
    dispatcher.run_once()  # (recorded now, were org_b's run overdue on a slow machine)
    assert crm.started == ["org_a:created", "org_b:created"] and jobs(store) == []
    store.dispose()


# -- within the limit: as without one -------------------------------------------------------------------

@pytest.mark.parametrize(("error", "status"), [(None, None), (RuntimeError("down"), "pending")],
                         ids=["ok", "retry"])
def test_a_run_within_its_timeout_is_recorded_as_an_inline_run_is(
        db_url: str, error: Exception | None, status: str | None) -> None:
    clock = Clock()
    threads: list[str] = []

    def handler(change: Change) -> None:
        threads.append(threading.current_thread().name)
        if error is not None:
            raise error

    store = hooked(db_url, Hook("crm", handler, timeout_s=30), now=clock)
    deliver(store, f.envelope("user.created", f.user("user_1", B + 1000)))
    metrics = Metrics()
    assert Dispatcher(store, heartbeat_s=0, now=clock, metrics=metrics).run_once() == 1
    assert threads[0].startswith("clerk-sync-hook-crm-")  # a thread of its own
    assert [j["status"] for j in jobs(store)] == ([status] if status else [])
    assert metrics.hook_runs.labels(hook="crm", outcome="retry" if error else "ok")._value.get() == 1
    assert metrics.hook_overdue.labels(hook="crm")._value.get() == 0
    store.dispose()


# -- validation -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("timeout_s", [0, -1, math.nan, math.inf], ids=["zero", "negative", "nan", "inf"])
def test_a_hook_refuses_a_timeout_that_is_not_a_positive_number_of_seconds(timeout_s: float) -> None:
    with pytest.raises(ValueError, match="timeout_s must be None"):
        Hook("crm", lambda change: None, timeout_s=timeout_s)
    assert Hook("crm", lambda change: None).timeout_s is None
    assert Hook("crm", lambda change: None, timeout_s=2.5).timeout_s == 2.5


@pytest.mark.parametrize("max_overdue", [0, -1])
def test_a_dispatcher_refuses_max_overdue_below_one(max_overdue: int) -> None:
    store = Store(create_engine("sqlite://"), hooks=[Hook("noop", lambda change: None, timeout_s=1)])
    with pytest.raises(ValueError, match="max_overdue must be at least 1"):
        Dispatcher(store, max_overdue=max_overdue)
    assert Dispatcher(store, max_overdue=1).max_overdue == 1
    store.dispose()



# -- settle: a run left overdue at the end of `worker --once` ------------------------------------------------

def test_settle_waits_for_an_overdue_run_and_records_it(db_url: str, crm: Hanging) -> None:
    """Review finding: ``worker --once`` exited with a run overdue: the outcome was never recorded, the job
    stayed claimed until its lease and then ran again. ``settle`` waits for the run (the heartbeat keeping its
    lease), records it, and says how many it gave up on."""
    clock = Clock()
    store = hooked(db_url, Hook("crm", crm, on=["organization.created"], timeout_s=0.05), now=clock)
    deliver(store, org_created("org_hang"))
    metrics = Metrics()
    dispatcher = Dispatcher(store, lease_s=60, heartbeat_s=0, now=clock, metrics=metrics)
    assert dispatcher.drain() == 1
    assert job_of(store, "org_hang")["status"] == "running"  # overdue: claimed, not recorded
    assert dispatcher.settle(0.05) == 1  # still hanging: given up on, still claimed, nothing recorded
    assert job_of(store, "org_hang")["status"] == "running"
    assert metrics.hook_runs.labels(hook="crm", outcome="ok")._value.get() == 0
    threading.Timer(0.05, crm.release.set).start()  # the handler returns while settle waits for it
    assert dispatcher.settle(60) == 0
    assert jobs(store) == [] and crm.started == ["org_hang:created"]
    assert metrics.hook_runs.labels(hook="crm", outcome="ok")._value.get() == 1
    store.dispose()


def test_an_overdue_run_that_ended_keeps_its_lease_until_it_is_recorded(db_url: str, crm: Hanging) -> None:
    """Review: the heartbeat ended at its first beat after an overdue run ended, the outcome waiting for the
    dispatcher's next turn (a --poll later): a poll longer than the lease let the lease run out, and another
    dispatcher ran the handler again after it had succeeded. It beats until the run is recorded now."""
    clock = Clock()
    store = hooked(db_url, Hook("crm", crm, on=["organization.created"], timeout_s=0.05), now=clock)
    deliver(store, org_created("org_hang"))
    dispatcher = Dispatcher(store, lease_s=60, heartbeat_s=0.01, now=clock)
    assert dispatcher.run_once() == 1  # overdue: the batch ends, the job stays claimed
    crm.release.set()
    join_runs()  # it succeeded; no turn has recorded it
    clock.advance(45)
    deadline = time.monotonic() + 10
    while lease_of(store, "org_hang") < clock() + timedelta(seconds=60):
        assert time.monotonic() < deadline, "no beat extended the lease of the run that ended unrecorded"
        time.sleep(0.005)  # waiting for the beat, not for a threshold
    assert job_of(store, "org_hang")["status"] == "running"
    assert dispatcher.run_once() == 0 and jobs(store) == []  # the next turn records it
    while dispatcher._beater is not None:
        assert time.monotonic() < deadline, "the heartbeat outlived the recorded run"
        time.sleep(0.005)
    assert crm.started == ["org_hang:created"]
    store.dispose()


def test_a_stopping_dispatcher_records_the_overdue_runs_that_ended(db_url: str, crm: Hanging) -> None:
    """Review: a run that ended successfully after the dispatcher's last turn was not recorded when the loop
    stopped (a SIGTERM to `clerk-sync worker`, serve's shutdown): its job stayed claimed until the lease, then ran
    again elsewhere. The loop records what ended when it stops."""
    clock = Clock()
    store = hooked(db_url, Hook("crm", crm, on=["organization.created"], timeout_s=0.05), now=clock)
    deliver(store, org_created("org_hang"))
    dispatcher = Dispatcher(store, lease_s=60, heartbeat_s=0, poll_s=3600, now=clock)
    assert dispatcher.run_once() == 1  # overdue
    dispatcher._stop.set()  # a stop asked while the run lasts: the loop below makes one turn at most
    crm.release.set()
    join_runs()
    dispatcher.run_forever()  # returns at once (stopped): records what ended
    assert jobs(store) == [] and crm.started == ["org_hang:created"]
    store.dispose()
