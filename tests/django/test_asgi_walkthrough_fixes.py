"""The Django-under-ASGI walkthrough's fixes.

1. Django's own database down while clerk-sync's is up (its pooled connections still work, Django cannot open
   one: "too many clients already", a database closed to new connections): every view reading ``request.user``
   (sync, async, DRF) answered 500 with a traceback per request, Django's ``OperationalError`` raised linking the
   Django user. Now the same 503 with ``Retry-After`` as clerk-sync's own database down. Real signed session
   tokens from the emulator; the outage is Django's ``default`` connection pointed at nothing (a closed loopback
   port, a SQLite file in a directory that does not exist), clerk-sync's engine untouched.
2. DRF: ``request.auth.org_role`` kept the token's role after ``HasOrgRole`` confirmed another in the database
   (a demoted admin still ``org:admin`` to the view), where ``clerk_auth(request)`` had the database's.
3. ``ClerkMiddleware`` listed before ``AuthenticationMiddleware`` (check E004, but servers run no checks) served
   every request with ``request.user`` = ``AnonymousUser`` while ``request.clerk`` was signed in: now refused with
   ``ImproperlyConfigured``, as Django's own ``AuthenticationMiddleware`` refuses a request without
   ``SessionMiddleware``.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
import structlog
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import DataError, IntegrityError, InterfaceError, OperationalError, connections
from django.http import HttpRequest, JsonResponse
from django.test import AsyncClient, Client, override_settings
from django.urls import path
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from clerk_sync.errors import StoreError
from clerk_sync.integrations.django.decorators import require_role
from clerk_sync.integrations.django.request import clerk_request
from clerk_sync.integrations.django.rest_framework import ClerkPrincipal, HasOrgRole, IsClerkAuthenticated, clerk_auth
from tests._server import free_port
from tests.django.conftest import World, bearer, world_for
from tests.django.urls import urlpatterns as base_urls
from tests.test_org_role_confirmed import ANY_ROLE

# -- the views ---------------------------------------------------------------------------------------------------


@require_role("admin")
def admin_page(request: HttpRequest) -> JsonResponse:
    """The README's example: the role from the users row, ``is_staff`` from the Django user."""
    user: Any = request.user
    return JsonResponse({"admin": clerk_request(request).user.clerk_id, "staff": user.is_staff,
                         "username": user.get_username()})


@require_role("admin")
async def async_admin_page(request: HttpRequest) -> JsonResponse:
    user: Any = await request.auser()
    return JsonResponse({"staff": user.is_staff, "username": user.get_username()})


class DrfOrgAny(APIView):
    """A view branching on DRF's ``request.auth``, as the README's DRF example reads it."""

    permission_classes = (IsClerkAuthenticated, HasOrgRole.of(*ANY_ROLE))

    def get(self, request: Request) -> Response:
        return Response({"auth_role": request.auth.org_role, "clerk_auth_role": clerk_auth(request).org_role,
                         "same": request.auth is clerk_auth(request)})


class OpaqueTokenAuthentication(BaseAuthentication):
    """Another authentication class (an app's API token): its ``request.auth`` is its own, never replaced."""

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        return ClerkPrincipal(clerk_request(request._request).require_auth()), "opaque-api-token"


class DrfOrgAnyOtherAuth(APIView):
    authentication_classes = (OpaqueTokenAuthentication,)
    permission_classes = (HasOrgRole.of(*ANY_ROLE),)

    def get(self, request: Request) -> Response:
        return Response({"auth": request.auth, "clerk_auth_role": clerk_auth(request).org_role})


urlpatterns = [
    *base_urls,  # the webhook endpoint and the guards' test views
    path("w/admin", admin_page),
    path("w/async-admin", async_admin_page),
    path("w/drf-org-any", DrfOrgAny.as_view()),
    path("w/drf-org-any-other-auth", DrfOrgAnyOtherAuth.as_view()),
]


@contextmanager
def this_world(db_url: str, transport: str, **extra: Any) -> Iterator[World]:
    with override_settings(ROOT_URLCONF=__name__), world_for(db_url, transport, **extra) as world:
        yield world


def _get(world: World, url: str, headers: dict[str, str] | None = None) -> Any:
    if isinstance(world.app, Client):
        return world.app.get(url, headers=headers or {})
    return world.app.get(url, headers=headers or {}, follow_redirects=False)


# -- 1. Django's database down, clerk-sync's up ------------------------------------------------------------------


