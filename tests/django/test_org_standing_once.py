"""Django reads the session's membership once a request, and only when something asks (the story:
:mod:`tests.test_org_standing_once`): ``clerk_request`` read it for every request whose token named an organization
role, ``clerk_public`` views and views that never look at the organization included, and ``require_org_role`` /
DRF's ``HasOrgRole`` read it again. While the database is down, the read answers 503 on every Django face."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import SynchronousOnlyOperation
from django.http import HttpRequest, JsonResponse
from django.test import override_settings
from django.urls import path
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from clerk_sync.errors import StoreError
from clerk_sync.integrations.django.decorators import clerk_login_required, require_org_role, require_permission
from clerk_sync.integrations.django.middleware import clerk_public
from clerk_sync.integrations.django.request import aclerk_request, clerk_request
from clerk_sync.integrations.django.rest_framework import HasOrgRole, HasPermission, IsClerkAuthenticated
from clerk_sync.integrations.django.runtime import get_clerk_sync
from clerk_sync.testing import EmulatorServer
from tests._reads import membership_reads
from tests._server import free_port, unreachable_engine
from tests.django.conftest import bearer, django_database, emulator_settings, serve
from tests.django.urls import urlpatterns as base_urls
from tests.test_org_standing_permissions import MANAGE, emulator, seen


@require_org_role("org:admin")
@require_permission(MANAGE)
def guarded(request: HttpRequest) -> JsonResponse:
    return JsonResponse(seen(clerk_request(request).require_auth()))


@require_org_role("org:admin")
async def async_guarded(request: HttpRequest) -> JsonResponse:
    return JsonResponse(seen((await aclerk_request(request)).require_auth()))


@clerk_public
def public(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"page": "public"})


@clerk_login_required
def signed_in(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"user": clerk_request(request).require_session().user_id})


async def async_reads_auth(request: HttpRequest) -> JsonResponse:
    """App code reading ``state.auth`` in an async view (review 3 M1): refused on the loop; after ``astanding()``
    the standing, read in a worker thread."""
    state = await aclerk_request(request)
    try:
        refused = state.auth is None  # a read still to make, on the event loop's thread
    except SynchronousOnlyOperation as exc:
        refused = "astanding()" in str(exc)
    await state.astanding()
    return JsonResponse({"refused": refused, **seen(state.require_auth())})


@require_permission(MANAGE)
def permission(request: HttpRequest) -> JsonResponse:
    return JsonResponse(seen(clerk_request(request).require_auth()))


@require_permission(MANAGE)
async def async_permission(request: HttpRequest) -> JsonResponse:
    return JsonResponse(seen((await aclerk_request(request)).require_auth()))


class Drf(APIView):
    permission_classes = (IsClerkAuthenticated, HasOrgRole.of("org:admin"), HasPermission.of(MANAGE))

    def get(self, request: Request) -> Response:
        return Response(seen(request.auth))


READS = {"/t/once/guarded": 1, "/t/once/async-guarded": 1, "/t/once/drf": 1, "/t/once/public": 0,
         "/t/once/signed-in": 0}
urlpatterns = [*base_urls, path("t/once/guarded", guarded), path("t/once/async-guarded", async_guarded),
               path("t/once/async-reads-auth", async_reads_auth), path("t/once/permission", permission),
               path("t/once/async-permission", async_permission),
               path("t/once/public", public), path("t/once/signed-in", signed_in), path("t/once/drf", Drf.as_view())]


@contextmanager
def world(db_url: str, transport: str) -> Iterator[tuple[EmulatorServer, Any]]:
    port = free_port()
    # (the deny list read once for the test: a database taken down is met by the membership read)
    with emulator(port) as clerk, django_database(db_url), override_settings(
            ROOT_URLCONF=__name__, CLERK_SYNC=emulator_settings(clerk, DENY_LIST_REFRESH_S=3600)), \
            serve(transport, port) as app:
        yield clerk, app


@pytest.mark.parametrize("transport", ["test-client", "asgi"])
def test_django_reads_the_membership_once_and_only_when_asked(db_url: str, transport: str, tmp_path: Path) -> None:
    with world(db_url, transport) as (clerk, app):
        owner = clerk.create_user("owner@example.com")
        org = clerk.create_organization("Acme", created_by=owner["id"])
        admin = clerk.create_user("admin@example.com")["id"]
        clerk.add_membership(org["id"], admin, role="org:admin")
        clerk.wait_for_deliveries()
        tok = clerk.mint_session_token(admin, org_id=org["id"])
        for route, expected in READS.items():
            with membership_reads() as reads:
                answer = app.get(route, headers=bearer(tok))
            assert answer.status_code == 200, (route, answer.status_code, answer.content)
            if "org_role" in answer.json():
                assert answer.json()["org_role"] == "org:admin", route
            assert len(reads) == expected, (route, reads)

        store = get_clerk_sync().store
        up = store.engine
        store.engine = unreachable_engine(db_url, tmp_path)
        try:
            with pytest.raises(StoreError):  # really down
                store.ping()
            for route, expected in READS.items():
                answer = app.get(route, headers=bearer(tok))
                if expected:  # the read answers 503; a view that reads nothing is served
                    assert answer.status_code == 503, (route, answer.status_code, answer.content)
                    assert answer.json()["error"] == "store_unavailable", route
                else:
                    assert answer.status_code == 200, (route, answer.status_code, answer.content)
        finally:
            store.engine.dispose()
            store.engine = up


def _on_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("transport", ["test-client", "asgi"])
def test_async_code_never_reads_the_membership_on_the_event_loop(db_url: str, transport: str) -> None:
    """Review 3 M1: ``state.auth`` in an async view ran the membership query on the event loop's thread (no
    ``SynchronousOnlyOperation``: the store is SQLAlchemy), blocking it (a connect timeout while the database is
    down). Now refused there with the way out; ``astanding()`` and the library's async guards read in a worker."""
    with world(db_url, transport) as (clerk, app):
        owner = clerk.create_user("owner@example.com")
        org = clerk.create_organization("Acme", created_by=owner["id"])
        admin = clerk.create_user("admin@example.com")["id"]
        clerk.add_membership(org["id"], admin, role="org:admin")
        clerk.wait_for_deliveries()
        tok = clerk.mint_session_token(admin, org_id=org["id"])
        for route in ("/t/once/async-reads-auth", "/t/once/async-guarded", "/t/once/async-permission"):
            with membership_reads(note=lambda: "on the loop" if _on_loop() else "off the loop") as loops:
                answer = app.get(route, headers=bearer(tok))
            assert answer.status_code == 200, (route, answer.status_code, answer.content)
            assert answer.json()["org_role"] == "org:admin", route
            assert answer.json().get("refused", True) is True, route
            assert loops == ["off the loop"], (route, loops)  # one read, off the loop


