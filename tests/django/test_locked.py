"""Review finding: a locked or deprovisioned user's token made every Django page answer 500 (the
middleware let AccessDenied escape). Now public pages treat them as signed out and protected ones
answer 403."""

from __future__ import annotations

import pytest

from tests.django.conftest import bearer, world_for


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_locked_user_is_refused_with_403_and_public_pages_stay_up(db_url: str) -> None:
    with world_for(db_url, "test-client") as world:
        clerk, app = world.clerk, world.app
        user = clerk.create_user("locked@example.com")
        clerk.wait_for_deliveries()
        token = bearer(clerk.mint_session_token(user["id"]))
        assert app.get("/", headers=token).status_code == 200
        clerk.request("POST", f"/v1/users/{user['id']}/lock")
        clerk.wait_for_deliveries()
        assert app.get("/", headers=token).status_code == 200
        assert app.get("/t/cbv/me", headers=token).status_code == 403
        assert app.get("/t/drf/invoices", headers=token).status_code == 403
