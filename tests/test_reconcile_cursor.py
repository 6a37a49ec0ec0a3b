"""Reconcile pages users by cursor (``starting_after``), not by offset: Clerk's spec says a large ``offset``
"gets progressively slower and eventually times out", so an instance with many users could never finish a
run (and a resumed run would time out at the same offset again). The emulator's ``max_user_offset`` answers
504 past a depth, as Clerk does."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync.clerk_api import ClerkClient, RetryPolicy
from clerk_sync.clerk_api import _endpoints as ep
from clerk_sync.clerk_api.ratelimit import RateLimit
from clerk_sync.errors import ClerkAPIError, ClerkUnavailable
from clerk_sync.reconcile import Reconciler
from clerk_sync.store import Store
from clerk_sync.tables import reconcile_runs, users
from clerk_sync.testing import EmulatorServer
from tests.conftest import clerk_client

RETRY = RetryPolicy(attempts=2, backoff_s=0.02, backoff_max_s=0.05, deadline_s=5.0)
DEEPEST = 100  # the deepest offset this emulator answers


@pytest.fixture
def shallow() -> Iterator[EmulatorServer]:
    with EmulatorServer(max_user_offset=DEEPEST) as emu:
        emu.emulator.bulk_create_users(420)
        yield emu


@pytest.fixture
def clerk(shallow: EmulatorServer) -> Iterator[ClerkClient]:
    with clerk_client(shallow, limit=RateLimit(200, 1.0), retry=RETRY) as c:
        yield c


def _live_users(store: Store) -> int:
    with store.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(users)
                                .where(users.c.deleted_at.is_(None))).scalar_one())


def test_the_emulator_times_out_a_deep_offset(shallow: EmulatorServer, clerk: ClerkClient) -> None:
    """The stand-in does what the test below relies on: past the depth, an offset fails; a cursor does not."""
    with pytest.raises((ClerkUnavailable, ClerkAPIError)):
        clerk.list_users(limit=50, offset=DEEPEST + 50, order_by="+created_at")
    first = clerk.list_users(limit=50, order_by="+created_at")
    after = clerk.list_users(limit=50, order_by="+created_at", starting_after=first[-1]["id"])
    deep = clerk.list_users(limit=50, offset=50, order_by="+created_at")
    assert [u["id"] for u in after] == [u["id"] for u in deep]


def test_users_past_the_deepest_offset_are_listed(store: Store, clerk: ClerkClient) -> None:
    report = Reconciler(store, clerk, page_size=50).run()
    assert report.counts["users"].created == 420
    assert _live_users(store) == 420


def test_a_failed_run_resumes_after_the_last_committed_user(store: Store, clerk: ClerkClient) -> None:
    """The resumed run goes on from the stored id: re-listing from the start, or by offset, would not do."""
    calls: list[dict[str, Any]] = []
    failed: list[bool] = []
    real = clerk.list_users

    def flaky(**kwargs: Any) -> Any:  # the fifth page request fails, once
        calls.append(kwargs)
        if len(calls) == 5 and not failed:
            failed.append(True)
            raise ClerkUnavailable("simulated outage", retry_after=1.0)
        return real(**kwargs)

    clerk.list_users = flaky  # type: ignore[method-assign]
    with pytest.raises(ClerkUnavailable):
        Reconciler(store, clerk, page_size=50).run()
    with store.connect() as conn:
        run = conn.execute(sa.select(reconcile_runs)).mappings().one()
        stored = conn.execute(sa.select(users.c.clerk_id).order_by(users.c.id)).scalars().all()
    assert (run["status"], run["cursor"], run["created"]) == ("failed", 200, 200)
    assert run["details"]["after"] == stored[-1]  # the last user of the last committed page
    calls.clear()
    report = Reconciler(store, clerk, page_size=50).run()
    assert report.resumed and report.counts["users"].created == 420
    assert calls[0]["starting_after"] == stored[-1] and all(c.get("offset", 0) == 0 for c in calls)
    assert _live_users(store) == 420


def test_the_cursor_request_carries_no_offset() -> None:
    params = dict(ep.list_users(500, 0, "+created_at", (), "user_2x").params)
    assert params == {"limit": "500", "order_by": "+created_at", "starting_after": "user_2x"}
    with pytest.raises(ValueError, match="non-zero offset"):
        ep.list_users(500, 500, "+created_at", (), "user_2x")
