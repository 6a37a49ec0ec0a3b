"""Hooks adopter walkthrough: during a rolling deploy (``serve --no-dispatch`` and two ``clerk-sync worker``), a
worker still running the older hooks list claimed the jobs of a hook it did not have and marked them dead on
their first attempt ("no hook named 'plan-sync' in this process"); ``hooks retry --all`` only fed it more. A
dispatcher now claims only the jobs of its own hooks, on every store; the others wait, pending, for a worker
that has their hook, and each hook's jobs of one entity still run one at a time, in order."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from clerk_sync import outbox
from clerk_sync.changes import Hook
from clerk_sync.hooks import Dispatcher
from clerk_sync.outbox import claim
from clerk_sync.store import Store
from clerk_sync.tables import hook_jobs
from tests import factories as f
from tests.test_hooks import B, Recorder, deliver, hooked, jobs


@pytest.fixture
def both(db_url: str) -> Iterator[tuple[Store, Store, Recorder, Recorder]]:
    """The new release's store (hooks welcome and plan-sync) and the old one's (welcome only), one database;
    a user created then updated twice: 3 welcome jobs and 3 plan-sync jobs of one entity."""
    welcome, plan = Recorder(), Recorder()
    new = hooked(db_url, Hook("welcome", welcome), Hook("plan-sync", plan))
    old = hooked(db_url, Hook("welcome", welcome))
    deliver(new, f.envelope("user.created", f.user("user_a", B)),
            *[f.envelope("user.updated", f.user("user_a", B + n, first_name=f"A{n}")) for n in (1, 2)])
    yield new, old, welcome, plan
    new.dispose()
    old.dispose()


def test_a_worker_without_a_hook_leaves_its_jobs_pending_for_one_that_has_it(
        both: tuple[Store, Store, Recorder, Recorder]) -> None:
    new, old, welcome, plan = both
    assert Dispatcher(old, poll_s=0).drain() == 3  # the welcome jobs only
    left = jobs(new)
    assert [(j["hook"], j["status"], j["attempts"], j["last_error"]) for j in left] == [
        ("plan-sync", "pending", 0, None)] * 3, left
    assert welcome.types == ["user.created", "user.updated", "user.updated"]
    assert Dispatcher(new, poll_s=0).drain() == 3
    assert [c.version for c in plan.seen] == [B, B + 1, B + 2] and jobs(new) == []


def _claim(store: Store, now: datetime, hooks: list[str] | None, limit: int = 10) -> list[tuple[str, int]]:
    with store.transaction() as writer:
        taken = claim(writer.conn, now, lease=timedelta(seconds=60), limit=limit, max_attempts=5, hooks=hooks)
    return [(job.hook, job.change.version) for job in taken]


@pytest.mark.parametrize("statements", ["driver", "sqlalchemy"])
def test_the_order_per_entity_holds_with_hooks_unknown_to_a_worker(
        both: tuple[Store, Store, Recorder, Recorder], statements: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Claims of the old worker (welcome) and of the new one (both hooks) interleaved: each hook's jobs of the
    entity go one at a time, oldest first, whoever claims; one hook's unfinished job never holds back the
    other's, and a worker never takes the jobs of a hook it lacks (through the drivers' own statements and
    SQLAlchemy's: psycopg and sqlite3 take the first, other drivers the second; MariaDB has its own)."""
    new, *_ = both
    if statements == "sqlalchemy":
        if new.engine.dialect.name in ("mysql", "mariadb"):
            pytest.skip("MariaDB has one claim path (select, then update one by one)")
        monkeypatch.setattr(outbox, "_direct", lambda conn: None)
    now = datetime.now(UTC)
    assert _claim(new, now, ["welcome"]) == [("welcome", B)]  # the old worker: never a plan-sync job
    assert _claim(new, now, ["welcome", "plan-sync"]) == [("plan-sync", B)]  # welcome's second waits for its first
    assert _claim(new, now, ["welcome"]) == []
    assert _claim(new, now, ["plan-sync"]) == []  # its first still runs
    with new.transaction() as writer:  # both finish: the ones after them are next, each for its own hook
        running = writer.conn.execute(sa.select(hook_jobs.c.id, hook_jobs.c.claim_token).where(
            hook_jobs.c.status == "running")).all()
        for job_id, token in running:
            writer.conn.execute(sa.delete(hook_jobs).where(hook_jobs.c.id == job_id, hook_jobs.c.claim_token == token))
    assert _claim(new, now, ["plan-sync"]) == [("plan-sync", B + 1)]
    assert _claim(new, now, ["welcome", "plan-sync"]) == [("welcome", B + 1)]
    assert [(j["hook"], j["status"], j["attempts"]) for j in jobs(new)] == [
        ("welcome", "running", 1), ("plan-sync", "running", 1), ("welcome", "pending", 0), ("plan-sync", "pending", 0)]


