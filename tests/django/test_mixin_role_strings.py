"""Django (review): a mixin's ``required_roles`` / ``required_org_roles`` given as one string (as Django's
``PermissionRequiredMixin`` takes ``permission_required``) is one role. It was read letter by letter:
``required_roles = "admin"`` refused the admin and let in a user whose role was ``"a"``."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.test import override_settings
from django.urls import path
from django.views import View

from clerk_sync.integrations.django.mixins import RoleRequiredMixin
from tests.django.conftest import bearer, world_for


class Admins(RoleRequiredMixin, View):
    required_roles = "admin"

    def get(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse({"admin": True})


urlpatterns = [path("admins", Admins.as_view())]


def test_one_required_role_as_a_string_is_that_role(db_url: str) -> None:
    with world_for(db_url, "test-client") as world, override_settings(ROOT_URLCONF=__name__):
        admin = world.clerk.create_user("root@example.com", public_metadata={"role": "admin"})
        letter = world.clerk.create_user("a@example.com", public_metadata={"role": "a"})
        granted = world.app.get("/admins", headers=bearer(world.clerk.mint_session_token(admin["id"])))
        assert (granted.status_code, granted.json()) == (200, {"admin": True})
        refused = world.app.get("/admins", headers=bearer(world.clerk.mint_session_token(letter["id"])))
        assert refused.status_code == 403, refused.content
