"""Jobs a claim marks dead (lease expired on their last attempt; a payload this release cannot read) are counted.

Fixed: they were counted nowhere: ``clerk_sync_hook_runs_total{outcome="dead"}`` missed them, ``worker --once``
said "0 dead" and exited 0 while they waited in ``hooks list``, and a claim whose rows were all unreadable
returned no job, so ``drain()`` (and ``worker --once``) stopped there with due jobs still queued behind them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from clerk_sync.changes import Hook
from clerk_sync.hooks import Backoff, Dispatcher
from clerk_sync.metrics import Metrics
from clerk_sync.outbox import claim
from clerk_sync.store import Store, create_engine
from clerk_sync.tables import hook_jobs
from tests import factories as f
from tests.conftest import SECRET
from tests.test_hooks import B, Clock, Recorder, deliver, hooked, jobs


def _spoil(store: Store, n: int) -> None:
    """``n`` users' jobs, then one more user's; the first ``n`` payloads made unreadable (an older release's
    ``users erase`` left such ones, or a hand edit)."""
    deliver(store, *(f.envelope("user.created", f.user(f"user_{i}", B + 1000)) for i in range(n + 1)))
    spoilt = [j["id"] for j in jobs(store)][:n]
    with store.transaction() as writer:
        writer.conn.execute(sa.update(hook_jobs).where(hook_jobs.c.id.in_(spoilt)).values(payload={"entity": "nope"}))


def _dead_runs(metrics: Metrics, hook: str) -> float:
    return metrics.hook_runs.labels(hook=hook, outcome="dead")._value.get()


def test_a_claim_of_unreadable_jobs_only_does_not_end_the_drain_and_they_are_counted_dead(db_url: str) -> None:
    mail = Recorder()
    store = hooked(db_url, Hook("mail", mail, on=["user.created"]))
    _spoil(store, 10)  # the first claim asks for 10 jobs: all of them unreadable
    metrics = Metrics()
    dispatcher = Dispatcher(store, heartbeat_s=0, metrics=metrics)
    assert dispatcher.drain() == 1
    assert [c.clerk_id for c in mail.seen] == ["user_10"]  # the good job behind them ran
    assert sorted(j["status"] for j in jobs(store)) == ["dead"] * 10
    assert dispatcher.dead_at_claim == 10 and _dead_runs(metrics, "mail") == 10
    store.dispose()


def test_a_job_whose_lease_expired_on_its_last_attempt_is_counted_dead(db_url: str) -> None:
    clock = Clock()
    mail = Recorder()
    store = hooked(db_url, Hook("mail", mail, on=["user.created"]), now=clock)
    deliver(store, f.envelope("user.created", f.user("user_1", B + 1000)))
    with store.transaction() as writer:  # a worker claims the job on its last attempt, then dies
        (lost,) = claim(writer.conn, clock(), lease=timedelta(seconds=30), limit=10, max_attempts=1)
    deliver(store, f.envelope("user.created", f.user("user_2", B + 1000)))
    clock.advance(31)
    metrics = Metrics()
    dispatcher = Dispatcher(store, lease_s=30, heartbeat_s=0, now=clock, metrics=metrics,
                            backoff=Backoff(max_attempts=1))
    assert dispatcher.drain() == 1 and [c.clerk_id for c in mail.seen] == ["user_2"]
    ((job_id, status, error),) = [(j["id"], j["status"], j["last_error"]) for j in jobs(store)]
    assert (job_id, status) == (lost.id, "dead") and error.startswith("lease expired after 1 attempts")
    assert dispatcher.dead_at_claim == 1 and _dead_runs(metrics, "mail") == 1
    with store.transaction() as writer:  # (claim itself says which jobs it marked dead)
        writer.conn.execute(sa.update(hook_jobs).values(status="running", lease_until=clock() - timedelta(1)))
        dead: list[tuple[int, str]] = []
        assert claim(writer.conn, clock(), lease=timedelta(seconds=30), limit=10, max_attempts=1, dead=dead) == []
    assert dead == [(lost.id, "mail")]
    store.dispose()


def test_worker_once_counts_the_jobs_a_claim_marked_dead_and_exits_1(tmp_path: Path) -> None:
    """``worker --once`` over 10 unreadable jobs and a good one: it said "ran 0" and exited 0, the good job
    still pending."""
    (tmp_path / "dc_hooks.py").write_text(
        "from clerk_sync.changes import Hook\nHOOKS = [Hook('mail', lambda change: None, on=['user.created'])]\n")
    path = os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLERK_", "PROMETHEUS_"))
           and k.lower() != "prometheus_multiproc_dir" and k != "DATABASE_URL"}
    env |= {"DATABASE_URL": f"sqlite:///{tmp_path / 'jobs.db'}", "PYTHONPATH": path,
            "CLERK_WEBHOOK_SIGNING_SECRET": SECRET}
    cli = [sys.executable, "-c", "from clerk_sync.cli import main; main()"]
    assert subprocess.run([*cli, "migrate"], env=env, capture_output=True, timeout=120, check=False).returncode == 0
    store = Store(create_engine(env["DATABASE_URL"]), hooks=[Hook("mail", lambda change: None, on=["user.created"])],
                  now=lambda: datetime.now(UTC))
    _spoil(store, 10)
    result = subprocess.run([*cli, "worker", "--once", "--hooks", "dc_hooks:HOOKS"], env=env, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    said = " ".join(result.stderr.split())
    assert "ran 1 hook jobs: 1 ok" in said and "0 dead" in said and "10 more marked dead unrun" in said, said
    assert "10 job(s) died" in said
    assert sorted(j["status"] for j in jobs(store)) == ["dead"] * 10
    store.dispose()
