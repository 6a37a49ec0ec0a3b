"""``max_overdue`` bounds the overdue runs of each hook, not of the dispatcher.

Fixed: the bound counted every hook's overdue runs together, and at it the dispatcher claimed nothing at all,
so one hook whose external API never answers (``timeout_s`` set, the handler hanging) stopped every hook on
every dispatcher: the healthy hooks' jobs stayed pending for ever. A hook at its bound now has none of its
jobs claimed (those of the batch not started are given back) while the other hooks' jobs run.

The hanging handler blocks on a :class:`threading.Event` the test sets at the end, so a run goes overdue
because it is blocked, never because the machine was slow; the clock is the hand-moved one of tests.test_hooks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog.testing

from clerk_sync.changes import Hook
from clerk_sync.hooks import Dispatcher
from clerk_sync.store import Store, create_engine
from tests import factories as f
from tests.conftest import SECRET
from tests.test_hook_timeout import AT_BOUND, Hanging, join_runs, said
from tests.test_hooks import B, Clock, Recorder, deliver, hooked, jobs


def created(*ids: str) -> list[dict[str, object]]:
    return [f.envelope("user.created", f.user(user_id, B + 1000)) for user_id in ids]


def pending_of(store_jobs: list[dict[str, object]], hook: str) -> list[str]:
    return sorted(str(j["entity_key"]).rsplit(":", 1)[1] for j in store_jobs
                  if str(j["entity_key"]).startswith(hook) and j["status"] == "pending")


@pytest.fixture
def crm() -> Iterator[Hanging]:
    handler = Hanging()
    yield handler
    handler.release.set()  # a failing test must not leave a thread blocked
    join_runs()


def test_a_hook_hanging_on_more_entities_than_max_overdue_stops_only_itself(db_url: str, crm: Hanging) -> None:
    clock = Clock()
    mail = Recorder()
    store = hooked(db_url, Hook("crm", crm, on=["user.created"], timeout_s=0.05),
                   Hook("mail", mail, on=["user.created"]), now=clock)
    deliver(store, *created("user_1", "user_2", "user_3"))
    dispatcher = Dispatcher(store, lease_s=60, heartbeat_s=0, now=clock, max_overdue=2)
    rival = Dispatcher(store, lease_s=60, heartbeat_s=0, now=clock, max_overdue=2)
    with structlog.testing.capture_logs() as logs:
        assert dispatcher.run_once() == 6
        # crm hangs on user_1 and user_2: at its bound, its third job is given back unstarted; mail's all ran
        assert crm.started == ["user_1:created", "user_2:created"]
        assert sorted(c.clerk_id for c in mail.seen) == ["user_1", "user_2", "user_3"]
        assert dispatcher.overdue_by_hook() == {"crm": 2}
        left = jobs(store)
        assert pending_of(left, "crm") == ["user_3"] and not pending_of(left, "mail")
        assert [j["attempts"] for j in left if j["status"] == "pending"] == [0]  # its claim's attempt not counted

        # later changes: this dispatcher claims mail's jobs only, crm's wait (the rival takes crm's, and hangs)
        deliver(store, *created("user_4", "user_5"))
        assert dispatcher.run_once() == 2
        assert sorted(c.clerk_id for c in mail.seen) == ["user_1", "user_2", "user_3", "user_4", "user_5"]
        assert crm.started == ["user_1:created", "user_2:created"]
        assert pending_of(jobs(store), "crm") == ["user_3", "user_4", "user_5"]
        assert rival.run_once() == 3  # (a claim takes up to 10 at first: the three, two go overdue, one back)
        assert rival.overdue_by_hook() == {"crm": 2}
        deliver(store, *created("user_6"))
        assert rival.run_once() == 1 and dispatcher.run_once() == 0  # mail's job ran on the rival
        assert [c.clerk_id for c in mail.seen][-1] == "user_6"

    lines = said(logs, AT_BOUND)
    assert [(line["hook"], line["max_overdue"]) for line in lines] == [("crm", 2), ("crm", 2)]  # once a dispatcher
    assert lines[0]["released"] == 1 and "other hooks' jobs" in lines[0]["event"]
    assert "--max-overdue" in lines[0]["event"] and "timeout_s" in lines[0]["event"]

    crm.release.set()
    join_runs()
    for _ in range(5):  # the overdue runs recorded, then crm's waiting jobs claimed and run (they return now)
        dispatcher.run_once()
        rival.run_once()
        join_runs()
    assert jobs(store) == []
    assert sorted(crm.started) == sorted(f"user_{n}:created" for n in range(1, 7))
    store.dispose()


def test_a_hook_back_under_its_bound_is_claimed_again_and_said_again_when_it_is_back(
        db_url: str, crm: Hanging) -> None:
    clock = Clock()
    store = hooked(db_url, Hook("crm", crm, on=["user.created"], timeout_s=0.05),
                   Hook("mail", Recorder(), on=["user.created"]), now=clock)
    crm.hang = {"user_1"}
    deliver(store, *created("user_1", "user_2"))
    dispatcher = Dispatcher(store, lease_s=60, heartbeat_s=0, now=clock, max_overdue=1)
    with structlog.testing.capture_logs() as logs:
        assert dispatcher.run_once() == 4  # crm's user_2 given back
        assert pending_of(jobs(store), "crm") == ["user_2"]
        crm.release.set()
        join_runs()
        assert dispatcher.run_once() == 1  # user_1's run recorded: crm under its bound, user_2 claimed and run
        join_runs()
        dispatcher.run_once()
    assert jobs(store) == [] and len(said(logs, AT_BOUND)) == 1
    store.dispose()


def test_worker_takes_max_overdue(tmp_path: Path) -> None:
    """``clerk-sync worker --max-overdue 1``: of two runs of one hook that hang, the second is not started
    (default 4: both are)."""
    (tmp_path / "hf_hooks.py").write_text(textwrap.dedent(f'''
        import threading
        from clerk_sync.changes import Hook

        def hang(change):
            with open({str(tmp_path / "started")!r}, "a") as out:
                out.write(change.clerk_id + "\\n")
            threading.Event().wait()

        HOOKS = [Hook("hang", hang, on=["user.created"], timeout_s=0.05)]
    '''))
    path = os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLERK_", "PROMETHEUS_"))
           and k.lower() != "prometheus_multiproc_dir" and k != "DATABASE_URL"}
    env |= {"DATABASE_URL": f"sqlite:///{tmp_path / 'jobs.db'}", "PYTHONPATH": path,
            "CLERK_WEBHOOK_SIGNING_SECRET": SECRET}
    cli = [sys.executable, "-c", "from clerk_sync.cli import main; main()"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=120, check=False)

    assert run("migrate").returncode == 0
    store = Store(create_engine(env["DATABASE_URL"]), hooks=[Hook("hang", lambda change: None, on=["user.created"])])
    deliver(store, *created("user_1", "user_2"))
    store.dispose()
    result = run("worker", "--once", "--hooks", "hf_hooks:HOOKS", "--lease", "1", "--max-overdue", "1")
    assert result.returncode == 1, result.stdout + result.stderr  # a run still runs after the lease's wait
    assert (tmp_path / "started").read_text().split() == ["user_1"]
    assert "hook runs overdue at max_overdue" in result.stderr
    refused = run("worker", "--once", "--hooks", "hf_hooks:HOOKS", "--max-overdue", "0")
    assert refused.returncode == 2 and "--max-overdue" in refused.stderr
