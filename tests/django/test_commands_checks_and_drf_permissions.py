"""The Django face as a demanding adopter uses it: the management command's exit codes,
the webhook under Django's ``LoginRequiredMiddleware``, a demotion under a Django login session, system checks
that missed a database driver or a subclassed middleware, and DRF's composed permission classes."""

from __future__ import annotations

import sys
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client, override_settings

from clerk_sync.auth.users import read_user
from clerk_sync.integrations.django.checks import check_settings
from clerk_sync.integrations.django.middleware import ClerkMiddleware
from clerk_sync.integrations.django.runtime import get_clerk_sync
from clerk_sync.testing import EmulatorServer
from tests import factories as f
from tests.django.conftest import World, bearer, django_database, emulator_settings
from tests.django.test_checks_csrf_and_shared_clients import BASE, CHECKED

BACKEND = "clerk_sync.integrations.django.backends.ClerkBackend"

# -- manage.py clerk_sync: exit codes -------------------------------------------------------------------


def test_manage_py_reconcile_fails_when_clerk_objects_could_not_be_read(client_world: World) -> None:
    """Fixed: ``clerk-sync reconcile`` exits 1 when Clerk listed objects it could not read (their rows left
    unrepaired); ``manage.py clerk_sync reconcile`` exited 0, so a scheduled run looked fine."""
    clerk, store = client_world.clerk, client_world.store
    clerk.set_webhook_url(None)  # rows come from the reconcile only
    fine = clerk.create_user("fine@example.com")
    broken = clerk.create_user("broken@example.com")
    clerk.emulator.store.users[broken["id"]].updated_at = None  # type: ignore[assignment]
    with pytest.raises(CommandError, match=r"1 Clerk object\(s\) could not be read") as failed:
        call_command("clerk_sync", "reconcile", stdout=StringIO())
    assert failed.value.returncode == 1
    assert read_user(store, fine["id"]) is not None and read_user(store, broken["id"]) is None
    clerk.emulator.store.users[broken["id"]].updated_at = fine["updated_at"]
    call_command("clerk_sync", "reconcile", stdout=StringIO())  # all read: exit 0
    assert read_user(store, broken["id"]) is not None


def test_manage_py_replay_fails_while_deliveries_stay_failed_and_refuses_an_unknown_status(
        client_world: World) -> None:
    """Fixed: ``clerk-sync replay`` exits 1 while some deliveries stay failed and refuses a ``--status`` no
    delivery can have; ``manage.py clerk_sync replay`` exited 0 for both (a typo replayed nothing, silently)."""
    processor = get_clerk_sync().processor
    bad = f.envelope("user.created", {"id": "user_bad" + "x" * 70, "object": "user"})  # no row can have that id: failed
    assert processor.process(*f.signed(bad, "msg_bad", secret=client_world.clerk.webhook_secret)).status == "failed"
    out = StringIO()
    with pytest.raises(CommandError, match="1 still failed") as still:
        call_command("clerk_sync", "replay", stdout=out)
    assert still.value.returncode == 1 and "replayed 1 deliveries: 1 failed" in out.getvalue()
    with pytest.raises(CommandError, match="invalid choice: 'faild'"):
        call_command("clerk_sync", "replay", "--status", "faild", stdout=out)
    call_command("clerk_sync", "replay", "--status", "applied", stdout=out)  # none failed among them: exit 0


def test_manage_py_migrate_with_the_database_down_is_one_line_without_its_password() -> None:
    """Fixed: a database error outside the store (``migrate``, the database down) escaped ``manage.py
    clerk_sync`` as SQLAlchemy's traceback, where clerk-sync's own errors are one ``CommandError`` line."""
    down = "postgresql+psycopg://clerk:Pw-s3cret-9@127.0.0.1:1/app"  # nothing listens on port 1
    with override_settings(CLERK_SYNC={"DATABASE_URL": down}), \
            pytest.raises(CommandError, match=r"database error: OperationalError: .*DATABASE_URL") as failed:
        call_command("clerk_sync", "migrate", stdout=StringIO())
    assert failed.value.returncode == 3 and "Pw-s3cret-9" not in str(failed.value)  # unavailable, as the CLI


# -- the webhook under Django's own deny-by-default ------------------------------------------------------


def test_the_webhook_is_served_under_djangos_login_required_middleware(db_url: str) -> None:
    """Fixed: with Django's ``LoginRequiredMiddleware`` (5.1+, its own deny-by-default) every delivery was
    redirected to the login page (302): Svix follows no redirect, so no webhook was ever applied."""
    from django.conf import settings

    middleware = [*settings.MIDDLEWARE, "django.contrib.auth.middleware.LoginRequiredMiddleware"]
    with django_database(db_url), override_settings(CLERK_SYNC=BASE, MIDDLEWARE=middleware):
        headers, body = f.signed(f.envelope("user.created", f.user("user_lrm", 1)), "msg_lrm")
        r = Client().post("/webhooks/clerk", data=body, content_type="application/json", headers=headers)
        assert (r.status_code, r.json()["status"]) == (200, "applied")
        assert read_user(get_clerk_sync().store, "user_lrm") is not None
        assert Client().get("/healthz").status_code == 302  # the middleware is on: to the login page


