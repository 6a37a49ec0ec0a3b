"""Day-one walkthrough: after the first ``clerk-sync reconcile`` of a fresh database (loading the users Clerk
already held), ``doctor --freshness`` warned "repaired N row(s) ...: deliveries were missed", and with no
delivery stored yet failed "newest delivery". Those rows are the initial load. The database's first completed
run now reads as such; a later run's repairs warn (and fail with no delivery) as before.

"First" is the first run to complete: a run interrupted and resumed with the same ``since`` is one
``reconcile_runs`` row (its counts carried over), and one abandoned (a new ``since``) never completed."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync.clerk_api import ClerkClient
from clerk_sync.cli.doctor import run_freshness
from clerk_sync.config import Settings
from clerk_sync.reconcile import Reconciler
from clerk_sync.store import Store
from clerk_sync.tables import reconcile_runs, webhook_events
from clerk_sync.testing import EmulatorServer


@pytest.fixture
def reconcile(store: Store, clerk: ClerkClient) -> Callable[..., Any]:
    def run(**options: Any) -> Any:
        return Reconciler(store, clerk, page_size=10).run(**options)
    return run


def _freshness(db_url: str) -> dict[str, tuple[str, str]]:
    later = time.time() + 60  # (a minute after the runs: well inside the reconcile age limit)
    return {c.name: (c.status, c.detail) for c in run_freshness(Settings.from_env({"DATABASE_URL": db_url}),
                                                                 now=lambda: later)}


def _runs(store: Store) -> list[tuple[int, str]]:
    with store.connect() as conn:
        return [(row.id, row.status) for row in conn.execute(
            sa.select(reconcile_runs.c.id, reconcile_runs.c.status).order_by(reconcile_runs.c.id))]


def _interrupt_after(clerk: ClerkClient, pages: int) -> None:
    """The ``pages + 1``-th user page request raises KeyboardInterrupt (Ctrl-C), once."""
    real, calls = clerk.list_users, []

    def listing(**kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == pages + 1:
            raise KeyboardInterrupt
        return real(**kwargs)

    clerk.list_users = listing  # type: ignore[method-assign]


def test_the_first_run_is_the_initial_load_and_a_later_runs_repairs_warn(
        db_url: str, store: Store, emu: EmulatorServer, reconcile: Callable[..., Any]) -> None:
    emu.emulator.bulk_create_users(25)
    first = reconcile()
    assert first.counts["users"].created == 25
    checks = _freshness(db_url)
    status, detail = checks["last reconcile"]
    assert status == "ok", detail
    assert f"initial load: 25 row(s) written by reconcile run {first.run_id}" in detail, detail
    assert "missed" not in detail, detail
    # no delivery yet: the new install's warning, not "while the last reconcile repaired 25 row(s)" (a fail)
    assert checks["newest delivery"] == ("warn", "no delivery stored yet: is the Clerk webhook endpoint configured?")

    emu.emulator.bulk_create_users(2)  # created in Clerk, no delivery stored: missed
    second = reconcile()
    assert second.counts["users"].created == 2
    checks = _freshness(db_url)
    status, detail = checks["last reconcile"]
    assert status == "warn" and "repaired 2 row(s)" in detail and "deliveries were missed" in detail, detail
    assert "initial load" not in detail, detail
    status, detail = checks["newest delivery"]
    assert status == "fail" and "while the last reconcile repaired 2 row(s)" in detail, detail


def test_a_first_run_interrupted_and_resumed_is_the_initial_load_of_every_row(
        db_url: str, store: Store, emu: EmulatorServer, clerk: ClerkClient, reconcile: Callable[..., Any]) -> None:
    emu.emulator.bulk_create_users(35)
    _interrupt_after(clerk, pages=2)  # 20 users written, then Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        reconcile()
    (interrupted,) = _runs(store)
    assert interrupted[1] == "interrupted"
    resumed = reconcile()  # the same row, resumed: its counts carry the interrupted part's
    assert resumed.resumed and resumed.run_id == interrupted[0]
    assert _runs(store) == [(interrupted[0], "completed")]
    status, detail = _freshness(db_url)["last reconcile"]
    assert status == "ok" and f"initial load: 35 row(s) written by reconcile run {interrupted[0]}" in detail, detail


def test_after_an_abandoned_first_run_the_first_to_complete_is_the_initial_load(
        db_url: str, store: Store, emu: EmulatorServer, clerk: ClerkClient, reconcile: Callable[..., Any]) -> None:
    emu.emulator.bulk_create_users(35)
    _interrupt_after(clerk, pages=2)
    with pytest.raises(KeyboardInterrupt):
        reconcile()
    # run with another since: the interrupted run is abandoned (never completed), a new one lists afresh
    completed = reconcile(since=datetime(2000, 1, 1, tzinfo=UTC))
    assert not completed.resumed
    assert [status for _, status in _runs(store)] == ["abandoned", "completed"]
    status, detail = _freshness(db_url)["last reconcile"]
    assert status == "ok" and f"written by reconcile run {completed.run_id}, the first to complete" in detail, detail


def test_a_first_run_after_deliveries_were_stored_repairs_as_any_run(
        db_url: str, store: Store, emu: EmulatorServer, reconcile: Callable[..., Any]) -> None:
    """The endpoint was live before the load began: a row the run wrote may be a delivery missed, so its
    repairs warn as a later run's (what ``test_operations``' disabled endpoint relies on)."""
    with store.transaction() as writer:  # a delivery stored an hour before the load, as ingest stores one
        writer.conn.execute(webhook_events.insert().values(
            svix_id="msg_before_load", type="user.updated", payload={}, status="applied",
            received_at=datetime.fromtimestamp(time.time() - 3600, UTC)))
    emu.emulator.bulk_create_users(3)
    reconcile()
    status, detail = _freshness(db_url)["last reconcile"]
    assert status == "warn" and "repaired 3 row(s)" in detail and "deliveries were missed" in detail, detail


def test_the_console_overview_reads_the_first_run_as_the_initial_load(
        db_url: str, store: Store, emu: EmulatorServer, reconcile: Callable[..., Any]) -> None:
    """The console's overview asks the same questions as ``doctor --freshness``: after the first import it
    said "deliveries were missed" too."""
    import httpx
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from clerk_sync.integrations.console import create_console
    from tests._server import running
    from tests.conftest import SECRET

    token = "operator-token-for-the-initial-load-test-0123456789"
    console = create_console(store, Settings.from_env({
        "DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "CLERK_SYNC_CONSOLE": "1",
        "CLERK_SYNC_CONSOLE_TOKEN": token}))
    emu.emulator.bulk_create_users(12)
    first = reconcile()
    with running(Starlette(routes=[Mount("/console", app=console)])) as url, httpx.Client(
            base_url=f"{url}/console", headers={"Authorization": f"Bearer {token}", "accept": "text/html"},
            timeout=30) as client:
        page = client.get("/").text
    assert f"initial load: 12 row(s) written by reconcile run {first.run_id}" in page
    assert "deliveries were missed" not in page


def test_a_first_run_that_updates_or_deletes_rows_repairs_them(
        db_url: str, store: Store, emu: EmulatorServer, reconcile: Callable[..., Any]) -> None:
    """Review: the inbox is pruned (3 days at least), so on an install whose reconcile never completed and whose
    endpoint broke longer ago, the first run finds rows written by deliveries, now stale or gone in Clerk. Those
    are repairs, missed deliveries, even in the first run: only the rows it creates are the initial load."""
    from clerk_sync.engine import Entity, Upsert
    from clerk_sync.events import user_record
    from tests import factories as f

    kept = emu.create_user(email="kept@example.com")
    with store.transaction() as writer:  # what deliveries wrote long ago (their inbox rows pruned since)
        writer.apply(Upsert(Entity.USER, user_record(f.user(kept["id"], 1, email="old@example.com"))))
        writer.apply(Upsert(Entity.USER, user_record(f.user("user_gone_from_clerk", 1, email="gone@example.com"))))
    emu.emulator.bulk_create_users(3)
    first = reconcile()
    assert (first.counts["users"].created, first.counts["users"].updated, first.counts["users"].deleted) == (3, 1, 1)
    status, detail = _freshness(db_url)["last reconcile"]
    assert status == "warn" and "deliveries were missed" in detail, detail
    assert "initial load: 3 row(s) written" in detail and "repaired 2 row(s) that were there before it" in detail
