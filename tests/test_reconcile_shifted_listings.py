"""Offset listings whose objects move while a reconcile reads them (review, stop 60): a deletion in Clerk
before the point reached moves the next objects up, and the one that crosses the page boundary was in no
page (a live object we lack never created, the run "completed"). Against the emulator, on every store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync.errors import ClerkUnavailable
from clerk_sync.reconcile import Reconciler
from clerk_sync.store import Store
from clerk_sync.tables import organizations, users
from clerk_sync.testing import EmulatorServer
from tests.conftest import clerk_client


def _held(store: Store, table: sa.Table) -> set[str]:
    with store.connect() as conn:
        return set(conn.execute(sa.select(table.c.clerk_id).where(table.c.deleted_at.is_(None))).scalars())


def test_a_resumed_run_reads_the_objects_deletions_moved_below_its_cursor(db_url: str, emu: EmulatorServer) -> None:
    """Killed after its first page; while it was down, an organization of that page is deleted in Clerk: the
    resumed run started at its cursor, and the organization that moved below it was never created."""
    store = Store.from_url(db_url)
    ids = [emu.create_organization(name=f"o{i}")["id"] for i in range(7)]
    with clerk_client(emu) as clerk:
        listed = clerk.list_organizations

        def killed_at_the_second_page(**query: Any) -> Any:
            if query.get("offset") == 2 and not query.get("org_ids"):
                raise ClerkUnavailable("the process is killed here", retry_after=1.0)
            return listed(**query)

        clerk.list_organizations = killed_at_the_second_page  # type: ignore[method-assign]
        with pytest.raises(ClerkUnavailable):
            Reconciler(store, clerk, page_size=2, prefetch=1).run()
        assert _held(store, organizations) == set(ids[:2])
        clerk.list_organizations = listed  # type: ignore[method-assign]
        emu.request("DELETE", f"/v1/organizations/{ids[0]}")  # (its webhook would tombstone it)
        report = Reconciler(store, clerk, page_size=2, prefetch=1).run()
    assert report.resumed
    assert _held(store, organizations) >= set(ids[1:])  # o2 too, moved to offset 1 meanwhile
    # the page read again is not counted again (o1, unchanged since the first process counted it created)
    assert (report.counts["organizations"].created, report.counts["organizations"].unchanged) == (7, 0)
    store.dispose()


def test_with_since_a_user_deleted_between_two_pages_hides_no_other(db_url: str, emu: EmulatorServer) -> None:
    """Users by ``-updated_at`` come by offset with no total_count to tell a deletion by: one deleted in Clerk
    after its page was read moved every later user up one, and the first of the next page was in none."""
    store = Store.from_url(db_url)
    since = datetime.now(UTC) - timedelta(minutes=5)
    ids = [emu.create_user(email=f"u{i}@example.com")["id"] for i in range(25)]
    deleted: list[str] = []
    with clerk_client(emu) as clerk:
        listed = clerk.list_users

        def one_deleted_after_the_first_page(**query: Any) -> Any:
            page = listed(**query)
            if query.get("order_by") == "-updated_at" and query.get("offset") == 0 and not deleted:
                deleted.append(page[0]["id"])
                emu.request("DELETE", f"/v1/users/{deleted[0]}")
            return page

        clerk.list_users = one_deleted_after_the_first_page  # type: ignore[method-assign]
        report = Reconciler(store, clerk, page_size=10, prefetch=1).run(since=since)
    assert deleted
    assert _held(store, users) >= set(ids) - set(deleted)  # every live user updated since: none hidden
    assert report.counts["users"].unchanged == 0  # the overlap's repeats are passed over, not counted again
    store.dispose()
