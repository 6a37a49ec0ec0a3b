"""Django's faces show and guard on the standing membership (the story and why:
:mod:`tests.test_org_standing_permissions`): ``request.clerk.auth`` in sync and async views, DRF's
``request.auth``, ``require_permission`` (sync and async views) and DRF's ``HasPermission``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.http import HttpRequest, JsonResponse
from django.test import override_settings
from django.urls import path
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from clerk_sync.auth.claims import Auth
from clerk_sync.integrations.django.decorators import clerk_login_required, require_permission
from clerk_sync.integrations.django.request import aclerk_request, clerk_request
from clerk_sync.integrations.django.rest_framework import HasPermission, IsClerkAuthenticated, clerk_auth
from clerk_sync.testing import EmulatorServer
from tests._server import free_port
from tests.django.conftest import bearer, django_database, emulator_settings, serve
from tests.django.urls import urlpatterns as base_urls
from tests.test_org_standing_permissions import MANAGE, READ, emulator, seen, standing_scenario


@clerk_login_required
def who(request: HttpRequest) -> JsonResponse:
    return JsonResponse(seen(clerk_request(request).require_auth()))


@clerk_login_required
async def async_who(request: HttpRequest) -> JsonResponse:
    state = await aclerk_request(request)
    await state.astanding()  # (the membership read in a worker thread: not on the event loop)
    return JsonResponse(seen(state.require_auth()))


def _guarded(permission: str) -> Any:
    @require_permission(permission)
    def view(request: HttpRequest) -> JsonResponse:
        return JsonResponse(seen(clerk_request(request).require_auth()))

    return view


def _async_guarded(permission: str) -> Any:
    @require_permission(permission)
    async def view(request: HttpRequest) -> JsonResponse:
        return JsonResponse(seen((await aclerk_request(request)).require_auth()))

    return view


def _drf(*permissions: type[Any]) -> Any:
    class View(APIView):
        permission_classes = (IsClerkAuthenticated, *permissions)

        def get(self, request: Request) -> Response:
            assert isinstance(request.auth, Auth) and request.auth == clerk_auth(request)
            return Response(seen(request.auth))

    return View.as_view()


VARIANTS = {
    "sync": (who, _guarded(READ), _guarded(MANAGE)),
    "async": (async_who, _async_guarded(READ), _async_guarded(MANAGE)),
    "drf": (_drf(), _drf(HasPermission.of(READ)), _drf(HasPermission.of(MANAGE))),
}
urlpatterns = [*base_urls, *(path(f"t/standing/{variant}/{name}", view) for variant, views in VARIANTS.items()
                             for name, view in zip(("who", "read", "manage"), views, strict=True))]


@contextmanager
def world(db_url: str, transport: str) -> Iterator[tuple[EmulatorServer, Any]]:
    port = free_port()
    with emulator(port) as clerk, django_database(db_url), override_settings(
            ROOT_URLCONF=__name__, CLERK_SYNC=emulator_settings(clerk)), serve(transport, port) as app:
        yield clerk, app


@pytest.mark.parametrize("transport", ["test-client", "asgi"])
def test_django_shows_and_guards_on_the_standing_membership(db_url: str, transport: str) -> None:
    with world(db_url, transport) as (clerk, app):
        def get(route: str, tok: str) -> Any:
            """Every variant answers alike: the first's answer, once they are compared."""
            answers = [app.get(f"/t/standing/{variant}{route}", headers=bearer(tok)) for variant in VARIANTS]
            for variant, answer in zip(VARIANTS, answers, strict=True):
                assert answer.status_code == answers[0].status_code, (variant, route, answer.status_code)
                if answer.status_code == 200:
                    assert answer.json() == answers[0].json(), (variant, route)
            return answers[0]

        standing_scenario(clerk, get)
