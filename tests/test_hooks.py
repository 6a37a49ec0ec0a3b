"""After-commit hooks: outbox rows only for applied changes, dispatched at least once, in order per entity.

Everything runs on real SQLite and PostgreSQL (``store``/``db_url`` fixtures) with real deliveries
through ``WebhookProcessor``; the dispatcher's clock is a hand-moved :class:`Clock`, so backoff and
leases are tested without sleeping.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
import structlog.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clerk_sync.changes import BOOKKEEPING, Change, Hook, describe
from clerk_sync.engine import Entity, Upsert
from clerk_sync.errors import HookGaveUp
from clerk_sync.events import UserRecord, user_record
from clerk_sync.hooks import Backoff, Dispatcher
from clerk_sync.ingest import WebhookProcessor, replay_deliveries
from clerk_sync.metrics import Metrics
from clerk_sync.outbox import claim, delete_jobs, list_jobs, retry_jobs
from clerk_sync.reconcile import Reconciler
from clerk_sync.store import Store, create_engine
from clerk_sync.tables import hook_jobs, users
from clerk_sync.testing import EmulatorServer
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests._history import bodies, build_history, db_rows, specs
from tests.conftest import clerk_client

B = 1_800_000_000_000  # a realistic Clerk ms timestamp (small numbers read as seconds)


class Clock:
    """A datetime clock the test moves by hand (``clock.advance(5)``)."""

    def __init__(self, start: datetime | None = None) -> None:
        self.t = start or datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)


class Recorder:
    """A handler that records what it saw, and fails its first ``failures`` calls."""

    def __init__(self, failures: int = 0) -> None:
        self.seen: list[Change] = []
        self.failures = failures

    def __call__(self, change: Change) -> None:
        self.seen.append(change)
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("mail server down")

    @property
    def types(self) -> list[str]:
        return [c.type for c in self.seen]


def hooked(db_url: str, *hooks: Hook, now: Clock | None = None) -> Store:
    """A store with hooks; pass the dispatcher's clock as ``now`` so jobs are due when it says so."""
    return Store(create_engine(db_url), hooks=hooks, now=now or (lambda: datetime.now(UTC)))


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def hstore(db_url: str, recorder: Recorder) -> Iterator[Store]:
    s = hooked(db_url, Hook("all", recorder))
    yield s
    s.dispose()


def deliver(store: Store, *events: dict[str, Any]) -> list[str]:
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    out = []
    for event in events:
        headers, body = f.signed(event, f"msg_{uuid.uuid4().hex}")
        out.append(processor.process(headers, body).status)
    return out


def jobs(store: Store) -> list[dict[str, Any]]:
    with store.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(hook_jobs).order_by(hook_jobs.c.id)).mappings()]


# -- pure: what changed, who wants it ---------------------------------------------------------------

def test_describe_names_the_change_as_the_table_saw_it() -> None:
    row = {"clerk_id": "u1", "clerk_updated_at": 1, "role": "user", "email": "a@x"}
    newer = row | {"clerk_updated_at": 2}
    assert describe(Entity.USER, "u1", 1, None, row) == Change(Entity.USER, "u1", "created", 1, row)
    assert describe(Entity.USER, "u1", 2, row, newer) is None  # only the version moved: a no-op update
    promoted = describe(Entity.USER, "u1", 2, row, newer | {"role": "admin"})
    assert promoted is not None
    assert (promoted.type, promoted.previous, promoted.changed("role"), promoted.changed("email")) == (
        "user.updated", {"role": "user"}, True, False)
    assert describe(Entity.USER, "u1", 3, row, None) == Change(Entity.USER, "u1", "deleted", 3, row)
    assert describe(Entity.USER, "u1", 3, None, None) is None  # a tombstone for a row never seen


def test_describe_compares_values_as_json() -> None:
    """``true`` where ``1`` was is a change (JSON and PostgreSQL's jsonb tell them apart; Python's ``==`` does
    not), at any depth; ``1`` and ``1.0`` are the same number, and key order does not matter."""
    row = {"clerk_id": "u1", "clerk_updated_at": 1, "public_metadata": {"beta": 1, "tags": [0, {"a": 1}]}}

    def meta(value: object) -> dict[str, object]:
        return row | {"clerk_updated_at": 2, "public_metadata": value}

    flipped = describe(Entity.USER, "u1", 2, row, meta({"beta": True, "tags": [0, {"a": 1}]}))
    assert flipped is not None and flipped.previous == {"public_metadata": row["public_metadata"]}
    assert describe(Entity.USER, "u1", 2, row, meta({"beta": 1, "tags": [False, {"a": 1}]})) is not None
    assert describe(Entity.USER, "u1", 2, row, meta({"beta": 1, "tags": [0, {"a": True}]})) is not None
    assert describe(Entity.USER, "u1", 2, row, meta({"tags": [0, {"a": 1.0}], "beta": 1.0})) is None


def test_hook_matching_and_validation() -> None:
    change = Change(Entity.USER, "u1", "updated", 2, {"role": "admin"}, {"role": "user"})
    assert Hook("a", print, on=["user.updated"], fields=["role"]).wants(change)
    assert not Hook("b", print, on=["user.updated"], fields=["email"]).wants(change)
    assert Hook("c", print, on=["user.*"]).wants(change)
    assert not Hook("d", print, on=["organizationMembership.deleted"]).wants(change)
    assert Hook("e", print, fields=["email"]).wants(Change(Entity.USER, "u1", "created", 1, {}))
    assert change.idempotency_key == "user.updated:u1:2"
    assert Change.from_json(change.to_json()) == change
    with pytest.raises(ValueError, match="unknown change type"):
        Hook("x", print, on=["user.create"])
    with pytest.raises(TypeError, match="take a list"):
        Hook("x", print, on="user.created")
    with pytest.raises(ValueError, match="unique"):
        Store(sa.create_engine("sqlite://"), hooks=[Hook("x", print), Hook("x", print)])


def test_hook_fields_and_on_are_checked_against_the_changes_they_could_match() -> None:
    """Review finding: a typo, a Clerk-style name (``email_address``, ``firstName``) or a bookkeeping field in
    ``fields`` was accepted, and the hook then never ran for an update; ``on=[]`` never ran at all."""
    for wrong in (["emial"], ["email_address"], ["firstName"], ["clerk_updated_at"], ["lock_version"],
                  ["clerk_id"], ["role", "plan"]):
        with pytest.raises(ValueError, match=r"unknown field\(s\).*first_name") as raised:
            Hook("crm", print, on=["user.updated"], fields=wrong)
        assert "role" not in str(raised.value).split("unknown field(s)")[1].split("]")[0]  # only the wrong ones
    with pytest.raises(ValueError, match=r"\['slug'\].*for user: "):  # an organization's field, on user changes
        Hook("crm", print, on=["user.*"], fields=["slug"])
    with pytest.raises(ValueError, match="'on' is empty"):
        Hook("crm", print, on=[])
    with pytest.raises(ValueError, match="events have no fields"):
        Hook("billing", print, on=["subscription.*"], fields=["role"])
    # every name a change of a covered entity carries and may change is accepted
    assert Hook("a", print, on=["organization.updated", "user.updated"], fields=["slug", "email"]).fields
    assert Hook("b", print, on=["organizationMembership.*"], fields=["role", "permissions"]).fields
    assert Hook("c", print, fields=["name", "first_name", "public_metadata", "locked_until"]).fields


