"""Reconcile counts only what it repairs and what it could not read: a membership of a user erased here is
gone for good (not "created" on every run); an item of a listing that is not an object is counted failed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from clerk_sync.reconcile import Change, Reconciler
from clerk_sync.retention import Retention, RetentionPolicy
from clerk_sync.store import Store
from clerk_sync.tables import organization_memberships
from clerk_sync.testing import EmulatorServer
from tests.conftest import clerk_client


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
