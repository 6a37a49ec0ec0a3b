"""Reconcile's deletion sweep on PostgreSQL: the run's staged ids (``reconcile_seen``, or a dry run's TEMPORARY
twin) are new rows the statistics have never seen. Estimated at a row or so, the anti-join against the live rows
became a nested loop scanning every staged id for every live row: past 20,000 users or memberships the sweep ran
over the statement timeout, and every resumed run failed again at the same step (a walkthrough with large
organizations). The sweep analyses the staged ids first; these tests read the plan PostgreSQL chose for the
sweep's own statement, on the run's own connection, in a real run."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync.clerk_api import ClerkClient
from clerk_sync.clerk_api.ratelimit import RateLimit
from clerk_sync.reconcile import Reconciler
from clerk_sync.store import Store
from clerk_sync.testing import EmulatorServer
from tests.conftest import clerk_client
from tests.test_reconcile import RETRY

USERS = 3_000


@pytest.fixture
def pg_store(store: Store) -> Store:
    if store.dialect != "postgresql":
        pytest.skip("PostgreSQL's planner and its statistics (ANALYZE) are what this guards")
    return store


@pytest.fixture
def clerk(emu: EmulatorServer) -> Iterator[ClerkClient]:
    with clerk_client(emu, limit=RateLimit(200, 1.0), retry=RETRY) as c:
        yield c


def _sweep_plans(store: Store) -> Iterator[list[str]]:
    """The plans of the sweep's candidate queries (live rows Clerk did not list), explained on the cursor that
    is about to run each, so a dry run's TEMPORARY table and the run's own statistics are the ones seen."""
    plans: list[str] = []

    def explain(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if "NOT (EXISTS" in statement and "reconcile_seen" in statement:
            cursor.execute("EXPLAIN " + statement, parameters)
            plans.append("\n".join(row[0] for row in cursor.fetchall()))

    sa.event.listen(store.engine, "before_cursor_execute", explain)
    try:
        yield plans
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", explain)


def _quadratic(plan: str) -> bool:
    """A nested loop that compares each live row with every staged id (a join filter, not an index condition
    on the id): the plan PostgreSQL picks when it takes the run's staged ids for a row or so."""
    return "Nested Loop Anti Join" in plan and re.search(r"Join Filter: \(\(reconcile_seen\w*\.clerk_id", plan) is not None


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_the_sweep_never_scans_the_staged_ids_once_per_live_row(pg_store: Store, clerk: ClerkClient,
                                                                emu: EmulatorServer, dry_run: bool) -> None:
    emu.emulator.bulk_create_users(USERS)
    assert Reconciler(pg_store, clerk, page_size=500).run().counts["users"].created == USERS
    with pg_store.engine.begin() as conn:  # what autovacuum leaves between runs: the live rows known, the
        conn.exec_driver_sql("ANALYZE users")  # staging table analysed while it was empty
        conn.exec_driver_sql("ANALYZE reconcile_seen")
    gen = _sweep_plans(pg_store)
    plans = next(gen)
    try:
        report = Reconciler(pg_store, clerk, page_size=500).run(dry_run=dry_run)
    finally:
        gen.close()
    assert report.total("deleted") == 0 and report.counts["users"].unchanged == USERS
    users_plans = [plan for plan in plans if " on users " in plan]  # (the few organizations: any plan is fast)
    assert len(users_plans) == (1 if dry_run else 2), plans  # (a real run: the mass-delete guard's count first)
    assert not any(_quadratic(plan) for plan in users_plans), users_plans