@pytest.mark.parametrize("name", ["external_id", "email_verified", "lockout_pending_s"])
def test_a_carried_field_in_hook_fields_is_refused_saying_why(name: str) -> None:
    """Review finding: a user's ``external_id``, ``email_verified`` and ``lockout_pending_s`` have no column, so
    no previous value: a change to one alone is no change (``describe``), and a hook narrowed to one never ran
    for it. Refused, saying why and what to do instead."""
    with pytest.raises(ValueError, match=rf"\['{name}'\].*no column.*Change\.values.*MappedTable"):
        Hook("crm", print, on=["user.updated"], fields=["role", name])
    before = {"clerk_id": "u1", "clerk_updated_at": 1, "role": "user"}
    assert describe(Entity.USER, "u1", 2, before, before | {"clerk_updated_at": 2, name: "x"}) is None  # as said


# -- the outbox is written in the apply's transaction, only for applied changes -----------------------

def test_jobs_only_for_applied_changes(hstore: Store) -> None:
    created = f.envelope("user.created", f.user("user_1", B + 1000))
    statuses = deliver(
        hstore,
        created,
        created,  # same event re-sent under a new svix id: stale
        f.envelope("user.updated", f.user("user_1", B + 900, role="admin")),  # older: stale
        f.envelope("user.updated", f.user("user_1", B + 2000)),  # newer, same values: no-op update
        f.envelope("user.updated", f.user("user_1", B + 3000, role="admin")),
        f.envelope("user.deleted", f.deleted("user", "user_1"), B + 4000),
        f.envelope("user.deleted", f.deleted("user", "user_1"), B + 5000),  # already deleted
        f.envelope("user.deleted", f.deleted("user", "user_never_seen"), B + 5000),
    )
    assert statuses == ["applied", "skipped", "skipped", "applied", "applied", "applied", "skipped", "applied"]
    queued = jobs(hstore)
    assert [j["type"] for j in queued] == ["user.created", "user.updated", "user.deleted"]
    assert queued[1]["payload"]["previous"] == {"role": "user", "public_metadata": {}}
    assert {j["idempotency_key"] for j in queued} == {
        f"user.created:user_1:{B + 1000}", f"user.updated:user_1:{B + 3000}", f"user.deleted:user_1:{B + 4000}"}


def test_reordered_update_is_the_creation_and_the_late_create_fires_nothing(hstore: Store) -> None:
    deliver(hstore, f.envelope("user.updated", f.user("user_1", 2000, role="admin")),
            f.envelope("user.created", f.user("user_1", 1000)))
    assert [(j["type"], j["payload"]["values"]["role"]) for j in jobs(hstore)] == [("user.created", "admin")]


def test_user_delete_cascades_to_membership_deleted_changes(db_url: str) -> None:
    seen = Recorder()
    store = hooked(db_url, Hook("left-org", seen, on=["organizationMembership.deleted"]))
    deliver(store, f.envelope("organizationMembership.created", f.membership("orgmem_1", "org_1", "user_1", 1000)),
            f.envelope("organizationMembership.created", f.membership("orgmem_2", "org_1", "user_2", 1000)),
            f.envelope("user.deleted", f.deleted("user", "user_1"), 2000))
    Dispatcher(store).drain()
    assert [(c.type, c.clerk_id, c.values["user_clerk_id"]) for c in seen.seen] == [
        ("organizationMembership.deleted", "orgmem_1", "user_1")]
    store.dispose()


def test_a_failed_apply_leaves_no_job(hstore: Store) -> None:
    recorded: list[Change] = []

    def apply_then_fail() -> None:
        with hstore.transaction() as writer:
            writer.apply(Upsert(Entity.USER, user_record(f.user("user_1", B + 1000))))
            assert writer.outbox is not None
            recorded.extend(writer.outbox.changes)
            raise RuntimeError("rolled back after the apply")

    with pytest.raises(RuntimeError):
        apply_then_fail()
    assert [c.type for c in recorded] == ["user.created"]
    assert jobs(hstore) == []


# -- dispatch: retries, backoff, dead jobs, order per entity ---------------------------------------------

def test_handler_gets_the_change_after_commit(hstore: Store, recorder: Recorder) -> None:
    def handler(change: Change) -> None:
        with hstore.connect() as conn:  # the row is already committed when the handler runs
            role = conn.execute(sa.select(users.c.role).where(users.c.clerk_id == change.clerk_id)).scalar_one()
        recorder(change)
        assert role == "admin"

    deliver(hstore, f.envelope("user.created", f.user("user_1", 1000, role="admin")))
    dispatcher = Dispatcher(Store(hstore.engine, hooks=[Hook("all", handler)]))
    assert dispatcher.drain() == 1
    (change,) = recorder.seen
    assert (change.type, change.values["email"], change.idempotency_key) == (
        "user.created", "user_1@example.com", "user.created:user_1:1000")
    assert jobs(hstore) == []  # done jobs are deleted


def test_retries_with_backoff_then_dead_then_retry_and_purge(db_url: str) -> None:
    flaky = Recorder(failures=100)
    clock = Clock()
    store = hooked(db_url, Hook("mail", flaky, on=["user.created"]), now=clock)
    dispatcher = Dispatcher(store, backoff=Backoff(max_attempts=3, base_s=10, max_s=15), now=clock)
    deliver(store, f.envelope("user.created", f.user("user_1", 1000)))
    assert dispatcher.run_once() == 1
    assert dispatcher.run_once() == 0  # waits out the backoff
    clock.advance(9)
    assert dispatcher.run_once() == 0
    clock.advance(1)
    assert dispatcher.run_once() == 1  # second attempt at +10 s
    clock.advance(15)  # capped at max_s (20 s uncapped)
    assert dispatcher.run_once() == 1
    (job,) = jobs(store)
    assert (job["status"], job["attempts"], job["last_error"]) == ("dead", 3, "RuntimeError: mail server down")
    clock.advance(3600)
    assert dispatcher.run_once() == 0  # dead jobs stay dead
    with store.transaction() as writer:
        assert [j.change.type for j in list_jobs(writer.conn)] == ["user.created"]
        assert retry_jobs(writer.conn, clock()) == 1
    flaky.failures = 0
    assert dispatcher.drain() == 1
    assert len(flaky.seen) == 4 and jobs(store) == []
    deliver(store, f.envelope("user.created", f.user("user_2", 1000)))
    flaky.failures = 100
    for _ in range(3):
        dispatcher.run_once()
        clock.advance(60)
    with store.transaction() as writer:
        assert delete_jobs(writer.conn) == 1
    assert jobs(store) == []
    store.dispose()


def test_order_per_entity_and_other_entities_go_on(db_url: str) -> None:
    handler = Recorder()
    clock = Clock()
    store = hooked(db_url, Hook("sync", handler), now=clock)
    dispatcher = Dispatcher(store, backoff=Backoff(max_attempts=2, base_s=5), now=clock)
    deliver(store, f.envelope("user.created", f.user("user_1", 1000)),
            f.envelope("user.updated", f.user("user_1", 2000, role="admin")),
            f.envelope("user.created", f.user("user_2", 1000)))
    handler.failures = 1
    assert dispatcher.run_once() == 2  # user_1's creation (fails) and user_2's; user_1's update waits
    assert dispatcher.run_once() == 0
    clock.advance(5)
    assert dispatcher.drain() == 2
    assert [(c.clerk_id, c.type) for c in handler.seen] == [
        ("user_1", "user.created"), ("user_2", "user.created"), ("user_1", "user.created"), ("user_1", "user.updated")]
    store.dispose()


