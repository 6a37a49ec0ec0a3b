"""Security review of 2026-12-05, finding 5: the Django admin showed delivery payloads and users' private and
unsafe metadata in full, with no audit row, while the console masks them and audits each reveal. The admin
now masks them with the console's own rules, refuses filters on them, and stays read-only."""

from __future__ import annotations

from html import unescape

import sqlalchemy as sa

from clerk_sync.integrations.console._masking import MASK
from clerk_sync.tables import audit_log, organizations, users, webhook_events
from tests.django.conftest import World, bearer

ADMIN = "/django-admin/clerk_sync"
PRIVATE = "ssn-078-05-1120"  # what must never appear
UNSAFE = "my-diary-entry"
PUBLIC = "app-internal-note"


def _shown(page: bytes) -> str:
    return unescape(page.decode())


def _world(world: World) -> tuple[dict[str, str], str]:
    clerk = world.clerk
    admin = clerk.create_user("root@example.com", public_metadata={"role": "admin"})
    ada = clerk.create_user("ada@example.com", public_metadata={"role": "member", "note": PUBLIC},
                            private_metadata={"ssn": PRIVATE}, unsafe_metadata={"diary": UNSAFE})
    clerk.wait_for_deliveries()
    return bearer(clerk.mint_session_token(admin["id"])), ada["id"]


def test_the_admin_shows_payloads_and_metadata_masked(client_world: World) -> None:
    as_admin, ada = _world(client_world)
    store = client_world.store
    with store.connect() as conn:
        e = webhook_events.c
        [delivery] = [row_id for row_id, payload in conn.execute(sa.select(e.id, e.payload))
                      if payload["type"] == "user.created" and payload["data"]["id"] == ada]
        user_pk = conn.execute(sa.select(users.c.id).where(users.c.clerk_id == ada)).scalar_one()
    with store.transaction() as w:  # an organization with private metadata of its own
        w.conn.execute(organizations.insert().values(
            clerk_id="org_1", name="Acme", slug="acme", public_metadata={"tier": PUBLIC},
            private_metadata={"bank": PRIVATE}, plan="", clerk_updated_at=1, created_at=w.now, updated_at=w.now))
    with store.connect() as conn:
        org_pk = conn.execute(sa.select(organizations.c.id).where(organizations.c.clerk_id == "org_1")).scalar_one()
        audit_before = conn.execute(sa.select(sa.func.count()).select_from(audit_log)).scalar_one()

    page = client_world.app.get(f"{ADMIN}/webhookdelivery/{delivery}/change/", headers=as_admin)
    assert page.status_code == 200, page.content
    shown = _shown(page.content)
    for secret in (PRIVATE, UNSAFE, PUBLIC, "ada@example.com"):
        assert secret not in shown, secret
    assert "payload (masked" in shown.lower() and MASK in shown and ada in shown  # ids and types stay

    page = client_world.app.get(f"{ADMIN}/clerkuser/{user_pk}/change/", headers=as_admin)
    assert page.status_code == 200, page.content
    shown = _shown(page.content)
    for secret in (PRIVATE, UNSAFE, PUBLIC, '"ssn"', '"diary"', '"note"'):
        assert secret not in shown, secret
    assert "private metadata (masked" in shown.lower() and "unsafe metadata (masked" in shown.lower()
    assert '"role": "member"' in shown  # the role clerk-sync reads stays, as in the console

    page = client_world.app.get(f"{ADMIN}/clerkorganization/{org_pk}/change/", headers=as_admin)
    assert page.status_code == 200, page.content
    shown = _shown(page.content)
    for secret in (PRIVATE, PUBLIC, '"bank"', '"tier"'):
        assert secret not in shown, secret
    assert "private metadata (masked" in shown.lower() and "Acme" in shown

    # Still read-only: no form to save, and a POST changes nothing.
    assert 'name="_save"' not in shown
    refused = client_world.app.post(f"{ADMIN}/clerkuser/{user_pk}/change/",
                                    {"private_metadata": "{}", "_save": "Save"}, headers=as_admin)
    assert refused.status_code == 403
    with store.connect() as conn:
        assert conn.execute(sa.select(users.c.private_metadata).where(users.c.id == user_pk)).scalar_one() == \
            {"ssn": PRIVATE}
        assert conn.execute(sa.select(sa.func.count()).select_from(audit_log)).scalar_one() == audit_before


def test_the_admin_refuses_filters_on_masked_fields(client_world: World) -> None:
    """Django lets any lookup on a local field through the query string: ``?private_metadata__ssn=…`` would
    tell, one guess at a time, what the masked value is."""
    as_admin, _ = _world(client_world)
    for path, lookup in ((f"{ADMIN}/clerkuser/", f"private_metadata__ssn={PRIVATE}"),
                         (f"{ADMIN}/clerkuser/", "unsafe_metadata__icontains=diary"),
                         (f"{ADMIN}/clerkuser/", "public_metadata__note=x"),
                         (f"{ADMIN}/clerkorganization/", "private_metadata__bank=x"),
                         (f"{ADMIN}/webhookdelivery/", "payload__icontains=ada@example.com")):
        refused = client_world.app.get(f"{path}?{lookup}", headers=as_admin)
        assert refused.status_code == 400, (lookup, refused.status_code)
    assert client_world.app.get(f"{ADMIN}/clerkuser/?role=member", headers=as_admin).status_code == 200
    assert client_world.app.get(f"{ADMIN}/webhookdelivery/?status__exact=applied", headers=as_admin).status_code == 200