def test_a_worker_takes_over_an_expired_lease_only_of_its_own_hooks(
        both: tuple[Store, Store, Recorder, Recorder]) -> None:
    """A plan-sync job whose worker died (lease expired) is taken over by a worker with plan-sync, not run
    (nor killed) by one without it."""
    new, *_ = both
    now = datetime.now(UTC)
    assert _claim(new, now, ["plan-sync"], limit=1) == [("plan-sync", B)]
    later = now + timedelta(seconds=120)
    assert _claim(new, later, ["welcome"]) == [("welcome", B)]
    assert _claim(new, later, ["plan-sync"]) == [("plan-sync", B)]  # the second claim of the same job
    with new.connect() as conn:
        row = conn.execute(sa.select(hook_jobs.c.attempts, hook_jobs.c.status).where(
            hook_jobs.c.hook == "plan-sync").order_by(hook_jobs.c.id)).first()
    assert row is not None and tuple(row) == (2, "running")


def test_serves_dispatcher_claims_its_stores_hooks_only(db_url: str) -> None:
    """``serve``'s in-process dispatcher is the same :class:`Dispatcher` over the store ``serve`` built: a job of
    a hook the store lacks stays pending, its attempt not counted, with no error."""
    store, before = hooked(db_url, Hook("welcome", Recorder())), hooked(db_url, Hook("gone", Recorder()))
    deliver(before, f.envelope("user.created", f.user("user_b", B)))  # a hook since removed
    before.dispose()
    deliver(store, f.envelope("user.created", f.user("user_c", B)))
    assert Dispatcher(store, poll_s=0).drain() == 1
    assert [(j["hook"], j["status"], j["attempts"], j["last_error"]) for j in jobs(store)] == [
        ("gone", "pending", 0, None)]
    store.dispose()


def test_hooks_list_names_the_hook_whose_jobs_wait_and_purge_hook_removes_them(db_url: str) -> None:
    """A hook no dispatcher has leaves its jobs pending for good: ``hooks list --status pending`` names the hooks
    of the due jobs with the oldest wait and says what to do; ``hooks purge --hook NAME`` deletes that hook's
    jobs (``hooks purge`` took dead jobs only: a removed hook's pending ones had no way out)."""
    from tests.test_cli import run

    store = hooked(db_url, Hook("gone", Recorder()), Hook("kept", Recorder()))
    deliver(store, f.envelope("user.created", f.user("user_d", B)), f.envelope("user.created", f.user("user_e", B)))
    kept = Store(store.engine, hooks=[Hook("kept", Recorder())])
    assert Dispatcher(kept, poll_s=0).drain() == 2
    env = {"DATABASE_URL": db_url}
    listed = run("hooks", "list", "--status", "pending", env=env)
    assert listed.returncode == 0, listed.stderr
    assert [line.split("\t")[1] for line in listed.stdout.splitlines()] == ["gone", "gone"]
    said = " ".join(listed.stderr.split())
    assert "due now, by hook: 'gone' 2 (the oldest waiting" in said, said
    assert "`clerk-sync hooks purge --hook NAME`" in said and "deploy it" in said, said
    with store.transaction() as writer:  # one of them claimed by a worker that has the hook after all
        claim(writer.conn, datetime.now(UTC), lease=timedelta(seconds=60), limit=1, max_attempts=5, hooks=["gone"])
    purged = run("hooks", "purge", "--hook", "gone", env=env)
    assert purged.returncode == 1 and "1 job(s) of hook 'gone' purged" in purged.stdout, purged
    assert "1 job(s) of hook 'gone' running, left as they are" in purged.stderr, purged.stderr
    assert [(j["hook"], j["status"]) for j in jobs(store)] == [("gone", "running")]
    assert run("hooks", "purge", "--hook", "gone", "--all", env=env).returncode == 2
    store.dispose()


