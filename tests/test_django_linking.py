"""Linking a Clerk session to a Django user (``ClerkBackend``) and DRF's view of the same user.

Review findings: the backend took over a pre-existing local user whose username equals a Clerk id
(``get_or_create``), made it superuser from the Clerk role and left its local password usable, so the
local password then signed in a superuser; and DRF's ``ClerkAuthentication`` authenticated a
``ClerkPrincipal`` for a session whose Django user the backend refused (inactive), where plain Django
views saw ``AnonymousUser``. Everything goes through Django's test client against the emulator.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from django.contrib.auth import authenticate, get_user_model
from django.test import override_settings

from tests.django.conftest import World, bearer, world_for


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """``CLERK_SYNC`` falls back to the environment: keep the developer's variables out of the tests."""
    for name in list(os.environ):
        if name.startswith("CLERK_") or name in ("DATABASE_URL", "REDIS_URL"):
            monkeypatch.delenv(name)


@pytest.fixture
def client_world(db_url: str) -> Iterator[World]:
    with world_for(db_url, "test-client") as w:
        yield w


def only_email(row: Any) -> dict[str, Any]:
    """``USER_FIELDS`` of an app that manages ``is_active`` itself (e.g. in the Django admin)."""
    return {"email": row.email or ""}


def _refusals(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line["event"] == "django_user_not_linked"]


# -- the backend never takes over a local account -------------------------------------------------------


def test_a_clerk_admin_never_takes_over_a_local_user_with_a_usable_password(client_world: World) -> None:
    clerk, app = client_world.clerk, client_world.app
    users = get_user_model()
    victim = clerk.create_user("root@example.com", first_name="Root", public_metadata={"role": "admin"})
    clerk.wait_for_deliveries()
    # Someone registered the local username equal to the Clerk id, with a password, before the move to Clerk.
    local = users.objects.create_user(victim["id"], password="attacker-pw")
    tok = bearer(clerk.mint_session_token(victim["id"]))

    with structlog.testing.capture_logs() as lines:
        assert app.get("/t/django-login-required", headers=tok).status_code == 302  # not signed in: to login
        assert app.get("/django-admin/", headers=tok).status_code == 302  # no Django admin either
        refused = app.get("/t/drf/open", headers=tok)
    assert (refused.status_code, refused["WWW-Authenticate"]) == (401, "Bearer")
    assert "ClerkBackend refused" in refused.json()["detail"]
    errors = _refusals(lines)
    assert len(errors) == 3 and {e["log_level"] for e in errors} == {"error"}
    assert {e["clerk_id"] for e in errors} == {victim["id"]} and {e["django_user_pk"] for e in errors} == {local.pk}
    assert "rename the local user" in errors[0]["fix"] and "set_unusable_password()" in errors[0]["fix"]

    # The local row is untouched: no admin flag, nothing copied, its own password still its only way in.
    local.refresh_from_db()
    assert (local.is_superuser, local.is_staff, local.email, local.first_name) == (False, False, "", "")
    signed_in = authenticate(username=victim["id"], password="attacker-pw")
    assert signed_in is not None and signed_in.pk == local.pk and not signed_in.is_superuser
    assert users.objects.count() == 1

    # Linking explicitly (the same person) is giving up the local password: then the Clerk session owns it.
    local.set_unusable_password()
    local.save()
    with structlog.testing.capture_logs() as lines:
        page = app.get("/t/django-login-required", headers=tok)
    assert page.json() == {"username": victim["id"], "email": "root@example.com", "is_staff": True}
    assert _refusals(lines) == []
    local.refresh_from_db()
    assert (local.is_superuser, local.first_name, local.has_usable_password()) == (True, "Root", False)
    assert authenticate(username=victim["id"], password="attacker-pw") is None


def test_renaming_the_local_user_lets_the_backend_create_the_linked_one(client_world: World) -> None:
    clerk, app = client_world.clerk, client_world.app
    users = get_user_model()
    ada = clerk.create_user("ada@example.com", public_metadata={"role": "admin"})
    clerk.wait_for_deliveries()
    local = users.objects.create_user(ada["id"], email="old@example.com", password="pw")
    tok = bearer(clerk.mint_session_token(ada["id"]))
    assert app.get("/t/django-login-required", headers=tok).status_code == 302

    local.username = "ada-local"
    local.save()
    assert app.get("/t/django-login-required", headers=tok).json()["is_staff"] is True
    linked = users.objects.get(username=ada["id"])
    assert linked.pk != local.pk and (linked.is_superuser, linked.has_usable_password()) == (True, False)
    local.refresh_from_db()
    assert (local.is_superuser, local.email, local.has_usable_password()) == (False, "old@example.com", True)
    assert app.get("/t/drf/admin", headers=tok).json() == {"admin": ada["id"]}


def test_a_user_row_with_an_empty_password_is_the_backends_own(client_world: World) -> None:
    """An empty password signs nobody in (though Django calls it usable): a row created without one (by
    the app, or left so by the backend's earlier two-step create) is linked, not refused forever."""
    clerk, app = client_world.clerk, client_world.app
    users = get_user_model()
    ada = clerk.create_user("ada@example.com", public_metadata={"role": "admin"})
    clerk.wait_for_deliveries()
    row = users.objects.create(username=ada["id"])  # password ""
    assert row.password == "" and row.has_usable_password()
    page = app.get("/t/django-login-required", headers=bearer(clerk.mint_session_token(ada["id"])))
    assert page.json()["is_staff"] is True
    row.refresh_from_db()
    assert row.is_superuser and authenticate(username=ada["id"], password="") is None


