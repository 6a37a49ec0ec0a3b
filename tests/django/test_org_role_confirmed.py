"""Django's org-role guards confirm the token's role against ``organization_memberships``: the view decorator
(sync and async views), the class-based views' mixin and DRF's ``HasOrgRole``. A member removed or demoted
(webhook applied) is refused (403) with the same still-valid token; a member whose row has not arrived yet
passes on the token. The story is :func:`tests.test_org_role_confirmed.org_role_scenario`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.http import HttpRequest, JsonResponse
from django.test import override_settings
from django.urls import path
from django.views import View
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from clerk_sync.integrations.django.decorators import require_org_role
from clerk_sync.integrations.django.mixins import OrgRoleRequiredMixin
from clerk_sync.integrations.django.request import aclerk_request, clerk_request
from clerk_sync.integrations.django.rest_framework import HasOrgRole, IsClerkAuthenticated, clerk_auth
from tests.django.conftest import World, bearer, world_for
from tests.django.urls import urlpatterns as base_urls
from tests.test_org_role_confirmed import ADMIN_ONLY, ANY_ROLE, org_role_scenario


@require_org_role(*ADMIN_ONLY)
def org_admin(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"org_admin": True})


@require_org_role(*ANY_ROLE)
def org_any(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"org_member": True, "role": clerk_request(request).require_auth().org_role})


@require_org_role(*ADMIN_ONLY)
async def async_org_admin(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"org_admin": True})


@require_org_role(*ANY_ROLE)
async def async_org_any(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"org_member": True, "role": (await aclerk_request(request)).require_auth().org_role})


class CbvOrgAny(OrgRoleRequiredMixin, View):
    required_org_roles = ANY_ROLE

    def get(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse({"org_member": True, "role": clerk_request(request).require_auth().org_role})


class DrfOrgAny(APIView):
    permission_classes = (IsClerkAuthenticated, HasOrgRole.of(*ANY_ROLE))

    def get(self, request: Request) -> Response:
        return Response({"org": clerk_auth(request).org_id, "role": clerk_auth(request).org_role})


urlpatterns = [
    *base_urls,  # the webhook route, t/org-admin (the mixin) and t/drf/org-admin (HasOrgRole)
    path("t/orgrole/admin", org_admin),
    path("t/orgrole/any", org_any),
    path("t/orgrole/async-admin", async_org_admin),
    path("t/orgrole/async-any", async_org_any),
    path("t/orgrole/cbv-any", CbvOrgAny.as_view()),
    path("t/orgrole/drf-any", DrfOrgAny.as_view()),
]

ADMIN_PATHS = ["/t/orgrole/admin", "/t/orgrole/async-admin", "/t/org-admin", "/t/drf/org-admin"]
ANY_PATHS = ["/t/orgrole/any", "/t/orgrole/async-any", "/t/orgrole/cbv-any", "/t/orgrole/drf-any"]


@pytest.fixture(params=["test-client", "asgi"])
def world(request: pytest.FixtureRequest, db_url: str) -> Iterator[World]:
    with override_settings(ROOT_URLCONF=__name__), world_for(db_url, request.param) as w:
        yield w


def test_django_org_role_guards_are_confirmed_against_the_membership_row(world: World) -> None:
    def get(path: str, tok: str) -> Any:
        return world.app.get(path, headers=bearer(tok))

    org_role_scenario(world.clerk, get, ADMIN_PATHS, ANY_PATHS)