def test_purge_hook_removes_a_job_left_running_by_a_dispatcher_that_died(db_url: str) -> None:
    """Review: the last worker with the hook killed mid-run (the deploy that removes it) left its job running
    with an ended lease; no dispatcher has the hook to take it over, and ``purge --hook`` said "a dispatcher
    still has this hook" and kept it for good."""
    from tests.test_cli import run

    store = hooked(db_url, Hook("gone", Recorder()))
    deliver(store, f.envelope("user.created", f.user("user_k", B)))
    with store.transaction() as writer:  # claimed, then its dispatcher died: the lease ended an hour ago
        (taken,) = claim(writer.conn, datetime.now(UTC), lease=timedelta(seconds=60), limit=1, max_attempts=5,
                         hooks=["gone"])
        writer.conn.execute(sa.update(hook_jobs).where(hook_jobs.c.id == taken.id)
                            .values(lease_until=datetime.now(UTC) - timedelta(hours=1)))
    purged = run("hooks", "purge", "--hook", "gone", env={"DATABASE_URL": db_url})
    assert purged.returncode == 0 and "1 job(s) of hook 'gone' purged" in purged.stdout, purged
    assert jobs(store) == []
    store.dispose()


def test_a_claim_of_its_own_hooks_does_not_walk_another_hooks_backlog(db_url: str) -> None:
    """Left from the last session (measured by a review): a dispatcher's page of due jobs walked the primary key
    and filtered by hook, so every claim read a backlog of another hook's jobs ahead of its own (0.5 s a claim
    over 500,000 on PostgreSQL). Migration 0018 gives PostgreSQL a partial index on (hook, id) for unfinished
    jobs, and its plan takes it; SQLite and MariaDB are left without it (no gain there: BENCHMARKS.md)."""
    store = hooked(db_url, Hook("mine", Recorder()))
    payload = f.envelope("user.created", f.user("user_x", B))  # any JSON: the claim below reads the page only
    now = datetime.now(UTC)
    backlog = [{"hook": "other", "type": "user.created", "entity_key": f"other:users:user_{n}",
                "idempotency_key": f"k{n}", "payload": payload, "status": "pending", "attempts": 0,
                "available_at": now - timedelta(minutes=1), "created_at": now} for n in range(3000)]
    with store.transaction() as writer:
        writer.conn.execute(hook_jobs.insert(), backlog)
    deliver(store, f.envelope("user.created", f.user("user_m", B)))  # one job of "mine", after the backlog
    postgres = store.engine.dialect.name == "postgresql"
    with store.connect() as conn:
        indexes = {ix["name"] for ix in sa.inspect(conn).get_indexes("hook_jobs")}
        assert ("ix_hook_jobs_hook_id_unfinished" in indexes) == postgres
        if postgres:
            conn.exec_driver_sql("ANALYZE hook_jobs")
            sql = outbox._DIRECT["psycopg"].page_of_hooks  # the statement a claim runs
            with conn.connection.driver_connection.cursor() as cur:  # type: ignore[union-attr]
                plan = " ".join(str(row[0]) for row in cur.execute(
                    "EXPLAIN " + sql, {"now": now, "max_attempts": 5, "hooks": ["mine"], "after": 0, "page": 20}))
            assert "ix_hook_jobs_hook_id_unfinished" in plan, plan
    assert _claim(store, datetime.now(UTC) + timedelta(seconds=1), ["mine"]) == [("mine", B)]
    store.dispose()