# -- DRF sees the same user as plain Django views ------------------------------------------------------------


def test_drf_refuses_a_session_whose_django_user_the_backend_refuses(db_url: str) -> None:
    with world_for(db_url, "test-client", USER_FIELDS="tests.test_django_linking.only_email") as w:
        clerk, app = w.clerk, w.app
        dora = clerk.create_user("dora@example.com", public_metadata={"role": "admin"})
        clerk.wait_for_deliveries()
        tok = bearer(clerk.mint_session_token(dora["id"]))
        assert app.get("/t/drf/open", headers=tok).json() == {"signed_in": True}
        assert app.get("/t/drf/admin", headers=tok).json() == {"admin": dora["id"]}

        # The operator deactivates the Django user (USER_FIELDS leaves is_active to the app).
        get_user_model().objects.filter(username=dora["id"]).update(is_active=False)
        assert app.get("/t/django-login-required", headers=tok).status_code == 302  # AnonymousUser there
        for path in ("/t/drf/open", "/t/drf/admin"):
            refused = app.get(path, headers=tok)
            assert (refused.status_code, refused["WWW-Authenticate"]) == (401, "Bearer"), path
            assert "ClerkBackend refused" in refused.json()["detail"], path
        assert app.get("/t/drf/open").json() == {"signed_in": False}  # no token: anonymous, as before


def test_drf_without_a_users_row_answers_the_rows_error_and_without_the_backend_a_principal(db_url: str) -> None:
    with world_for(db_url, "test-client", JIT=False) as w:
        clerk, app = w.clerk, w.app
        clerk.set_webhook_url(None)  # the webhook has not arrived, JIT is off: no users row
        late = clerk.create_user("late@example.com")
        tok = bearer(clerk.mint_session_token(late["id"]))
        refused = app.get("/t/drf/open", headers=tok)
        assert (refused.status_code, refused.json()["error"]) == (403, "access_denied")
        assert "no user row yet" in refused.json()["message"]
        assert get_user_model().objects.count() == 0
        # Without ClerkBackend there is no Django user to refuse: request.user is a ClerkPrincipal.
        with override_settings(AUTHENTICATION_BACKENDS=["django.contrib.auth.backends.ModelBackend"]):
            assert app.get("/t/drf/open", headers=tok).json() == {"signed_in": True}


def test_a_session_the_backend_refuses_is_no_failed_login(db_url: str) -> None:
    """``request.user`` went through ``authenticate()``, which sends ``user_login_failed`` whenever no
    backend takes the session (no row yet, banned, inactive): lockout tools (django-axes) counted every such
    request as a failed login. The backend is asked directly."""
    from django.contrib.auth.signals import user_login_failed

    failed: list[dict[str, Any]] = []

    def record(sender: Any, **kwargs: Any) -> None:
        failed.append(kwargs)

    with world_for(db_url, "test-client", USER_FIELDS="tests.test_django_linking.only_email") as w:
        user_login_failed.connect(record)
        try:
            real = w.clerk.create_user("real@example.com")
            w.clerk.wait_for_deliveries()
            tok = bearer(w.clerk.mint_session_token(real["id"]))
            assert w.app.get("/t/django-login-required", headers=tok).status_code == 200
            get_user_model().objects.filter(username=real["id"]).update(is_active=False)  # the app's choice
            for _ in range(3):
                assert w.app.get("/t/django-login-required", headers=tok).status_code == 302  # not signed in
        finally:
            user_login_failed.disconnect(record)
    assert failed == []


def test_a_refused_copy_is_logged_without_the_values_the_database_quotes(client_world: World) -> None:
    """Review finding: a unique field the user model refused (the address another Django user holds) was
    logged at ERROR with the driver's whole message: on PostgreSQL its DETAIL line, on MariaDB its "Duplicate
    entry", each quoting the e-mail address, on every request of that user. The line keeps the driver's first
    line without the values."""
    from django.db import connection

    clerk, app = client_world.clerk, client_world.app
    with connection.cursor() as cursor:
        cursor.execute("CREATE UNIQUE INDEX uq_auth_user_email_review ON auth_user (email)")
    get_user_model().objects.create_user("ada-local", email="ada.lovelace@example.com", password="pw")
    ada = clerk.create_user("ada.lovelace@example.com")
    clerk.wait_for_deliveries()
    with structlog.testing.capture_logs() as lines:
        assert app.get("/t/django-login-required", headers=bearer(clerk.mint_session_token(ada["id"]))
                       ).status_code == 302  # signed out: the account is not linked
    [refusal] = _refusals(lines)
    assert "ada.lovelace" not in str(refusal), refusal
    assert refusal["reason"].startswith("the user model refused it: ")  # what refused it: the index, or the column
    assert "uq_auth_user_email_review" in refusal["reason"] or "auth_user.email" in refusal["reason"], refusal