def test_a_dispatcher_leaves_the_jobs_of_a_hook_it_lacks_pending(db_url: str) -> None:
    """Hooks walkthrough: a worker without hook "gone" (an older release, mid-deploy) marked its jobs dead on
    the first attempt; it now claims only its own hooks' jobs (tests/test_hooks_claim_own_hooks.py has more)."""
    store = hooked(db_url, Hook("gone", Recorder()), Hook("kept", Recorder()))
    deliver(store, f.envelope("user.created", f.user("user_1", 1000)))
    dispatcher = Dispatcher(Store(store.engine, hooks=[Hook("kept", Recorder())]))
    assert dispatcher.drain() == 1
    (job,) = jobs(store)
    assert (job["hook"], job["status"], job["attempts"], job["last_error"]) == ("gone", "pending", 0, None)
    # what says so: doctor --freshness (and the console) name the hook of the job that waits, and the way out
    from clerk_sync.freshness import check_freshness, read_snapshot

    later = time.time() + 3600
    (hooks_line,) = [c for c in check_freshness(read_snapshot(store), now=later, max_delivery_age_s=None, max_failed=0,
                                                max_reconcile_age_s=1e9, max_hook_wait_s=900) if c.name == "hook jobs"]
    assert hooks_line.status == "fail" and "the oldest due job (hook 'gone') has waited" in hooks_line.detail
    assert "hooks purge --hook NAME" in hooks_line.detail
    store.dispose()


def test_a_retried_dead_job_waits_behind_its_entitys_running_job(db_url: str) -> None:
    """Review finding: ``hooks retry`` set a dead job back to pending under its old (lower) id, which made it
    its entity's first unfinished job again while a later job of that entity was running: both were
    claimed, two handlers of one user at once. It is queued at the tail now, behind what is unfinished."""
    clock, handler = Clock(), Recorder(failures=1)
    store = hooked(db_url, Hook("sync", handler), now=clock)
    deliver(store, f.envelope("user.created", f.user("user_1", B + 1000)),
            f.envelope("user.updated", f.user("user_1", B + 2000, role="admin")))
    assert Dispatcher(store, backoff=Backoff(max_attempts=1), batch=1, now=clock).run_once() == 1
    assert [(j["status"], j["payload"]["version"]) for j in jobs(store)] == [("dead", B + 1000), ("pending", B + 2000)]
    with store.transaction() as writer:  # a worker claims the update and is running its handler
        (running,) = claim(writer.conn, clock(), lease=timedelta(seconds=60), limit=10, max_attempts=10)
    with store.transaction() as writer:
        assert retry_jobs(writer.conn, clock()) == 1
        assert retry_jobs(writer.conn, clock()) == 0  # queued once
    clock.advance(1)
    with store.transaction() as writer:
        assert claim(writer.conn, clock(), lease=timedelta(seconds=60), limit=10, max_attempts=10) == []
    retried = [j for j in jobs(store) if j["status"] == "pending"]
    assert len(retried) == 1 and retried[0]["id"] > running.id and retried[0]["attempts"] == 0
    assert retried[0]["idempotency_key"] == f"user.created:user_1:{B + 1000}"  # the same change, the same key
    clock.advance(120)  # the worker died: its job is taken over first, the retried one runs after it
    handler.failures = 0
    assert Dispatcher(store, now=clock).drain() == 2
    assert [c.version for c in handler.seen] == [B + 1000, B + 2000, B + 1000] and jobs(store) == []
    store.dispose()


def test_a_huge_attempt_count_backs_off_without_overflow(db_url: str) -> None:
    """Review finding: ``Backoff.delay`` computed ``2.0 * 2 ** 1025`` (OverflowError) for a max_attempts in
    the thousands, inside the batch: a handler that had succeeded beside it was never finished, ran again."""
    assert Backoff(base_s=2.0, max_s=3600).delay(5000) == timedelta(hours=1)
    for bad in ({"max_s": float("inf")}, {"max_s": 1e12}, {"base_s": float("nan")}):  # (review: still overflowed)
        with pytest.raises(ValueError, match="a year"):
            Backoff(**bad)  # type: ignore[arg-type]
    clock, ok = Clock(), Recorder()
    store = hooked(db_url, Hook("a", ok), Hook("b", Recorder(failures=10**6)), now=clock)
    deliver(store, f.envelope("user.created", f.user("user_1", B + 1000)))
    with store.transaction() as writer:
        writer.conn.execute(hook_jobs.update().where(hook_jobs.c.hook == "b").values(attempts=1025))
    assert Dispatcher(store, backoff=Backoff(max_attempts=5000), now=clock).run_once() == 2
    assert len(ok.seen) == 1 and [(j["hook"], j["status"], j["attempts"]) for j in jobs(store)] == [("b", "pending", 1026)]
    store.dispose()


def test_a_handler_that_gives_up_leaves_its_job_dead_at_once(db_url: str) -> None:
    def refuse(change: Change) -> None:
        raise HookGaveUp("the CRM says this account is closed for good")

    clock = Clock()
    store = hooked(db_url, Hook("crm", refuse), now=clock)
    deliver(store, f.envelope("user.created", f.user("user_1", B + 1000)))
    metrics = Metrics()
    assert Dispatcher(store, backoff=Backoff(max_attempts=10), now=clock, metrics=metrics).run_once() == 1
    (job,) = jobs(store)
    assert (job["status"], job["attempts"]) == ("dead", 1)
    assert job["last_error"] == "HookGaveUp: the CRM says this account is closed for good"
    assert metrics.hook_runs.labels(hook="crm", outcome="dead")._value.get() == 1
    store.dispose()


def test_a_failure_after_the_claim_was_lost_is_not_recorded_as_this_runs(db_url: str) -> None:
    """A handler that fails after its lease ran out and another dispatcher took the job: the job is the other
    dispatcher's, so this run records nothing and counts ``lost`` (not ``retry`` or ``dead``)."""
    clock = Clock()
    holder: list[Dispatcher] = []

    def slow_then_fail(change: Change) -> None:
        clock.advance(61)  # the handler outlives its lease; another dispatcher takes the job meanwhile
        with store.transaction() as writer:
            assert len(claim(writer.conn, clock(), lease=timedelta(seconds=60), limit=10, max_attempts=10)) == 1
        raise RuntimeError("timeout")

    store = hooked(db_url, Hook("slow", slow_then_fail), now=clock)
    deliver(store, f.envelope("user.created", f.user("user_1", B + 1000)))
    metrics = Metrics()
    holder.append(Dispatcher(store, lease_s=60, heartbeat_s=0, now=clock, metrics=metrics))
    assert holder[0].run_once() == 1
    (job,) = jobs(store)
    assert (job["status"], job["attempts"], job["last_error"]) == ("running", 2, None)  # the other claim's
    assert metrics.hook_runs.labels(hook="slow", outcome="lost")._value.get() == 1
    store.dispose()


@pytest.mark.parametrize(("skew_s", "taken_over"), [(35, False), (45, True)])
def test_a_replica_whose_clock_runs_ahead_by_more_than_the_lease_minus_the_heartbeat_takes_a_running_job_over(
        db_url: str, skew_s: int, taken_over: bool) -> None:
    """docs/RUNBOOK.md said a clock "a lease ahead": a beat renews the lease to its time + lease, and the next
    beat is a heartbeat away, so a replica ahead by more than lease - heartbeat (40 s of the default 60 s) takes
    a job over from a dispatcher that beats as it should. The lost claim's log line names the clocks."""
    true = Clock()
    calls: list[str] = []

    def slow(change: Change) -> None:
        calls.append(change.idempotency_key)
        if len(calls) > 1:
            return  # the rival's run of the job it took over
        true.advance(20)
        assert dispatcher.extend_leases() == 1  # the beat at 20 s (heartbeat: a third of the 60 s lease)
        true.advance(19)  # just before the next one
        taken.append(rival.run_once())

    taken: list[int] = []
    behind, ahead = (lambda: true() - timedelta(seconds=skew_s)), true
    store = hooked(db_url, Hook("slow", slow), now=behind)
    rival_store = hooked(db_url, Hook("slow", slow), now=ahead)
    deliver(store, f.envelope("user.created", f.user("user_1", B + 1000)))
    dispatcher = Dispatcher(store, lease_s=60, heartbeat_s=0, now=behind)
    rival = Dispatcher(rival_store, lease_s=60, heartbeat_s=0, now=ahead)
    with structlog.testing.capture_logs() as logs:
        assert dispatcher.run_once() == 1
    assert (taken, len(calls)) == (([1], 2) if taken_over else ([0], 1))
    lost = [entry["event"] for entry in logs if entry["event"].startswith("hook claims lost")]
    assert len(lost) == taken_over
    if taken_over:
        assert "clock" in lost[0] and "lease_s minus heartbeat_s" in lost[0]
    store.dispose()
    rival_store.dispose()