@pytest.mark.parametrize("transport", ["test-client", "asgi"])
def test_require_permission_judges_the_token_first(db_url: str, transport: str, tmp_path: Path) -> None:
    """Review 3 L1: Django's ``require_permission`` (and ``OrgPermissionRequiredMixin``) read the membership
    before judging the token: a token without the permission cost a read, and answered 503 while the database
    was down where every other face answers 403 from the token alone."""
    with world(db_url, transport) as (clerk, app):
        owner = clerk.create_user("owner@example.com")
        org = clerk.create_organization("Acme", created_by=owner["id"])
        member = clerk.create_user("member@example.com")["id"]
        clerk.add_membership(org["id"], member, role="org:member")
        clerk.wait_for_deliveries()
        tok = clerk.mint_session_token(member, org_id=org["id"])  # org:member: no MANAGE
        routes = ("/t/once/permission", "/t/once/async-permission")
        for route in routes:
            with membership_reads() as reads:
                answer = app.get(route, headers=bearer(tok))
            assert answer.status_code == 403, (route, answer.status_code, answer.content)
            assert reads == [], route
        store = get_clerk_sync().store
        up = store.engine
        store.engine = unreachable_engine(db_url, tmp_path)
        try:
            for route in routes:
                answer = app.get(route, headers=bearer(tok))
                assert answer.status_code == 403, (route, answer.status_code, answer.content)
        finally:
            store.engine.dispose()
            store.engine = up