@contextmanager
def django_db_down(db_url: str, tmp_path: Path) -> Iterator[None]:
    """Django's ``default`` connection cannot be opened (every thread: the settings are changed in place and
    Django opens a connection per request), clerk-sync's store (its own engine and pool) still up; back after."""
    current = connections.settings["default"]
    saved = dict(current)
    connections.close_all()
    if sa.engine.make_url(db_url).get_backend_name() == "sqlite":
        current["NAME"] = str(tmp_path / "gone" / "django.db")  # (no such directory: SQLite cannot open it)
    else:
        current.update(HOST="127.0.0.1", PORT=str(free_port()),
                       OPTIONS={**current.get("OPTIONS", {}), "connect_timeout": 2})
    try:
        with pytest.raises(OperationalError):  # really down
            connections["default"].ensure_connection()
        yield
    finally:
        connections.close_all()
        current.clear()
        current.update(saved)


def _assert_503(response: Any) -> None:
    assert response.status_code == 503, (response.status_code, response.content[:300])
    assert int(response.headers["Retry-After"]) >= 1
    body = response.json()
    assert body["error"] == "store_unavailable", body
    assert "Django" not in body["message"] and "OperationalError" not in body["message"]  # the cause: the log's


@pytest.mark.parametrize("transport", ["test-client", "wsgi", "asgi"])
def test_djangos_database_down_answers_503_not_500(db_url: str, transport: str, tmp_path: Path) -> None:
    with this_world(db_url, transport, REQUIRE_AUTH=False) as world:
        clerk = world.clerk
        known = clerk.create_user("known@example.com", public_metadata={"role": "admin"})
        new = clerk.create_user("new@example.com")  # synced, never signed in: no Django user yet
        clerk.wait_for_deliveries()
        known_tok, new_tok = (bearer(clerk.mint_session_token(u["id"])) for u in (known, new))
        assert _get(world, "/w/admin", known_tok).json()["staff"] is True  # its Django user made
        with django_db_down(db_url, tmp_path), structlog.testing.capture_logs() as lines:
            for tok in (known_tok, new_tok):
                _assert_503(_get(world, "/t/django-login-required", tok))  # sync, request.user (was: 500)
                _assert_503(_get(world, "/t/async/me", tok))  # async, await request.auser()
                _assert_503(_get(world, "/t/drf/django-authenticated", tok))  # DRF's ClerkAuthentication
            _assert_503(_get(world, "/w/admin", known_tok))
            _assert_503(_get(world, "/w/async-admin", known_tok))
            assert _get(world, "/t/async/billing", known_tok).json() == {"billing": "ok"}  # never reads the user
            refused = _get(world, "/t/django-login-required")  # no session: the sign-in page, as ever
            assert refused.status_code == 302
        unavailable = [line for line in lines if line["event"] == "django_user_unavailable"]
        assert len(unavailable) == 8  # as for clerk-sync's database: one line per request, no traceback
        assert {line["error"] for line in unavailable} == {"store_unavailable"}
        assert all(line["cause"].startswith("Django's database: OperationalError: ") for line in unavailable)
        assert not [line for line in lines if line.get("log_level") in ("error", "critical")]
        # back up: the same sessions are signed in again, the new user's Django user made now
        assert _get(world, "/t/django-login-required", new_tok).json()["username"] == new["id"]
        assert _get(world, "/t/drf/django-authenticated", known_tok).status_code == 200


def _django_error(django_class: type[Exception], driver_error: Exception) -> Exception:
    """``driver_error`` as Django raises it (``DatabaseErrorWrapper.__exit__``): Django's class with the driver's
    arguments, raised from the driver's."""
    try:
        raise django_class(*driver_error.args) from driver_error
    except django_class as exc:
        return exc


def test_which_django_database_errors_are_an_outage() -> None:
    """Only the connection's or the server's state (OperationalError, InterfaceError), and not a value the
    database refuses for good (MySQL raises a column's refusal as an OperationalError): a retry heals those."""
    from clerk_sync.integrations.django.backends import _django_outage

    for outage in (_django_error(OperationalError, sqlite3.OperationalError("unable to open database file")),
                   _django_error(OperationalError, sqlite3.OperationalError("database is locked")),
                   _django_error(OperationalError, psycopg.OperationalError(
                       "connection failed: FATAL:  sorry, too many clients already")),
                   _django_error(InterfaceError, psycopg.InterfaceError("the connection is closed")),
                   InterfaceError("connection already closed")):  # (one Django raises itself)
        error = _django_outage(outage)
        assert isinstance(error, StoreError) and error.code == "store_unavailable", outage
        assert str(error).startswith("Django's database: ")
    import MySQLdb

    for for_good in (_django_error(IntegrityError, sqlite3.IntegrityError("UNIQUE constraint failed: auth_user.email")),
                     _django_error(DataError, psycopg.DataError("value too long for type character varying(150)")),
                     _django_error(OperationalError, MySQLdb.OperationalError(1366, "Incorrect string value: "
                                                                              "'\\xF0\\x9F' for column 'first_name'")),
                     # a schema behind the code (migrate not run) or a statement that cannot run: SQLite and MySQL
                     # raise these as OperationalError too, PostgreSQL as ProgrammingError; no retry heals them (review)
                     _django_error(OperationalError, sqlite3.OperationalError("no such table: auth_user")),
                     _django_error(OperationalError, sqlite3.OperationalError("no such column: auth_user.tier")),
                     _django_error(OperationalError, sqlite3.OperationalError('near "FROM": syntax error')),
                     _django_error(OperationalError, MySQLdb.OperationalError(
                         1054, "Unknown column 'accounts_user.tier' in 'field list'"))):
        assert _django_outage(for_good) is None, for_good