def test_an_expired_lease_is_taken_over_with_the_same_idempotency_key(hstore: Store, recorder: Recorder) -> None:
    deliver(hstore, f.envelope("user.created", f.user("user_1", 1000)))
    clock = Clock()  # after the delivery: the job is due
    with hstore.transaction() as writer:  # a worker claims the job, then dies before finishing it
        (lost,) = claim(writer.conn, clock(), lease=timedelta(seconds=30), limit=10, max_attempts=5)
    dispatcher = Dispatcher(hstore, lease_s=30, now=clock)
    assert dispatcher.run_once() == 0  # leased
    clock.advance(31)
    assert dispatcher.run_once() == 1
    assert [c.idempotency_key for c in recorder.seen] == [lost.change.idempotency_key]
    assert jobs(hstore) == []


# -- replay and reconcile fire nothing unless asked ------------------------------------------------------

def test_replay_fires_hooks_only_when_asked(hstore: Store, recorder: Recorder) -> None:
    deliver(hstore, f.envelope("user.created", f.user("user_1", 1000)))
    Dispatcher(hstore).drain()
    with hstore.transaction() as writer:  # pretend the delivery failed, and the row was lost
        writer.conn.execute(sa.text("UPDATE webhook_events SET status = 'failed'"))
        writer.conn.execute(users.delete())
    assert replay_deliveries(hstore).by_status == {"applied": 1}
    assert jobs(hstore) == []
    with hstore.transaction() as writer:
        writer.conn.execute(sa.text("UPDATE webhook_events SET status = 'failed'"))
        writer.conn.execute(users.delete())
    assert replay_deliveries(hstore, with_hooks=True).by_status == {"applied": 1}
    assert [j["type"] for j in jobs(hstore)] == ["user.created"]


# -- the property: at least once, exactly once with the key, under duplicates and reordering ----------

def fold(changes: list[Change]) -> dict[tuple[str, str], Any]:
    """Rebuild the live rows from the changes a handler saw, in the order it saw them."""
    state: dict[tuple[str, str], Any] = {}
    for change in changes:
        state[(change.entity.value, change.clerk_id)] = None if change.kind == "deleted" else change.values
    return {k: without_version(v) for k, v in state.items() if v is not None}


# Fields a change carries that the contract table does not mirror (a user's external_id, email_verified).
_CARRIED = frozenset(f.name for f in dataclasses.fields(UserRecord) if not f.metadata.get("column", True))


