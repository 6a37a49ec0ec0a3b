"""A run past its hook's ``timeout_s`` that goes on hanging is reported while it lasts.

Fixed: after the first "past its timeout_s" line and one increment of ``clerk_sync_hook_overdue_total``, nothing
said the run still hung (the slow-handler line looked only at the run the dispatcher waits for). Now
``clerk_sync_hook_overdue_running`` counts the overdue runs by hook (ClerkSyncHookRunsOverdue), and the heartbeat's
slow-handler check says, once a run, an overdue run still running after ``slow_handler_s``. The clock is moved by
hand; the handler blocks on an event the test sets.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog.testing

from clerk_sync.changes import Hook
from clerk_sync.hooks import Dispatcher
from clerk_sync.metrics import Metrics
from tests import factories as f
from tests.test_hook_timeout import Hanging, join_runs, said
from tests.test_hooks import B, Clock, deliver, hooked, jobs

STILL = "hook handler still running past its timeout_s"


@pytest.fixture
def crm() -> Iterator[Hanging]:
    handler = Hanging()
    yield handler
    handler.release.set()
    join_runs()


def test_the_overdue_runs_are_a_gauge_by_hook_and_a_line_once_past_slow_handler_s(db_url: str, crm: Hanging) -> None:
    clock = Clock()
    store = hooked(db_url, Hook("crm", crm, on=["user.created"], timeout_s=0.05), now=clock)
    deliver(store, *(f.envelope("user.created", f.user(u, B + 1000)) for u in ("user_1", "user_2")))
    metrics = Metrics()
    dispatcher = Dispatcher(store, lease_s=60, heartbeat_s=0, now=clock, metrics=metrics, slow_handler_s=300)
    gauge = metrics.hook_overdue_running.labels(hook="crm")
    assert dispatcher.run_once() == 2
    assert gauge._value.get() == 2 and dispatcher.overdue_by_hook() == {"crm": 2}
    with structlog.testing.capture_logs() as logs:
        clock.advance(299)
        assert dispatcher.warn_if_slow() is False
        clock.advance(2)
        assert dispatcher.warn_if_slow() is True  # (the heartbeat's call)
        clock.advance(600)
        assert dispatcher.warn_if_slow() is False  # once a run
    lines = said(logs, STILL)
    assert sorted((line["hook"], line["running_s"]) for line in lines) == [("crm", 301.0), ("crm", 301.0)]
    assert {line["job"] for line in lines} == {j["id"] for j in jobs(store)}
    assert "restart this process" in lines[0]["event"] and "RUNBOOK" in lines[0]["event"]
    assert "clerk_sync_hook_overdue_running{hook=\"crm\"} 2.0" in metrics.render().decode()

    crm.release.set()
    join_runs()
    dispatcher.run_once()  # the ended runs recorded: no longer overdue
    assert gauge._value.get() == 0 and jobs(store) == []
    store.dispose()
