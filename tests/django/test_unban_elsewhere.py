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
