"""Organizations and memberships are listed by offset (Clerk has no cursor for them). An object deleted in
Clerk between two pages moves every later one a place down, so the first object of the next page was in no
page: one we hold is repaired by the sweep's confirmation, but one we lack (its ``*.created`` webhook missed:
the drift reconcile is for) was never created, in a run reported ``completed``. A page whose
``total_count`` fell since the page before is now preceded by the objects that many places before it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync.clerk_api import ClerkClient
from clerk_sync.reconcile import Reconciler
from clerk_sync.store import Store
from clerk_sync.tables import organization_memberships, organizations
from clerk_sync.testing import EmulatorServer


def _live(store: Store, table: sa.Table) -> set[str]:
    with store.connect() as conn:
        return set(conn.execute(sa.select(table.c.clerk_id).where(table.c.deleted_at.is_(None))).scalars())


def _deleting_after(real: Callable[..., Any], offset: int, delete: Callable[[], None]) -> Callable[..., Any]:
    """``real`` (a listing method), deleting in Clerk right after the page at ``offset`` is answered, once."""
    done: list[bool] = []

    def listing(**kwargs: Any) -> Any:
        page = real(**kwargs)
        if kwargs.get("offset") == offset and not done:
            done.append(True)
            delete()
        return page
    return listing


@pytest.mark.parametrize("prefetch", [1, 3])
@pytest.mark.parametrize("victim", [0, 5], ids=["before the next page", "after it"])
def test_an_organization_deleted_between_pages_hides_none_we_lack(
        store: Store, emu: EmulatorServer, clerk: ClerkClient, prefetch: int, victim: int) -> None:
    ids = [emu.create_organization(name=f"o{i}")["id"] for i in range(7)]
    gone = ids[victim]
    clerk.list_organizations = _deleting_after(  # type: ignore[method-assign]
        clerk.list_organizations, 0, lambda: emu.request("DELETE", f"/v1/organizations/{gone}"))
    report = Reconciler(store, clerk, page_size=2, prefetch=prefetch).run()
    live_in_clerk = {o["id"] for o in emu.request("GET", "/v1/organizations", params={"limit": 50})["data"]}
    assert live_in_clerk == set(ids) - {gone}
    # every organization Clerk still lists is written (the one deleted too, if listed before it went)
    assert live_in_clerk <= _live(store, organizations), live_in_clerk - _live(store, organizations)
    assert report.counts["organizations"].created <= len(ids)  # one create each at most: no double count


def test_a_membership_deleted_between_pages_hides_none_we_lack(
        store: Store, emu: EmulatorServer, clerk: ClerkClient) -> None:
    org = emu.create_organization(name="big")["id"]
    members = [emu.create_user(email=f"m{i}@example.com")["id"] for i in range(7)]
    for user in members:
        emu.add_membership(org, user)
    clerk.list_all_organization_memberships = _deleting_after(  # type: ignore[method-assign]
        clerk.list_all_organization_memberships, 2,
        lambda: emu.request("DELETE", f"/v1/organizations/{org}/memberships/{members[0]}"))
    Reconciler(store, clerk, page_size=2, prefetch=1).run()
    listed = emu.request("GET", f"/v1/organizations/{org}/memberships", params={"limit": 50})["data"]
    assert len(listed) == 6
    assert {m["id"] for m in listed} <= _live(store, organization_memberships)
