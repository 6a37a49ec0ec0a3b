"""A locked Clerk user's Django login session (security review, session 2026-12-05): ``ClerkBackend.get_user``
refused a banned, deleted or deprovisioned user but not a locked one, so the app's own ``login()`` session (and
``force_login``) of a locked admin kept working, staff flags and all, while every Clerk-session path answered 403
``user_locked``. Now the login session is refused while the lock lasts, by the clock the Clerk-session paths
compare the lock's end with (the deny list's), and works again once it is over: a lock ends by itself, so the
Django user is not deactivated."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from django.test import Client

from clerk_sync.auth.users import read_user
from clerk_sync.errors import ConfigError
from clerk_sync.integrations.django.runtime import get_clerk_sync
from tests.django.conftest import World, bearer

BACKEND = "clerk_sync.integrations.django.backends.ClerkBackend"


def _flags(clerk_id: str) -> tuple[bool, bool, bool]:
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.get(username=clerk_id)
    return user.is_active, user.is_staff, user.is_superuser


def test_a_locked_users_django_login_session_is_refused_until_the_lock_ends(client_world: World,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from django.contrib.auth import get_user_model

    clerk, app = client_world.clerk, client_world.app
    ada = clerk.create_user("ada@example.com", public_metadata={"role": "admin"})
    clerk.wait_for_deliveries()
    tok = bearer(clerk.mint_session_token(ada["id"]))
    assert app.get("/t/django-login-required", headers=tok).json()["is_staff"] is True  # the linked Django user
    logged_in = Client()  # a Django login session, as the app's own login() makes
    logged_in.force_login(get_user_model().objects.get(username=ada["id"]), backend=BACKEND)
    assert logged_in.get("/t/django-login-required").json()["is_staff"] is True

    clerk.request("POST", f"/v1/users/{ada['id']}/lock")
    clerk.wait_for_deliveries()
    row = read_user(get_clerk_sync().store, ada["id"])
    assert row is not None and row.locked and row.locked_until is not None  # the emulator's lock: one hour
    assert app.get("/t/cbv/me", headers=tok).status_code == 403  # the Clerk session: 403 user_locked
    refused = logged_in.get("/t/django-login-required")
    assert refused.status_code == 302, refused.content  # the login session too: signed out, to the login page
    assert _flags(ada["id"]) == (True, True, True)  # not deactivated: the lock ends by itself

    # The lock's end passes on the deny list's clock (Clerk sends no event): both sessions work again.
    deny_list = get_clerk_sync().authenticator.deny_list
    after = datetime.fromtimestamp(row.locked_until / 1000 + 1, UTC)
    monkeypatch.setattr(deny_list, "_wall", lambda: after)
    assert logged_in.get("/t/django-login-required").json() == {"username": ada["id"], "email": "ada@example.com",
                                                                 "is_staff": True}
    assert app.get("/t/cbv/me", headers=tok).status_code == 200


def test_a_lock_without_an_end_refuses_the_login_session_until_the_unlock(client_world: World) -> None:
    from django.contrib.auth import get_user_model

    clerk, app = client_world.clerk, client_world.app
    bo = clerk.create_user("bo@example.com")
    clerk.wait_for_deliveries()
    assert app.get("/t/django-login-required", headers=bearer(clerk.mint_session_token(bo["id"]))).status_code == 200
    logged_in = Client()
    logged_in.force_login(get_user_model().objects.get(username=bo["id"]), backend=BACKEND)
    clerk.request("POST", "/_emulator/lockout", json={"duration_s": None})  # Clerk's "locks never expire"
    clerk.request("POST", f"/v1/users/{bo['id']}/lock")
    clerk.wait_for_deliveries()
    row = read_user(get_clerk_sync().store, bo["id"])
    assert row is not None and row.locked and row.locked_until is None
    assert logged_in.get("/t/django-login-required").status_code == 302
    clerk.request("POST", f"/v1/users/{bo['id']}/unlock")
    clerk.wait_for_deliveries()
    assert logged_in.get("/t/django-login-required").status_code == 200


def test_without_session_verification_configured_the_lock_is_judged_on_the_utc_clock(client_world: World) -> None:
    """A project whose login sessions are Django's own (no CLERK_JWT_KEY, no CLERK_SECRET_KEY: no authenticator
    to take the deny list's clock from) still refuses a locked user's login session."""
    from django.contrib.auth import get_user_model
    from django.test import override_settings

    from tests.django.conftest import emulator_settings

    clerk, app = client_world.clerk, client_world.app
    cy = clerk.create_user("cy@example.com")
    clerk.wait_for_deliveries()
    assert app.get("/t/django-login-required", headers=bearer(clerk.mint_session_token(cy["id"]))).status_code == 200
    logged_in = Client()
    logged_in.force_login(get_user_model().objects.get(username=cy["id"]), backend=BACKEND)
    clerk.request("POST", f"/v1/users/{cy['id']}/lock")
    clerk.wait_for_deliveries()
    unverified = {k: v for k, v in emulator_settings(clerk).items() if k not in ("CLERK_SECRET_KEY", "CLERK_API_URL")}
    with override_settings(CLERK_SYNC={**unverified, "JIT": False}):
        with pytest.raises(ConfigError):  # no authenticator, so no deny list's clock
            get_clerk_sync().authenticator  # noqa: B018
        assert logged_in.get("/t/django-login-required").status_code == 302
    clerk.request("POST", f"/v1/users/{cy['id']}/unlock")
    clerk.wait_for_deliveries()
    with override_settings(CLERK_SYNC={**unverified, "JIT": False}):
        assert logged_in.get("/t/django-login-required").status_code == 200
