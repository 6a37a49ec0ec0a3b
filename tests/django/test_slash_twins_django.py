"""Django: a path listed in ``PUBLIC_PATHS`` does not open its trailing-slash twin, a separate view that
deny-by-default protects (auth review 5; the webhook's twin stays public as a ``clerk_public`` view, see
test_checks_csrf_and_shared_clients.test_the_webhook_url_with_a_trailing_slash_is_served_and_public)."""

from __future__ import annotations

from tests.django.conftest import PUBLIC_EXTRA, bearer, world_for


def test_a_public_paths_slash_twin_view_stays_protected(db_url: str) -> None:
    with world_for(db_url, "test-client", PUBLIC_PATHS=["/", "/healthz", *PUBLIC_EXTRA, "/t/twin"]) as world:
        refused = world.app.get("/t/twin/")
        assert (refused.status_code, refused.json()["error"]) == (401, "token_missing")
        user = world.clerk.create_user("twin@example.com")
        token = world.clerk.mint_session_token(user["id"])
        assert world.app.get("/t/twin/", headers=bearer(token)).json() == {"secret": True}
