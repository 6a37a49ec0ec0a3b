"""Review: a linked Django user deactivated by a ban stayed refused after an unban another process applied
(``reconcile``, ``clerk-sync serve``): ``ClerkBackend.get_user`` judged ``is_active`` before reading the ``users``
row, and ``prune``'s refresh read only active, staff or superuser users, though the README says an unban restores
them."""

from __future__ import annotations

from io import StringIO

from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client

from tests.django.conftest import World, bearer

BACKEND = "clerk_sync.integrations.django.backends.ClerkBackend"


def _banned_then_unbanned_elsewhere(world: World) -> tuple[str, Client]:
    """A linked user with a Django login session, banned (deactivated by their next request) and then unbanned,
    both applied by ``reconcile`` (no webhook reaches Django's view)."""
    clerk, app = world.clerk, world.app
    cy = clerk.create_user("cy@example.com")
    clerk.wait_for_deliveries()
    assert app.get("/t/django-login-required", headers=bearer(clerk.mint_session_token(cy["id"]))).status_code == 200
    session = Client()
    session.force_login(get_user_model().objects.get(username=cy["id"]), backend=BACKEND)
    clerk.set_webhook_url(None)
    clerk.request("POST", f"/v1/users/{cy['id']}/ban")
    call_command("clerk_sync", "reconcile", stdout=StringIO())
    assert session.get("/t/django-login-required").status_code == 302
    assert not get_user_model().objects.get(username=cy["id"]).is_active
    clerk.request("POST", f"/v1/users/{cy['id']}/unban")
    call_command("clerk_sync", "reconcile", stdout=StringIO())
    return str(cy["id"]), session


def test_an_unban_applied_elsewhere_lets_the_login_session_in_again(client_world: World) -> None:
    clerk_id, session = _banned_then_unbanned_elsewhere(client_world)
    assert session.get("/t/django-login-required").status_code == 200
    assert get_user_model().objects.get(username=clerk_id).is_active


def test_prune_makes_a_user_unbanned_elsewhere_active_again(client_world: World) -> None:
    clerk_id, _ = _banned_then_unbanned_elsewhere(client_world)
    call_command("clerk_sync", "prune", stdout=StringIO())
    assert get_user_model().objects.get(username=clerk_id).is_active


def test_prune_leaves_the_apps_own_django_users_alone_without_clerk_backend(client_world: World) -> None:
    """Review: ``prune`` brought "linked" Django users (username = a Clerk id, no usable password) in step with
    the ``users`` rows whatever ``AUTHENTICATION_BACKENDS`` said: an app's own users keyed by the Clerk id (its
    own sign-in code, a MAPPING onto auth_user) were made superusers by the Clerk role, lost the staff the app
    gave them, and had their e-mail and names rewritten. The webhook view refreshes only ClerkBackend's."""
    from django.test import override_settings

    clerk = client_world.clerk
    admin = clerk.create_user("ada@example.com", first_name="Ada", public_metadata={"role": "admin"})
    staffer = clerk.create_user("bo@example.com", first_name="Bo")
    clerk.wait_for_deliveries()
    model = get_user_model()
    model.objects.filter(username__in=[admin["id"], staffer["id"]]).delete()  # (made by ClerkBackend's JIT, if any)
    for user, staff in [(admin, False), (staffer, True)]:
        own = model(username=user["id"], email="own@app.example", first_name="Own", is_staff=staff,
                    is_superuser=staff)
        own.set_unusable_password()
        own.save()

    def rows() -> list[tuple[str, str, bool, bool]]:
        return [(u.email, u.first_name, u.is_staff, u.is_superuser) for u in model.objects.order_by("username")
                if u.username in (admin["id"], staffer["id"])]

    before = rows()
    out = StringIO()
    with override_settings(AUTHENTICATION_BACKENDS=["django.contrib.auth.backends.ModelBackend"]):
        call_command("clerk_sync", "prune", stdout=out)
    assert rows() == before
    assert "Django users: left alone (AUTHENTICATION_BACKENDS lists no ClerkBackend)" in out.getvalue()
    call_command("clerk_sync", "prune", stdout=StringIO())  # with ClerkBackend: its users, brought in step
    assert sorted(rows()) != sorted(before)