# -- a Django login session follows the row ---------------------------------------------------------------


def test_a_demoted_admin_loses_django_admin_access_in_a_django_login_session(client_world: World) -> None:
    """Fixed: ``ClerkBackend.get_user`` refused a banned user's login session (``login()``) but copied no
    field, so a demoted admin kept ``is_staff``/``is_superuser`` (Django admin access) for as long as the
    login session lasted without a Clerk-session request."""
    clerk, app = client_world.clerk, client_world.app
    ada = clerk.create_user("ada@example.com", public_metadata={"role": "admin"})
    clerk.wait_for_deliveries()
    assert app.get("/t/django-login-required",
                   headers=bearer(clerk.mint_session_token(ada["id"]))).json()["is_staff"] is True
    logged_in = Client()  # a Django login session, as an app's own login() makes
    logged_in.force_login(get_user_model().objects.get(username=ada["id"]), backend=BACKEND)
    assert logged_in.get("/t/django-login-required").json()["is_staff"] is True

    clerk.request("PATCH", f"/v1/users/{ada['id']}/metadata", json={"public_metadata": {"role": "user"}})
    clerk.wait_for_deliveries()
    assert logged_in.get("/t/django-login-required").json()["is_staff"] is False
    demoted = get_user_model().objects.get(username=ada["id"])
    assert (demoted.is_active, demoted.is_staff, demoted.is_superuser) == (True, False, False)


# -- system checks ---------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES:UserWarning")
def test_a_database_driver_that_is_not_installed_is_a_check_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed: ``manage.py check`` passed, then every request (public pages too) answered 500 when the first
    one built the store: a ``DATABASE_URL`` naming a driver not installed, or one derived from a PostgreSQL
    ``DATABASES`` entry (psycopg 3) in a project that has only psycopg2."""
    with override_settings(CLERK_SYNC={**CHECKED, "DATABASE_URL": "postgresql+pg8000://me@db.example.com/app"}):
        found = check_settings()
        assert [m.id for m in found] == ["clerk_sync.E007"]
        assert "'pg8000' is not installed" in found[0].msg and "clerk-sync[postgres]" in str(found[0].hint)
        assert "psycopg2" not in str(found[0].hint)  # its errors carry no sqlstate: never suggested
    monkeypatch.setitem(sys.modules, "psycopg", None)  # a project without psycopg 3
    postgres = {"ENGINE": "django.db.backends.postgresql", "NAME": "app", "HOST": "db.example.com"}
    with override_settings(CLERK_SYNC=CHECKED, DATABASES={"default": postgres}):
        found = check_settings()
        assert [m.id for m in found] == ["clerk_sync.E007"] and "'psycopg' is not installed" in found[0].msg


class ProjectClerkMiddleware(ClerkMiddleware):
    """An app's own subclass (re-exported, or extended)."""


def test_a_subclass_of_clerk_middleware_before_authentication_middleware_is_a_check_error() -> None:
    """Fixed: E004 looked for the exact path only: an app's subclass placed before ``AuthenticationMiddleware``
    (which then overwrites ``request.user``) passed ``check``, as E005 once missed it."""
    from django.conf import settings

    own = "tests.django.test_commands_checks_and_drf_permissions.ProjectClerkMiddleware"
    order = [own, *(m for m in settings.MIDDLEWARE if "ClerkMiddleware" not in m)]
    with override_settings(MIDDLEWARE=order, CLERK_SYNC=CHECKED):
        assert [m.id for m in check_settings()] == ["clerk_sync.E004"]
    order = [*(m for m in settings.MIDDLEWARE if "ClerkMiddleware" not in m), own]
    with override_settings(MIDDLEWARE=order, CLERK_SYNC=CHECKED):
        assert check_settings() == []


# -- DRF's composed permission classes --------------------------------------------------------------------


def _root_owner_and_member(clerk: EmulatorServer) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """An app admin (``role: admin``), the owner of org Acme and a plain member of it, synced: their
    ``Authorization`` headers (the org members' tokens in Acme) and their Clerk users, in that order."""
    root = clerk.create_user("root@example.com", public_metadata={"role": "admin"})
    owner = clerk.create_user("owner@example.com")
    member = clerk.create_user("member@example.com")
    org = clerk.create_organization("Acme", created_by=owner["id"])
    clerk.add_membership(org["id"], member["id"])
    clerk.wait_for_deliveries()
    return [bearer(clerk.mint_session_token(root["id"])),
            bearer(clerk.mint_session_token(owner["id"], org_id=org["id"])),
            bearer(clerk.mint_session_token(member["id"], org_id=org["id"]))], [root, owner, member]