def without_version(values: dict[str, Any]) -> dict[str, Any]:
    """A no-op update (newer version, same values) moves only the bookkeeping (clerk_updated_at, lock_version),
    and fires nothing; a change also carries fields the contract table does not mirror."""
    return {k: v for k, v in values.items() if k not in BOOKKEEPING and k not in _CARRIED}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.lists(st.tuples(st.integers(0, 5), st.booleans(), st.integers(0, 3)), min_size=1, max_size=30),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_applied_change_reaches_the_handler_once_per_key(db_url: str, steps: list[Any], seed: int) -> None:
    """Deliver a history shuffled with duplicates and re-sends, dispatching between deliveries with a
    handler that fails at random; the changes it acted on (deduplicated by idempotency key) rebuild
    exactly the live rows, every entity is created at most once, and no key acts twice."""
    rng = random.Random(seed)
    ns = uuid.uuid4().hex[:8]
    history = build_history(specs(2, 2, [(0, 0), (1, 1)]), steps)
    events = bodies(history, ns)
    deliveries = [(f"msg_{ns}_{i}", b) for i, b in enumerate(events)]
    deliveries += rng.sample(deliveries, len(deliveries) // 2)  # Svix re-sends (same id)
    deliveries += [(f"msg_{ns}_again_{i}", b) for i, b in enumerate(rng.sample(events, len(events) // 3))]
    rng.shuffle(deliveries)

    acted: dict[str, Change] = {}
    calls: list[str] = []

    def idempotent(change: Change) -> None:
        calls.append(change.idempotency_key)
        if rng.random() < 0.3:
            raise RuntimeError("flaky before acting")
        acted.setdefault(change.idempotency_key, change)  # the side effect, keyed
        if rng.random() < 0.2:
            raise RuntimeError("flaky after acting")

    clock = Clock()
    store = hooked(db_url, Hook("sync", idempotent), now=clock)
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    dispatcher = Dispatcher(store, backoff=Backoff(max_attempts=50, base_s=1, max_s=1), now=clock)
    for svix_id, body in deliveries:
        headers, _ = f.signed(body, svix_id)
        processor.process(headers, body)
        if rng.random() < 0.3:
            dispatcher.run_once()
            clock.advance(1)
    while jobs(store):
        dispatcher.drain()
        clock.advance(1)
    with store.connect() as conn:
        live = {k: without_version(v) for k, v in db_rows(conn, ns).items() if v is not None}
    ordered = sorted(acted.values(), key=lambda c: calls.index(c.idempotency_key))
    assert fold(ordered) == live
    created = [(c.entity, c.clerk_id) for c in acted.values() if c.kind == "created"]
    assert len(created) == len(set(created))
    assert set(calls) == set(acted)  # every key a handler was called with was eventually acted on
    store.dispose()



def test_reconcile_fires_hooks_only_when_asked(hstore: Store, emu: EmulatorServer) -> None:
    ada = emu.create_user(email="ada@example.com", first_name="Ada")
    emu.create_organization("Acme", created_by=ada["id"])  # with ada's membership
    with clerk_client(emu) as clerk:
        first = Reconciler(hstore, clerk, page_size=50).run()
        assert (first.counts["users"].created, first.counts["organization_memberships"].created) == (1, 1)
        assert jobs(hstore) == []  # repairs are not news: no welcome mail from a reconcile
        with hstore.transaction() as writer:  # drift: the row went missing
            writer.conn.execute(users.delete())
        Reconciler(hstore, clerk, page_size=50, with_hooks=True).run()
    # The organization and the membership were still mirrored: unchanged, so no job either.
    assert [(j["type"], j["payload"]["clerk_id"]) for j in jobs(hstore)] == [("user.created", ada["id"])]


def test_a_batch_that_outlives_its_lease_gives_the_rest_back(db_url: str) -> None:
    seen: list[str] = []
    clock = Clock()

    def slow(change: Change) -> None:
        seen.append(change.clerk_id)
        clock.advance(25)  # each handler takes 25 s of the 60 s lease

    store = hooked(db_url, Hook("slow", slow), now=clock)
    deliver(store, *[f.envelope("user.created", f.user(f"user_{n}", B + 1000)) for n in range(4)])
    dispatcher = Dispatcher(store, lease_s=60, now=clock)
    assert dispatcher.run_once() == 4
    assert seen == ["user_0", "user_1"]  # the third would start at 50 s, past 80 % of the lease
    assert [(j["status"], j["attempts"]) for j in jobs(store)] == [("pending", 0), ("pending", 0)]
    assert dispatcher.drain() == 2
    assert seen == ["user_0", "user_1", "user_2", "user_3"]
    store.dispose()


def test_claims_grow_with_fast_handlers_and_shrink_with_slow_ones(db_url: str) -> None:
    """A claim asks for what the handlers run in a tenth of the lease (10 at first, ``batch`` at most):
    fast handlers get large claims (fewer statements a job), slow ones small claims, none given back."""
    clock = Clock()
    pace = [0.001]

    def handler(change: Change) -> None:
        clock.advance(pace[0])

    store = hooked(db_url, Hook("paced", handler), now=clock)
    deliver(store, *[f.envelope("user.created", f.user(f"user_{n}", B + 1000)) for n in range(40)])
    dispatcher = Dispatcher(store, lease_s=60, batch=25, now=clock)
    assert dispatcher.claim_limit == 10
    assert dispatcher.run_once() == 10  # nothing known about the handlers yet
    assert dispatcher.claim_limit == 25  # 6 s of 1 ms handlers is more than the most a claim takes
    assert dispatcher.run_once() == 25
    pace[0] = 2.0  # the handlers slow down (a sink takes 2 s an answer)
    assert dispatcher.run_once() == 5
    assert dispatcher.claim_limit < 25
    limit = dispatcher.claim_limit
    assert dispatcher.run_once() == 0  # all 40 ran: the slow batch took all it was given, none given back
    assert limit == int(6 / ((0.001 + 2.0) / 2))  # a 6 s tenth of the lease at the mean pace of the two batches
    assert jobs(store) == []
    store.dispose()


def test_a_dispatcher_thread_keeps_claiming_while_small_claims_come_back_full(db_url: str) -> None:
    """Slow handlers make claims small; a full small claim is not "the queue is empty", so the thread goes on
    without its poll pause (an hour here: the test would time out if it paused)."""
    clock = Clock()
    done = threading.Event()
    seen: list[str] = []

    def slow(change: Change) -> None:
        clock.advance(5)  # a tenth of the 60 s lease holds one such job
        seen.append(change.clerk_id)
        if len(seen) == 12:
            done.set()

    store = hooked(db_url, Hook("slow", slow), now=clock)
    deliver(store, *[f.envelope("user.created", f.user(f"user_{n}", B + 1000)) for n in range(12)])
    dispatcher = Dispatcher(store, lease_s=60, poll_s=3600, heartbeat_s=0, now=clock)
    dispatcher.start()
    try:
        assert done.wait(60), f"the thread paused after a full claim: {len(seen)} of 12 ran"
        assert dispatcher.claim_limit == 1
    finally:
        dispatcher._stop.set()  # not stop(): joining would wait for the hour-long poll
    assert sorted(seen) == sorted(f"user_{n}" for n in range(12))
    store.dispose()


def test_a_dispatcher_refuses_a_batch_below_one(db_url: str) -> None:
    store = hooked(db_url, Hook("noop", lambda change: None))
    with pytest.raises(ValueError, match="batch must be at least 1"):
        Dispatcher(store, batch=0)
    store.dispose()


# -- lease heartbeat: a slow handler keeps its job -------------------------------------------------------

def _lease_of(store: Store) -> datetime:
    with store.connect() as conn:
        value = conn.execute(sa.select(hook_jobs.c.lease_until)).scalar_one()
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@pytest.mark.parametrize("heartbeat", [True, False], ids=["heartbeat", "none"])
def test_a_slow_handler_keeps_its_job_while_the_heartbeat_extends_the_lease(db_url: str, heartbeat: bool) -> None:
    """A handler that runs past its lease: with the heartbeat's extensions another dispatcher finds nothing
    to claim and the job runs once; without them it is taken over (and the first claim is lost)."""
    clock = Clock()
    calls: list[str] = []
    other: list[int] = []

    def slow(change: Change) -> None:
        calls.append(change.idempotency_key)
        if len(calls) > 1:
            return  # the second dispatcher's run of a job taken over
        for _ in range(3):  # 3 x 25 s: past the 60 s lease
            clock.advance(25)
            if heartbeat:
                assert dispatcher.extend_leases() == 1  # what the heartbeat thread does every lease_s / 3
            other.append(rival.run_once())

    store = hooked(db_url, Hook("slow", slow), now=clock)
    deliver(store, f.envelope("user.created", f.user("user_slow", B + 1000)))
    dispatcher = Dispatcher(store, lease_s=60, heartbeat_s=0, now=clock)
    rival = Dispatcher(store, lease_s=60, heartbeat_s=0, now=clock)
    with structlog.testing.capture_logs() as logs:
        assert dispatcher.run_once() == 1
    if heartbeat:
        assert (other, len(calls), jobs(store)) == ([0, 0, 0], 1, [])
    else:
        assert (other, len(calls), jobs(store)) == ([0, 0, 1], 2, [])  # taken over at 75 s: ran twice
        assert any(entry["event"].startswith("hook claims lost") for entry in logs)
    store.dispose()


def test_the_heartbeat_thread_extends_the_running_jobs_lease(db_url: str) -> None:
    clock = Clock()
    seen: list[datetime] = []

    def slow(change: Change) -> None:
        clock.advance(45)  # the clock moves; the next beat leases until clock + 60 s
        deadline = time.monotonic() + 10
        while _lease_of(store) < clock() + timedelta(seconds=60) and time.monotonic() < deadline:
            time.sleep(0.005)  # waiting for the beat, not for a threshold
        seen.append(_lease_of(store))

    store = hooked(db_url, Hook("slow", slow), now=clock)
    deliver(store, f.envelope("user.created", f.user("user_beat", B + 1000)))
    dispatcher = Dispatcher(store, lease_s=60, heartbeat_s=0.01, now=clock)
    claimed_at = clock()
    assert dispatcher.run_once() == 1
    assert seen == [claimed_at + timedelta(seconds=105)] and jobs(store) == []
    store.dispose()



def _lease_of_entity(store: Store, clerk_id: str) -> datetime:
    with store.connect() as conn:
        value = conn.execute(sa.select(hook_jobs.c.lease_until).where(
            hook_jobs.c.entity_key.endswith(f":{clerk_id}"))).scalar_one()
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@pytest.mark.parametrize(("heartbeat_s", "last_beat", "started"), [(None, 40, 45), (15, 45, 46)],
                         ids=["a-third-of-the-lease", "a-quarter"])
def test_a_job_started_late_in_its_batch_has_its_lease_extended_before_it_runs(
        db_url: str, heartbeat_s: float | None, last_beat: int, started: int) -> None:
    """B starts after the heartbeat's last beat (at ``last_beat`` s) but before 80 % of its claim's 60 s
    lease, so it runs; the next beat would come at 60 s, when the lease ends, and a rival could take the job
    while it runs. Its lease is extended as it starts instead. The heartbeat's real-time thread does not beat
    here (its period is seconds of real time): its beats are the test's ``extend_leases()`` calls."""
    clock = Clock()
    at_start: dict[str, datetime] = {}
    rival_took: list[int] = []

    def handler(change: Change) -> None:
        at_start[change.clerk_id] = _lease_of_entity(store, change.clerk_id)
        if change.clerk_id == "user_a":
            clock.advance(last_beat)
            assert dispatcher.extend_leases() == 1  # the beat while A runs (B is not held yet)
            clock.advance(started - last_beat)
            return
        clock.advance(61 - started)  # past B's claim-time lease
        rival_took.append(rival.run_once())

    store = hooked(db_url, Hook("h", handler), now=clock)
    deliver(store, f.envelope("user.created", f.user("user_a", B + 1000)),
            f.envelope("user.created", f.user("user_b", B + 1000)))
    dispatcher = Dispatcher(store, lease_s=60, heartbeat_s=heartbeat_s, now=clock)
    rival = Dispatcher(store, lease_s=60, heartbeat_s=0, now=clock)
    claimed_at = clock()
    assert dispatcher.run_once() == 2
    assert at_start == {"user_a": claimed_at + timedelta(seconds=60),  # early: left as claimed
                        "user_b": claimed_at + timedelta(seconds=started + 60)}  # late: extended before it ran
    assert rival_took == [0] and jobs(store) == []  # B ran once, and its claim was not lost
    store.dispose()


def test_a_job_whose_claim_was_lost_before_it_started_is_not_run_again(db_url: str) -> None:
    """A rival whose clock runs 20 s ahead takes B while A runs (B's lease ended, for it); when B's turn
    comes, extending its lease finds the claim gone: B is not run a second time."""
    clock = Clock()
    calls: list[str] = []

    def handler(change: Change) -> None:
        calls.append(change.clerk_id)
        if change.clerk_id == "user_a" and len(calls) == 1:
            clock.advance(40)
            dispatcher.extend_leases()  # a beat: A's lease goes on, B is not held yet
            clock.advance(5)
            assert rival.run_once() == 1

    store = hooked(db_url, Hook("h", handler), now=clock)
    deliver(store, f.envelope("user.created", f.user("user_a", B + 1000)),
            f.envelope("user.created", f.user("user_b", B + 1000)))
    dispatcher = Dispatcher(store, lease_s=60, now=clock)
    rival = Dispatcher(store, lease_s=60, heartbeat_s=0, now=lambda: clock() + timedelta(seconds=20))
    with structlog.testing.capture_logs() as logs:
        assert dispatcher.run_once() == 2
    assert calls == ["user_a", "user_b"] and jobs(store) == []
    assert [entry["job"] for entry in logs if entry["event"].startswith("hook claim lost before")] == [2]
    store.dispose()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lease_s": 0}, "lease_s must be more than 0"),
    ({"lease_s": -5}, "lease_s must be more than 0"),
    ({"poll_s": -1}, "poll_s must be 0 or more"),
    ({"lease_s": 60, "heartbeat_s": 30}, "less than half of lease_s"),
    ({"lease_s": 60, "heartbeat_s": -1}, "heartbeat_s must be 0"),
], ids=["lease-0", "lease-negative", "poll-negative", "heartbeat-half-the-lease", "heartbeat-negative"])
def test_a_dispatcher_refuses_a_lease_poll_or_heartbeat_out_of_range(kwargs: dict[str, float], message: str) -> None:
    store = Store(create_engine("sqlite://"), hooks=[Hook("noop", lambda change: None)])
    with pytest.raises(ValueError, match=message):
        Dispatcher(store, **kwargs)  # type: ignore[arg-type]
    assert Dispatcher(store, lease_s=60, heartbeat_s=0, poll_s=0).heartbeat_s == 0  # 0: no heartbeat, no pause
    store.dispose()


def test_a_pending_job_past_a_lowered_max_attempts_runs_once_more(db_url: str) -> None:
    """A pending job that already used more attempts than a dispatcher's ``max_attempts`` (the limit was
    lowered) runs once more before it is dead, on every database: MariaDB marked it dead unrun, as if its
    lease had expired."""
    clock = Clock()
    seen = Recorder(failures=100)
    store = hooked(db_url, Hook("h", seen), now=clock)
    deliver(store, f.envelope("user.created", f.user("user_1", B + 1000)))
    Dispatcher(store, backoff=Backoff(max_attempts=5, base_s=0), now=clock).drain(max_batches=3)
    assert [(j["status"], j["attempts"]) for j in jobs(store)] == [("pending", 3)]
    assert Dispatcher(store, backoff=Backoff(max_attempts=2), now=clock).drain() == 1
    (job,) = jobs(store)
    assert (len(seen.seen), job["status"], job["attempts"], job["last_error"]) == (
        4, "dead", 4, "RuntimeError: mail server down")
    deliver(store, f.envelope("user.created", f.user("user_2", B + 1000)))
    with store.transaction() as writer:  # a worker claims it, then dies: its lease expires at its last attempt
        claim(writer.conn, clock(), lease=timedelta(seconds=30), limit=1, max_attempts=5)
    clock.advance(31)
    assert Dispatcher(store, backoff=Backoff(max_attempts=1), now=clock).drain() == 0
    assert len(seen.seen) == 4  # that one is dead unrun
    assert [(j["status"], j["last_error"].split(" (")[0]) for j in jobs(store)] == [
        ("dead", "RuntimeError: mail server down"), ("dead", "lease expired after 1 attempts")]
    store.dispose()


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_the_dispatcher_vacuums_the_outbox_now_and_then_on_postgresql(db_url: str, recorder: Recorder) -> None:
    """Every job is inserted, claimed and deleted: between two autovacuum runs the outbox is mostly dead
    rows, which every claim visits again. The dispatcher vacuums it after every ``vacuum_every`` finished
    jobs (and not at all with 0)."""
    store = hooked(db_url, Hook("all", recorder))

    def vacuums() -> int:
        with store.connect() as conn:
            return int(conn.exec_driver_sql(
                "SELECT vacuum_count FROM pg_stat_user_tables WHERE relid = 'hook_jobs'::regclass").scalar_one())

    def run(n: int, **kwargs: Any) -> None:
        deliver(store, *[f.envelope("user.created", f.user(f"user_vac_{uuid.uuid4().hex[:8]}", 1)) for _ in range(n)])
        assert Dispatcher(store, batch=2, **kwargs).drain() == n

    run(5, vacuum_every=0)
    assert vacuums() == 0
    run(5, vacuum_every=4)  # batches of 2, 2, 1: once, after the fourth job
    deadline = time.monotonic() + 10  # the statistics are shared at the end of the VACUUM's transaction
    while vacuums() < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert vacuums() == 1 and len(recorder.seen) == 10
    with store.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM hook_jobs").scalar_one() == 0
    store.dispose()


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_a_claim_reads_each_queued_job_a_bounded_number_of_times(db_url: str, recorder: Recorder) -> None:
    """Vacuum leaves a queue table's statistics as it found it, nearly empty; a claim planned from them
    must still read each job a few times, not once per earlier job. 80 jobs (70 entities, 10 of them with
    a second job waiting behind the first) queued after the table was vacuumed empty; the rows the claim's
    transaction read are counted by PostgreSQL itself (pg_stat_xact_user_tables)."""
    store = hooked(db_url, Hook("all", recorder))
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE hook_jobs")  # empty: reltuples 0
    users_ = [f"user_q_{n:02d}" for n in range(70)]
    deliver(store, *[f.envelope("user.created", f.user(u, 1)) for u in users_],
            *[f.envelope("user.updated", f.user(u, 2, first_name="Again")) for u in users_[:10]])
    assert len(jobs(store)) == 80
    with store.transaction() as writer:
        claimed = claim(writer.conn, datetime.now(UTC), lease=timedelta(seconds=60), limit=100, max_attempts=5)
        read = writer.conn.exec_driver_sql(
            "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) FROM pg_stat_xact_user_tables "
            "WHERE relid = 'hook_jobs'::regclass").scalar_one()
    assert sorted(job.change.clerk_id for job in claimed) == users_  # one per entity, the first
    assert read <= 10 * 80, read  # the single statement it replaced read 6,066 rows here
    store.dispose()


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_two_claims_at_the_same_moment_take_different_jobs(db_url: str, recorder: Recorder) -> None:
    """Two dispatchers that claim at once compute the same oldest candidates: the second must skip what
    the first holds (not committed yet) and take the next ones, not come back empty while jobs are due."""
    store = hooked(db_url, Hook("all", recorder))
    deliver(store, *[f.envelope("user.created", f.user(f"user_two_{n:02d}", 1)) for n in range(20)])
    now = datetime.now(UTC)
    with store.transaction() as first:
        held = claim(first.conn, now, lease=timedelta(seconds=60), limit=5, max_attempts=5)
        with store.transaction() as second:
            other = claim(second.conn, now, lease=timedelta(seconds=60), limit=5, max_attempts=5)
    assert len(held) == len(other) == 5
    assert not {job.id for job in held} & {job.id for job in other}
    assert {job.change.clerk_id for job in held} == {f"user_two_{n:02d}" for n in range(5)}  # the oldest first
    store.dispose()


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_a_claim_the_database_refuses_is_a_store_error_and_the_next_claim_runs_the_job(
        db_url: str, recorder: Recorder) -> None:
    """PostgreSQL claims and finishes go through psycopg itself: a statement the database refuses (here a
    lock wait that ran out while another session held the table) must come out as StoreError, the
    dispatcher's "database unavailable, retry", not as a psycopg error that reads as a bug; the job stays
    queued and the next claim runs it."""
    from clerk_sync.errors import StoreError

    store = hooked(db_url, Hook("all", recorder))
    deliver(store, f.envelope("user.created", f.user("user_held", 1)))

    def claim_soon() -> None:
        with store.transaction() as writer:
            writer.conn.exec_driver_sql("SET LOCAL lock_timeout = '50ms'")
            claim(writer.conn, datetime.now(UTC), lease=timedelta(seconds=60), limit=10, max_attempts=5)

    with store.engine.connect() as other:
        other.exec_driver_sql("LOCK TABLE hook_jobs IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(StoreError, match="database timeout"):
            claim_soon()
        other.rollback()
    assert Dispatcher(store).drain() == 1
    assert [c.clerk_id for c in recorder.seen] == ["user_held"] and jobs(store) == []
    store.dispose()


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_a_claim_on_a_lost_connection_says_why(db_url: str) -> None:
    """A connection lost under a claim through psycopg: the error that says why (the server ended it) comes
    out, as from SQLAlchemy's own execute, not the failed ROLLBACK on the dead connection after it
    (review), and the pool hands out a live connection next."""
    from clerk_sync.errors import StoreError

    store = hooked(db_url, Hook("all", Recorder()))

    def claim_after_kill() -> None:
        with store.transaction() as writer:
            pid = writer.conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as other:
                other.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
            claim(writer.conn, datetime.now(UTC), lease=timedelta(seconds=60), limit=10, max_attempts=5)

    with pytest.raises(StoreError, match="AdminShutdown"):
        claim_after_kill()
    with store.transaction() as writer:
        assert claim(writer.conn, datetime.now(UTC), lease=timedelta(seconds=60), limit=10, max_attempts=5) == []
    store.dispose()


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_a_finish_the_database_refuses_is_a_store_error_and_the_job_stays_claimed(db_url: str) -> None:
    """The same for the finish of a batch (a job that ran): StoreError, and the job is still there, still
    this claim's, so a later finish (or, past the lease, another dispatcher) settles it."""
    from clerk_sync.errors import StoreError
    from clerk_sync.outbox import finish_many

    store = hooked(db_url, Hook("all", Recorder()))
    deliver(store, f.envelope("user.created", f.user("user_done", 1)))
    with store.transaction() as writer:
        (job,) = claim(writer.conn, datetime.now(UTC), lease=timedelta(seconds=60), limit=10, max_attempts=5)

    def finish_soon() -> list[int]:
        with store.transaction() as writer:
            writer.conn.exec_driver_sql("SET LOCAL lock_timeout = '50ms'")
            return finish_many(writer.conn, [job])

    with store.engine.connect() as other:
        other.exec_driver_sql("LOCK TABLE hook_jobs IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(StoreError, match="database timeout"):
            finish_soon()
        other.rollback()
    assert [(j["id"], j["status"], j["claim_token"]) for j in jobs(store)] == [(job.id, "running", job.token)]
    assert finish_soon() == [] and jobs(store) == []
    store.dispose()


@pytest.mark.parametrize("db_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_the_drivers_own_claims_take_what_sqlalchemys_take(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Claims and finishes go through psycopg or sqlite3 themselves (``outbox._claim_direct``); SQLAlchemy's
    statements stay for other drivers and for a SQLite engine with its own JSON deserializer. Over one queue in
    every state a job can be in (due, in backoff, dead, an expired lease with attempts left and one without,
    a second job behind its entity's first), both take the same jobs claim after claim, and leave the same
    rows."""
    from clerk_sync import outbox

    def run(direct: bool) -> tuple[list[list[tuple[str, str, int]]], list[tuple[str, str, int, str | None]]]:
        store = hooked(db_url, Hook("all", Recorder()))
        with store.transaction() as writer:
            writer.conn.execute(sa.delete(hook_jobs))
        prefix = "user_d_" if direct else "user_s_"  # one database: new users for the second run
        users_ = [f"{prefix}{n:02d}" for n in range(10)]
        deliver(store, *[f.envelope("user.created", f.user(u, B)) for u in users_],
                *[f.envelope("user.updated", f.user(u, B + 1, first_name="Again")) for u in users_[:4]])
        now = datetime.now(UTC)
        ids = {(job["entity_key"], job["type"]): job["id"] for job in jobs(store)}

        def job_of(user: str, kind: str = "user.created") -> int:
            return ids[(f"all|users:{user}", kind)]

        states = [  # (job, values): what dispatchers and failures leave behind
            (job_of(users_[1]), {"available_at": now + timedelta(minutes=5), "attempts": 1}),  # backoff
            (job_of(users_[2]), {"status": "dead", "attempts": 5, "last_error": "boom"}),
            (job_of(users_[3]), {"status": "running", "lease_until": now - timedelta(seconds=1), "attempts": 1}),
            (job_of(users_[4]), {"status": "running", "lease_until": now - timedelta(seconds=1), "attempts": 5}),
            (job_of(users_[5]), {"status": "running", "lease_until": now + timedelta(minutes=1), "attempts": 1}),
        ]
        with store.transaction() as writer:
            for job_id, values in states:
                writer.conn.execute(sa.update(hook_jobs).where(hook_jobs.c.id == job_id).values(**values))
        if not direct:
            monkeypatch.setattr(outbox, "_direct", lambda conn: None)
        claims: list[list[tuple[str, str, int]]] = []
        for _ in range(8):
            with store.transaction() as writer:
                taken = claim(writer.conn, now, lease=timedelta(seconds=60), limit=3, max_attempts=5)
                assert outbox.finish_many(writer.conn, taken[:2]) == []  # the third stays running
            claims.append([(job.change.clerk_id.removeprefix(prefix), job.change.kind, job.attempts) for job in taken])
        monkeypatch.undo()
        left = [(job["entity_key"].replace(prefix, ""), job["status"], job["attempts"], job["last_error"])
                for job in jobs(store)]
        store.dispose()
        return claims, left

    direct, alchemy = run(direct=True), run(direct=False)
    assert direct == alchemy
    claims, left = direct
    assert [c for claim_ in claims for c in claim_][:3] == [
        ("00", "created", 1), ("03", "created", 2), ("06", "created", 1)]
    assert ("all|users:04", "dead", 5, "lease expired after 5 attempts (worker killed, or handler "
            "slower than the lease)") in left


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_a_claim_over_a_blocked_backlog_does_work_in_proportion_to_it(db_url: str) -> None:
    """A sink down: every entity's first job waits in backoff, thousands queue behind them, and the
    statistics are those of the emptied queue (as the dispatcher's vacuum leaves them). The claim's page
    statement must do work in proportion to the page (counted by PostgreSQL: the rows every plan node
    produced, times its loops), not regroup the page's entities for each of its rows (review: ~1 s a page
    of 4,096 with the join it replaced)."""
    from clerk_sync import outbox

    store = hooked(db_url, Hook("all", Recorder()))
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE hook_jobs")  # empty: reltuples 0
        # and no autovacuum's ANALYZE of the backlog before the statement runs (it would hide the plan)
        conn.exec_driver_sql("ALTER TABLE hook_jobs SET (autovacuum_enabled = false)")
    now = datetime.now(UTC)
    entities, behind = 50, 50
    with store.transaction() as writer:
        writer.conn.execute(hook_jobs.insert(), [
            {"hook": "all", "type": "user.updated", "entity_key": f"all|users:user_b_{e:02d}",
             "idempotency_key": f"user.updated:user_b_{e:02d}:{n}", "payload": {"n": n}, "status": "pending",
             "attempts": 1 if n == 0 else 0, "created_at": now,
             "available_at": now + timedelta(hours=1) if n == 0 else now}  # the first: in backoff
            for n in range(behind) for e in range(entities)])
    sql = outbox._DIRECT["psycopg"].page
    params = {"now": now, "max_attempts": 5, "after": 0, "page": 4096}
    with store.transaction() as writer:
        raw: Any = writer.conn.connection.driver_connection
        (plan,), = raw.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).fetchall()
        taken = claim(writer.conn, now, lease=timedelta(seconds=60), limit=2048, max_attempts=5)

    def work(node: dict[str, Any]) -> int:  # rows each node produced or filtered out, over its loops
        rows = node["Actual Rows"] + node.get("Rows Removed by Filter", 0) + node.get("Rows Removed by Join Filter", 0)
        return rows * node["Actual Loops"] + sum(work(child) for child in node.get("Plans", []))

    jobs_ = entities * behind
    assert taken == []  # every one behind its entity's first job
    assert work(plan[0]["Plan"]) <= 20 * jobs_, plan  # ~8 a job measured; the regrouping plan: ~2,500
    store.dispose()


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_a_connection_lost_inside_a_mapped_savepoint_reports_why(db_url: str) -> None:
    """The mapped row's savepoint goes through the driver (``outbox._savepoint``). When the connection dies
    inside it, the error that says why must come out, as SQLAlchemy's own savepoint lets it (review: a
    rollback to the savepoint on the invalidated connection put SQLAlchemy's "can't reconnect until
    invalid transaction is rolled back" in its place, which the group committer does not read as a lost
    connection)."""
    from clerk_sync import outbox
    from clerk_sync.errors import StoreError

    store = hooked(db_url)

    def die_inside() -> None:
        with store.transaction() as writer, outbox._savepoint(writer.conn):
            writer.conn.exec_driver_sql("SELECT pg_terminate_backend(pg_backend_pid())")

    with pytest.raises(StoreError, match="AdminShutdown"):
        die_inside()
    with store.transaction() as writer:  # and the pool hands out a live connection again
        assert writer.conn.exec_driver_sql("SELECT 1").scalar_one() == 1
    store.dispose()


def test_a_failure_whose_bookkeeping_fails_mid_batch_keeps_the_batchs_successes_finished(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding: recording a handler's failure raised (a database blip) mid-batch, and the jobs that
    had succeeded before it were never finished: their handlers ran again once the lease expired."""
    import clerk_sync.hooks as hooks_module
    from clerk_sync.errors import StoreError

    clock = Clock()
    seen: list[str] = []

    def handler(change: Change) -> None:
        seen.append(change.clerk_id)
        if change.clerk_id == "user_3":
            raise RuntimeError("mail server down")

    store = hooked(db_url, Hook("mail", handler), now=clock)
    deliver(store, *(f.envelope("user.created", f.user(f"user_{n}", B + n)) for n in (1, 2, 3)))

    def blip(*_: Any, **__: Any) -> bool:
        raise StoreError("connection reset")

    dispatcher = Dispatcher(store, now=clock, heartbeat_s=0)
    with monkeypatch.context() as patched:
        patched.setattr(hooks_module, "fail", blip)
        with pytest.raises(StoreError, match="connection reset"):
            dispatcher.run_once()
    assert seen == ["user_1", "user_2", "user_3"]
    assert [j["entity_key"] for j in jobs(store)] == ["mail|users:user_3"]  # the successes are finished
    clock.advance(61)  # the failed one's lease runs out: it runs again, alone
    Dispatcher(store, now=clock, heartbeat_s=0).drain()
    assert seen == ["user_1", "user_2", "user_3", "user_3"]
    store.dispose()


def test_a_handler_running_past_slow_handler_s_is_logged_once_by_the_heartbeat(db_url: str) -> None:
    """Review finding: a handler that hangs keeps its job's lease (the heartbeat) and its dispatcher,
    and nothing said so. The heartbeat now logs it once, with the hook and the job, after ``slow_handler_s``
    of the dispatcher's clock; a quick handler is never logged."""
    clock = Clock()
    released = threading.Event()
    said: list[dict[str, Any]] = []  # the log lines, shared with the heartbeat's thread

    def hangs(change: Change) -> None:
        if change.clerk_id != "user_slow":
            return
        clock.advance(301)  # five minutes and a second, on the dispatcher's clock
        deadline = time.monotonic() + 30
        while not any(e["event"].startswith("hook handler still running") for e in said):
            assert time.monotonic() < deadline, "the heartbeat never logged the slow handler"
            released.wait(0.02)  # the heartbeat (a real thread, every 0.05 s) speaks meanwhile

    store = hooked(db_url, Hook("hangs", hangs), now=clock)
    deliver(store, f.envelope("user.created", f.user("user_quick", B + 1000)),
            f.envelope("user.created", f.user("user_slow", B + 1000)))
    dispatcher = Dispatcher(store, lease_s=60, heartbeat_s=0.05, now=clock)
    with structlog.testing.capture_logs() as captured:
        said = captured
        assert dispatcher.run_once() == 2
    slow = [e for e in said if e["event"].startswith("hook handler still running")]
    assert len(slow) == 1 and slow[0]["hook"] == "hangs" and slow[0]["running_s"] >= 300, said
    assert slow[0]["type"] == "user.created" and dispatcher.warn_if_slow() is False  # nothing runs now
    assert jobs(store) == []  # both finished: the line is a warning, not a failure
    with pytest.raises(ValueError, match="slow_handler_s"):
        Dispatcher(store, slow_handler_s=-1)
    store.dispose()


def test_a_retry_of_a_job_that_hangs_again_is_said_again(db_url: str) -> None:
    """Review finding: the line was said once a job id, so the retry of a job that had hung, hanging again,
    went unsaid; it is once a run now."""
    clock = Clock()
    said: list[bool] = []
    dispatcher: Dispatcher | None = None

    def hangs_then_fails(change: Change) -> None:
        assert dispatcher is not None
        clock.advance(301)
        said.append(dispatcher.warn_if_slow())
        said.append(dispatcher.warn_if_slow())  # (once a run)
        raise TimeoutError("the CRM never answered")

    store = hooked(db_url, Hook("hangs", hangs_then_fails), now=clock)
    deliver(store, f.envelope("user.created", f.user("user_slow", B + 1000)))
    dispatcher = Dispatcher(store, heartbeat_s=0, backoff=Backoff(max_attempts=3, base_s=1), now=clock)
    assert dispatcher.run_once() == 1
    clock.advance(2)
    assert dispatcher.run_once() == 1  # the retry, the same job
    assert said == [True, False, True, False]
    store.dispose()
