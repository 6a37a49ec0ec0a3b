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
    pages: list[list[Any]] = []
    failed: list[bool] = []
    real = clerk.list_users

    def flaky(**kwargs: Any) -> Any:  # the fifth page request fails, once
        calls.append(kwargs)
        if len(calls) == 5 and not failed:
            failed.append(True)
            raise ClerkUnavailable("simulated outage", retry_after=1.0)
        pages.append(real(**kwargs))
        return pages[-1]

    clerk.list_users = flaky  # type: ignore[method-assign]
    with pytest.raises(ClerkUnavailable):
        Reconciler(store, clerk, page_size=50).run()
    with store.connect() as conn:
        run = conn.execute(sa.select(reconcile_runs)).mappings().one()
        stored = conn.execute(sa.select(users.c.clerk_id).order_by(users.c.id)).scalars().all()
    assert (run["status"], run["cursor"], run["created"]) == ("failed", 200, 200)
    last = pages[3][-1]["id"]  # the last user of the last committed page (the fourth)
    assert run["details"]["after"] == last and last in stored
    calls.clear()
    report = Reconciler(store, clerk, page_size=50).run()
    assert report.resumed and report.counts["users"].created == 420
    assert calls[0]["starting_after"] == last and all(c.get("offset", 0) == 0 for c in calls)
    assert _live_users(store) == 420


def test_the_cursor_request_carries_no_offset() -> None:
    params = dict(ep.list_users(500, 0, "+created_at", (), "user_2x").params)
    assert params == {"limit": "500", "order_by": "+created_at", "starting_after": "user_2x"}
    with pytest.raises(ValueError, match="non-zero offset"):
        ep.list_users(500, 500, "+created_at", (), "user_2x")


def _run_row(store: Store) -> Any:
    with store.connect() as conn:
        return conn.execute(sa.select(reconcile_runs).order_by(reconcile_runs.c.id.desc())).mappings().first()


def test_a_resume_whose_anchor_was_deleted_lists_the_users_after_it(
        store: Store, clerk: ClerkClient, shallow: EmulatorServer) -> None:
    """The stored cursor names a user deleted in Clerk before the resume: Clerk answers an empty page after
    it, which would end the listing with 220 users unread, and the run would report itself completed."""
    real, calls = clerk.list_users, []

    def failing_once(**kwargs: Any) -> Any:  # the fifth page request: four pages (200 users) committed
        calls.append(kwargs)
        if len(calls) == 5:
            raise ClerkUnavailable("simulated outage", retry_after=1.0)
        return real(**kwargs)

    clerk.list_users = failing_once  # type: ignore[method-assign]
    with pytest.raises(ClerkUnavailable):
        Reconciler(store, clerk, page_size=50).run()
    assert _run_row(store)["cursor"] == 200
    anchor = _run_row(store)["details"]["after"]
    shallow.request("DELETE", f"/v1/users/{anchor}")
    report = Reconciler(store, clerk, page_size=50).run()
    assert report.resumed and report.counts["users"].created == 420  # the 200 before, the 220 after the anchor
    # (the anchor was listed before its deletion, by this run: its user.deleted webhook tombstones it)
    assert _live_users(store) == 420 and _run_row(store)["status"] == "completed"


@pytest.mark.parametrize("answer", ["empty page", "refused"])
def test_an_anchor_deleted_during_the_run_loses_no_user(store: Store, clerk: ClerkClient, shallow: EmulatorServer,
                                                        answer: str) -> None:
    """A user deleted between its page and the next (routine: people delete their accounts) is the next
    request's cursor. Clerk may answer an empty page or refuse the cursor; either way the users after it
    are listed, and an in-sync mirror is not mistaken for a mass deletion."""
    Reconciler(store, clerk, page_size=50).run()  # the mirror is in sync: 420 live users
    real, deleted = clerk.list_users, []

    def deleting(**kwargs: Any) -> Any:
        after = kwargs.get("starting_after")
        if after and not deleted and _page_count(after, shallow) == 3:
            shallow.request("DELETE", f"/v1/users/{after}")
            deleted.append(after)
        if answer == "refused" and after in deleted:
            raise ClerkAPIError("starting_after names no user", status=422, method="GET", path="/users")
        return real(**kwargs)

    clerk.list_users = deleting  # type: ignore[method-assign]
    report = Reconciler(store, clerk, page_size=50).run()
    assert deleted and report.counts["users"].unchanged == 420  # every user listed (the anchor, before it went)
    assert _run_row(store)["status"] == "completed"


def _page_count(user_id: str, emu: EmulatorServer) -> int:
    """Which page (of 50) lists ``user_id`` last: the cursor before the fourth page is the third's last."""
    ids = [u["id"] for u in emu.request("GET", "/v1/users", params={"limit": 500, "order_by": "+created_at"})]
    return (ids.index(user_id) + 1) // 50 if user_id in ids else -1
