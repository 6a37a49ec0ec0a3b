"""The README's Django usage, typed (checked by `scripts/check`): guards keep a view's signature, DRF
permission factories fit `permission_classes`, and `request.clerk`'s parts are typed."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.urls import URLPattern, URLResolver, include, path
from django.views import View
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from clerk_sync.auth.claims import Auth
from clerk_sync.integrations.django.decorators import (
    clerk_login_required,
    not_impersonated,
    require_org_role,
    require_permission,
    require_role,
)
from clerk_sync.integrations.django.mixins import RoleRequiredMixin
from clerk_sync.integrations.django.request import aclerk_request, clerk_request
from clerk_sync.integrations.django.rest_framework import (
    ClerkAuthentication,
    HasOrgRole,
    HasPermission,
    HasRole,
    IsClerkAuthenticated,
    clerk_auth,
)


@require_role("admin")
def admin_page(request: HttpRequest) -> JsonResponse:
    email: str | None = clerk_request(request).user.email
    return JsonResponse({"email": email})


@clerk_login_required
@not_impersonated
async def billing(request: HttpRequest) -> JsonResponse:
    auth: Auth | None = (await aclerk_request(request)).auth
    return JsonResponse({"user": auth.user_id if auth else None})


@require_org_role("org:admin")
@require_permission("org:invoices:read")
def invoices(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"invoices": []})


class Admins(RoleRequiredMixin, View):
    required_roles = ("admin",)


class Members(APIView):
    authentication_classes = (ClerkAuthentication,)
    permission_classes = (IsClerkAuthenticated, HasOrgRole.of("org:admin"), HasRole.of("admin"),
                          HasPermission.of("org:members:read"))

    def get(self, request: Request) -> Response:
        return Response({"org": clerk_auth(request).org_id})


urlpatterns: list[URLPattern | URLResolver] = [
    path("", include("clerk_sync.integrations.django.urls")),
    path("admin-page", admin_page),
    path("billing", billing),
    path("invoices", invoices),
    path("admins", Admins.as_view()),
    path("members", Members.as_view()),
]
