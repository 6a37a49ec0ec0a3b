"""Review: the middleware and DRF looked for ``ClerkBackend`` by its exact dotted path in
``AUTHENTICATION_BACKENDS``, so an app's subclass of it (as the checks and the webhook view accept) was ignored:
``request.user`` never became the Clerk session's user (``@login_required`` redirected, DRF's ``IsAdminUser``
answered 403)."""

from __future__ import annotations

from django.test import override_settings

from clerk_sync.integrations.django.backends import ClerkBackend
from tests.django.conftest import World, bearer


class AppClerkBackend(ClerkBackend):
    """An app's own subclass (as apps subclass mozilla-django-oidc's backend)."""


SUBCLASSED = ["tests.django.test_subclassed_backend.AppClerkBackend", "django.contrib.auth.backends.ModelBackend"]


def test_a_subclass_of_clerkbackend_signs_the_clerk_session_in(client_world: World) -> None:
    clerk, app = client_world.clerk, client_world.app
    ada = clerk.create_user("ada@example.com", public_metadata={"role": "admin"})
    clerk.wait_for_deliveries()
    token = clerk.mint_session_token(ada["id"])
    with override_settings(AUTHENTICATION_BACKENDS=SUBCLASSED):
        page = app.get("/t/django-login-required", headers=bearer(token))
        assert page.status_code == 200 and page.json()["email"] == "ada@example.com"
        assert app.get("/t/drf/staff-only", headers=bearer(token)).status_code == 200