# -- 2. DRF's request.auth after HasOrgRole ---------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["test-client", "asgi"])
def test_drf_request_auth_holds_the_role_has_org_role_confirmed(db_url: str, transport: str) -> None:
    with this_world(db_url, transport) as world:
        clerk = world.clerk
        owner = clerk.create_user("owner@example.com")
        admin = clerk.create_user("admin@example.com")
        org = clerk.create_organization("Acme", created_by=owner["id"])
        clerk.add_membership(org["id"], admin["id"], role="org:admin")
        clerk.wait_for_deliveries()
        tok = bearer(clerk.mint_session_token(admin["id"], org_id=org["id"]))
        assert _get(world, "/w/drf-org-any", tok).json() == {"auth_role": "org:admin", "clerk_auth_role": "org:admin",
                                                             "same": True}
        clerk.request("PATCH", f"/v1/organizations/{org['id']}/memberships/{admin['id']}", json={"role": "org:member"})
        clerk.wait_for_deliveries()  # demoted; the token still says org:admin
        assert _get(world, "/w/drf-org-any", tok).json() == {"auth_role": "org:member",  # was: org:admin
                                                             "clerk_auth_role": "org:member", "same": True}
        # another class's request.auth (an app's API token) is its own: left as it is
        assert _get(world, "/w/drf-org-any-other-auth", tok).json() == {"auth": "opaque-api-token",
                                                                        "clerk_auth_role": "org:member"}


# -- 3. ClerkMiddleware before AuthenticationMiddleware ---------------------------------------------------------

AUTH_MW = "django.contrib.auth.middleware.AuthenticationMiddleware"
CLERK_MW = "clerk_sync.integrations.django.middleware.ClerkMiddleware"


def _clerk_first() -> list[str]:
    middleware = [m for m in settings.MIDDLEWARE if m != CLERK_MW]
    middleware.insert(middleware.index(AUTH_MW), CLERK_MW)
    return middleware


def test_clerk_middleware_before_authentication_middleware_is_refused_at_runtime(db_url: str) -> None:
    """Was: served, ``@require_role("admin")`` passing while the view saw ``AnonymousUser`` (no staff), nothing
    logged. Refused on the sync and the async handler, for a request with or without a session."""
    with this_world(db_url, "test-client", REQUIRE_AUTH=False) as world:
        clerk = world.clerk
        admin = clerk.create_user("admin@example.com", public_metadata={"role": "admin"})
        clerk.wait_for_deliveries()
        tok = bearer(clerk.mint_session_token(admin["id"]))
        assert Client().get("/w/admin", headers=tok).json() == {"admin": admin["id"], "staff": True,
                                                                "username": admin["id"]}
        with override_settings(MIDDLEWARE=_clerk_first()):
            for url, headers in (("/w/admin", tok), ("/w/async-admin", tok), ("/t/async/billing", {})):
                with pytest.raises(ImproperlyConfigured, match=r"AuthenticationMiddleware' before 'clerk_sync\."
                                                               r"integrations\.django\.middleware\.ClerkMiddleware'"):
                    Client().get(url, headers=headers)  # sync handler: ClerkMiddleware.__call__
                with pytest.raises(ImproperlyConfigured, match=r"clerk_sync\.E004"):
                    asyncio.run(AsyncClient().get(url, headers=headers))  # async handler: __acall__
            # without ClerkBackend request.user is Django's own whatever the order: served as before
            with override_settings(AUTHENTICATION_BACKENDS=["django.contrib.auth.backends.ModelBackend"]):
                assert Client().get("/t/async/billing", headers=tok).json() == {"billing": "ok"}
                assert asyncio.run(AsyncClient().get("/t/async/billing", headers=tok)).json() == {"billing": "ok"}
        # no AuthenticationMiddleware at all (a stateless DRF-only project; E004 says the rest): served, as before
        with override_settings(MIDDLEWARE=[m for m in settings.MIDDLEWARE if m != AUTH_MW]):
            assert Client().get("/t/async/billing", headers=tok).json() == {"billing": "ok"}
            assert asyncio.run(AsyncClient().get("/t/async/billing", headers=tok)).json() == {"billing": "ok"}
        # in order: served
        assert Client().get("/w/admin", headers=tok).json()["staff"] is True
        assert asyncio.run(AsyncClient().get("/w/async-admin", headers=tok)).json()["staff"] is True