def test_drf_permission_classes_compose_with_or_and_not(client_world: World) -> None:
    """Fixed: the Clerk permission classes raised their 403 instead of answering False, so DRF's ``|`` never
    asked the other side (``HasRole.of("admin") | HasOrgRole.of("org:admin")`` refused an org admin) and ``~``
    refused everyone. No session, or a refusal for good, is still raised (401), composed or not."""
    clerk, app = client_world.clerk, client_world.app
    (as_root, as_owner, as_member), (_, _, member) = _root_owner_and_member(clerk)

    def status(path: str, headers: dict[str, str] | None = None) -> Any:
        return app.get(path, headers=headers or {}).status_code

    assert [status("/t/drf/admin-or-org-admin", h) for h in (as_root, as_owner, as_member)] == [200, 200, 403]
    assert [status("/t/drf/not-admin", h) for h in (as_root, as_owner, as_member)] == [403, 200, 200]
    # a detail view checks the object too: ~ of BasePermission's default (True) refused everyone there
    assert [status("/t/drf/not-admin?object=1", h) for h in (as_root, as_owner, as_member)] == [403, 200, 200]
    refused = app.get("/t/drf/admin", headers=as_member)  # alone: the error table's body, as before
    assert (refused.status_code, refused.json()["error"]) == (403, "access_denied")
    with override_settings(CLERK_SYNC={**emulator_settings(clerk), "REQUIRE_AUTH": False}):
        assert status("/t/drf/not-admin") == 401  # no session: never "not an admin"
    clerk.request("DELETE", f"/v1/users/{member['id']}")
    clerk.wait_for_deliveries()
    assert status("/t/drf/not-admin", as_member) == 401  # deleted: signed out, not let through by ~


@pytest.mark.parametrize("backends", [["django.contrib.auth.backends.ModelBackend"], [BACKEND]])
def test_drf_permission_classes_compose_on_a_view_authenticated_by_drfs_own_classes(
        client_world: World, backends: list[str]) -> None:
    """Fixed: on a view whose only class is DRF's ``SessionAuthentication``, without ``ClerkBackend``, the session
    ``ClerkMiddleware`` verified was authenticated by no class, so a check's own "no" was raised (DRF answers a
    False with 401 there): ``HasRole.of("admin") | HasOrgRole.of("org:admin")`` refused an org admin and
    ``~HasRole.of("admin")`` everyone. The Clerk classes now authenticate it as ``ClerkAuthentication`` does."""
    clerk, app = client_world.clerk, client_world.app
    (as_root, as_owner, as_member), (_, owner, _) = _root_owner_and_member(clerk)

    with override_settings(AUTHENTICATION_BACKENDS=backends):
        either = [app.get("/t/drf/session/admin-or-org-admin", headers=h) for h in (as_root, as_owner, as_member)]
        assert [answer.status_code for answer in either] == [200, 200, 403]
        assert "WWW-Authenticate" not in either[2].headers  # refused, not DRF's 401 "not authenticated"
        assert either[1].json()["request_user"] == owner["id"]  # the Clerk session's user, not AnonymousUser
        assert [app.get("/t/drf/session/not-admin", headers=h).status_code
                for h in (as_root, as_owner, as_member)] == [403, 200, 200]
        anonymous = app.get("/t/drf/session/not-admin")  # no session: never "not an admin"
        assert (anonymous.status_code, anonymous.headers["WWW-Authenticate"]) == (401, "Bearer")


def test_the_sync_me_view_is_the_one_fastapi_and_flask_have(db_url: str) -> None:
    """Fixed: Django had no ``POST /sync/me`` (FastAPI's ``sync_me_router``): every project wrote it, the
    example with an ``assert`` (a 500 without ``CLERK_SECRET_KEY``). ``views.sync_me``, routed by the project:
    the session first (401), POST only, and a ``config_error`` naming the setting without a secret key.
    (The example routes it: tests/django/test_e2e.py's sync-me test drives it against the emulator.)"""
    from django.test import RequestFactory

    from clerk_sync.integrations.django.runtime import reset_clerk_sync
    from clerk_sync.integrations.django.views import sync_me
    from tests.test_auth import token

    with django_database(db_url), override_settings(CLERK_SYNC=BASE):
        reset_clerk_sync()
        try:
            factory = RequestFactory()
            assert sync_me(factory.post("/sync/me")).status_code == 401
            assert sync_me(factory.get("/sync/me", headers=bearer(token("user_me")))).status_code == 405
            answer = sync_me(factory.post("/sync/me", headers=bearer(token("user_me"))))
            assert answer.status_code == 500, answer.content
            assert b"config_error" in answer.content and b"CLERK_SECRET_KEY" in answer.content
        finally:
            reset_clerk_sync()
