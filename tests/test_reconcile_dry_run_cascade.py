"""A dry run reports the deletions the real run makes. Found by an adopter walkthrough: when a user (or an
organization) is gone from Clerk, the real run's tombstone cascades to its memberships, and the membership
sweep then finds them deleted already (0); the dry run, which writes nothing, counted them again as membership
deletions. On SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

from clerk_sync.reconcile import Reconciler
from clerk_sync.store import Store
from clerk_sync.testing import EmulatorServer
from tests.conftest import clerk_client


def _deleted(report: object) -> dict[str, int]:
    return {name: c.deleted for name, c in report.counts.items()}  # type: ignore[attr-defined]


def test_a_dry_run_counts_the_deletions_the_real_run_makes(store: Store, emu: EmulatorServer) -> None:
    ada = emu.create_user(email="ada@example.com")
    bob = emu.create_user(email="bob@example.com")
    acme = emu.create_organization("Acme", created_by=ada["id"])
    emu.request("POST", f"/v1/organizations/{acme['id']}/memberships", json={"user_id": bob["id"], "role": "org:member"})
    beta = emu.create_organization("Beta", created_by=bob["id"])
    emu.request("POST", f"/v1/organizations/{beta['id']}/memberships", json={"user_id": ada["id"], "role": "org:member"})
    with clerk_client(emu) as clerk:
        Reconciler(store, clerk, page_size=50).run()
        emu.request("DELETE", f"/v1/users/{ada['id']}")  # with her two memberships
        emu.request("DELETE", f"/v1/organizations/{beta['id']}")  # with bob's
        planned = Reconciler(store, clerk, page_size=50).run(dry_run=True)
        done = Reconciler(store, clerk, page_size=50).run()
    assert _deleted(done) == {"users": 1, "organizations": 1, "organization_memberships": 0}
    assert _deleted(planned) == _deleted(done)
