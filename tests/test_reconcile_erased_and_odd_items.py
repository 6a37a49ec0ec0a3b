"""Reconcile counts only what it repairs and what it could not read: a membership of a user erased here is
gone for good (not "created" on every run); an item of a listing that is not an object is counted failed."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync.clerk_api import ClerkClient
from clerk_sync.clerk_api.ratelimit import LocalBudget, RateLimit
from clerk_sync.errors import ClerkAPIError
from clerk_sync.reconcile import Change, Reconciler
from clerk_sync.retention import Retention, RetentionPolicy
from clerk_sync.store import Store
from clerk_sync.tables import organization_memberships
from clerk_sync.testing import EmulatorServer
from tests import factories as f
from tests._server import running
from tests.conftest import clerk_client
from tests.test_reconcile import RETRY, ClerkStandIn

SINCE = datetime(2026, 1, 1, tzinfo=UTC)
SINCE_MS = int(SINCE.timestamp() * 1000)


def test_a_membership_of_a_user_erased_here_is_not_reported_created_on_every_run(
        store: Store, emu: EmulatorServer) -> None:
    """Review: only the erased user's digest is left after prune's hard delete; her membership (Clerk still
    lists it) was decided an insert, counted and reported "created" on every run, then refused by the guarded
    insert: doctor --freshness failed on the repair, and the drift gauge was fed it."""
    ada, eve = emu.create_user(email="ada@example.com"), emu.create_user(email="eve@example.com")
    acme = emu.create_organization("Acme", created_by=ada["id"])
    with clerk_client(emu) as clerk:
        Reconciler(store, clerk, page_size=50).run()
        Retention(store).erase_user(eve["id"], reason="DSR-1")
        later = datetime.now(UTC) + timedelta(days=2)
        assert Retention(store, RetentionPolicy(delete_tombstones_after=timedelta(days=1)),
                         now=lambda: later).prune().erased == 1
        emu.add_membership(acme["id"], eve["id"])  # still Clerk's user: she joins Acme there
        for _ in range(2):
            changes: list[Change] = []
            report = Reconciler(store, clerk, page_size=50, on_change=changes.append).run()
            assert changes == [] and report.counts["organization_memberships"].created == 0
    with store.connect() as conn:
        users_of = conn.execute(sa.select(organization_memberships.c.user_clerk_id)).scalars().all()
    assert users_of == [ada["id"]]


@pytest.fixture
def odd_clerk() -> Iterator[tuple[ClerkStandIn, ClerkClient]]:
    clerk = ClerkStandIn()
    with running(clerk.app) as url, ClerkClient("sk_test_stand_in", api_url=url, retry=RETRY,
                                                budget=LocalBudget(RateLimit(10_000, 1.0))) as client:
        yield clerk, client


def _undated(user_id: str) -> dict[str, Any]:
    user = f.user(user_id, 1)
    del user["updated_at"]
    return user


@pytest.mark.parametrize("since", [None, SINCE], ids=["cursor", "since"])
def test_items_that_are_not_readable_objects_are_counted_failed(
        store: Store, odd_clerk: tuple[ClerkStandIn, ClerkClient], since: datetime | None) -> None:
    """Review: a null or a string in a listing raised AttributeError (a traceback, exit 1); with --since, a
    user without a numeric updated_at was dropped uncounted, and the shorter page ended the run early (exit 0),
    the users after it unread."""
    clerk, client = odd_clerk
    clerk.users = [None, "user_x", _undated("user_undated"), f.user("user_a", SINCE_MS + 2),  # type: ignore[list-item]
                   f.user("user_b", SINCE_MS + 1)]
    report = Reconciler(store, client, page_size=3).run(since=since)
    assert (report.counts["users"].created, report.counts["users"].failed) == (2, 3)


def test_with_since_a_user_without_updated_at_does_not_end_the_listing(
        store: Store, odd_clerk: tuple[ClerkStandIn, ClerkClient]) -> None:
    clerk, client = odd_clerk
    clerk.users = [f.user("user_a", SINCE_MS + 3), _undated("user_undated"), f.user("user_b", SINCE_MS + 2),
                   f.user("user_c", SINCE_MS + 1), f.user("user_old", SINCE_MS - 1), f.user("user_older", 1)]
    report = Reconciler(store, client, page_size=2).run(since=SINCE)
    assert (report.counts["users"].created, report.counts["users"].failed) == (3, 1)
    assert clerk.requests["users"] == 3  # the page holding an older user ends the listing


def test_with_since_rows_moved_by_updates_meanwhile_do_not_stop_the_run(
        store: Store, odd_clerk: tuple[ClerkStandIn, ClerkClient]) -> None:
    """Review: users updated between two pages of the -updated_at listing move to its front, and the next page
    repeats ids already read: the run stopped, blaming CLERK_API_URL. One such page is read past."""
    clerk, client = odd_clerk
    clerk.users = [f.user(f"user_{i}", SINCE_MS + i) for i in range(6, 0, -1)]  # newest first
    listed = client.list_users

    def edited_meanwhile(**query: Any) -> list[dict[str, Any]]:
        page = listed(**query)
        if query.get("offset") == 0:  # two users edited in Clerk: now the newest
            clerk.users = clerk.users[-2:] + clerk.users[:-2]
        return page

    client.list_users = edited_meanwhile  # type: ignore[method-assign]
    report = Reconciler(store, client, page_size=2).run(since=SINCE)
    assert report.counts["users"].created == 4  # (the two edited meanwhile: their webhooks bring them)


def test_with_since_a_listing_that_ignores_offset_still_stops(
        store: Store, odd_clerk: tuple[ClerkStandIn, ClerkClient]) -> None:
    clerk, client = odd_clerk
    clerk.users = [f.user(f"user_{i}", SINCE_MS + i) for i in range(6, 0, -1)]
    clerk.broken["users"] = "repeat"
    with pytest.raises(ClerkAPIError, match="the page at offset 18 brings no id the pages before it did not "
                                            r"\(nor did the 8 pages before it\)"):
        Reconciler(store, client, page_size=2).run(since=SINCE)
