"""examples/django_saas: /org confirms the membership against the DB, a role change needs a role, the
settings refuse to start without DJANGO_SECRET_KEY, pages carry X-Frame-Options, and manage.py works."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.django.conftest import World, bearer, world_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def admin_login_world(db_url: str) -> Iterator[World]:
    """The test client, with the Django admin's login page public as in the example's settings."""
    with world_for(db_url, "test-client", PUBLIC_PREFIXES=["/django-admin/login/"]) as w:
        yield w


def test_a_member_removed_from_the_org_is_refused_with_a_token_from_before(client_world: World) -> None:
    clerk, app = client_world.clerk, client_world.app
    owner = clerk.create_user("owner@example.com")
    leaver = clerk.create_user("leaver@example.com")
    org = clerk.create_organization("Acme", created_by=owner["id"])
    clerk.add_membership(org["id"], leaver["id"])
    clerk.wait_for_deliveries()
    token = bearer(clerk.mint_session_token(leaver["id"], org_id=org["id"]))  # org claims for 60 s
    assert app.get("/org", headers=token).json()["your_role"] == "org:member"
    clerk.request("DELETE", f"/v1/organizations/{org['id']}/memberships/{leaver['id']}")
    clerk.wait_for_deliveries()  # organizationMembership.deleted applied
    refused = app.get("/org", headers=token)
    assert (refused.status_code, refused.json()["error"]) == (403, "access_denied")
    owner_page = app.get("/org", headers=bearer(clerk.mint_session_token(owner["id"], org_id=org["id"])))
    assert owner_page.json()["members"] == [{"email": "owner@example.com", "role": "org:admin"}]


def test_a_role_change_without_a_role_is_a_bad_request_and_answers_the_role_set(client_world: World) -> None:
    clerk, app = client_world.clerk, client_world.app
    admin = clerk.create_user("root@example.com", public_metadata={"role": "admin"})
    bob = clerk.create_user("bob@example.com")
    clerk.wait_for_deliveries()
    headers = bearer(clerk.mint_session_token(admin["id"]))
    missing = app.post(f"/admin/users/{bob['id']}/role", headers=headers)
    assert (missing.status_code, missing.json()["error"]) == (400, "bad_request")
    done = app.post(f"/admin/users/{bob['id']}/role?role=admin", headers=headers)
    assert done.json() == {"user": bob["id"], "role": "admin", "status": "applied", "previous": "user"}


def test_the_admin_login_page_carries_x_frame_options(admin_login_world: World) -> None:
    page = admin_login_world.app.get("/django-admin/login/")
    assert page.status_code == 200
    assert page.headers["X-Frame-Options"] == "DENY"


def _without_key() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k != "DJANGO_SECRET_KEY" and not k.startswith("CLERK_") and k != "DATABASE_URL"}
    return env | {"PYTHONPATH": str(ROOT)}


def test_the_settings_refuse_to_load_without_django_secret_key() -> None:
    result = subprocess.run([sys.executable, "-c", "import examples.django_saas.settings"], cwd=ROOT,
                            env=_without_key(), capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "ImproperlyConfigured: DJANGO_SECRET_KEY is not set" in result.stderr, result.stderr


def test_manage_py_runs_clerk_sync_migrate(tmp_path: Path) -> None:
    db = tmp_path / "example.db"
    env = _without_key() | {"DJANGO_SECRET_KEY": "test-" + "k" * 50, "EXAMPLE_DB": str(db),  # + what the checks need
                            "CLERK_WEBHOOK_SIGNING_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                            "CLERK_SECRET_KEY": "sk_test_not_called_by_migrate"}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    result = subprocess.run([sys.executable, "examples/django_saas/manage.py", "clerk_sync", "migrate"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    engine = sa.create_engine(f"sqlite:///{db}")
    try:
        assert {"users", "organizations", "organization_memberships"} <= set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
