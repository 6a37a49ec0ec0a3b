"""Test-only views over the guards not used by the example."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, JsonResponse
from django.views import View
from django.views.decorators.csrf import csrf_exempt
from rest_framework import viewsets
from rest_framework.authentication import SessionAuthentication
from rest_framework.permissions import AllowAny, IsAdminUser, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import UserRateThrottle
from rest_framework.views import APIView

from clerk_sync.integrations.django.decorators import (
    clerk_login_required,
    not_impersonated,
    require_permission,
    require_role,
)
from clerk_sync.integrations.django.middleware import clerk_public
from clerk_sync.integrations.django.mixins import (
    ClerkLoginRequiredMixin,
    NotImpersonatedMixin,
    OrgPermissionRequiredMixin,
    OrgRoleRequiredMixin,
    RoleRequiredMixin,
)
from clerk_sync.integrations.django.request import aclerk_request, clerk_request
from clerk_sync.integrations.django.rest_framework import (
    HasOrgRole,
    HasPermission,
    HasRole,
    IsClerkAuthenticated,
    NotImpersonated,
    clerk_auth,
)


@clerk_login_required
async def async_me(request: HttpRequest) -> JsonResponse:
    clerk = await aclerk_request(request)
    user = await clerk.auser()
    django_user = await request.auser()
    return JsonResponse({"user": user.clerk_id, "email": user.email, "django_user": django_user.get_username()})


@require_role("admin")
async def async_admin(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"admin": (await (await aclerk_request(request)).auser()).clerk_id})


@not_impersonated
async def async_billing(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"billing": "ok"})


@require_permission("org:invoices:read")
def invoices(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"invoices": []})


class OrgAdmin(OrgRoleRequiredMixin, View):
    required_org_roles = ("org:admin",)

    def get(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse({"org_admin": True})


class CbvBilling(NotImpersonatedMixin, View):
    def get(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse({"billing": "ok"})


class CbvInvoices(OrgPermissionRequiredMixin, View):
    required_permission = "org:invoices:read"

    def get(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse({"invoices": []})


class AsyncCbvAdmin(RoleRequiredMixin, View):
    required_roles = ("admin",)

    async def get(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse({"admin": (await (await aclerk_request(request)).auser()).clerk_id})


class CbvMe(ClerkLoginRequiredMixin, View):
    def get(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse({"me": True})


@login_required
def django_login_required(request: HttpRequest) -> JsonResponse:
    user: Any = request.user
    return JsonResponse({"username": user.get_username(), "email": user.email, "is_staff": user.is_staff})


class DrfAdmin(APIView):
    permission_classes = (HasRole.of("admin"),)

    def get(self, request: Request) -> Response:
        return Response({"admin": request.auth.user_id})


class DrfOrgAdmin(APIView):
    permission_classes = (IsClerkAuthenticated, HasOrgRole.of("org:admin"),)

    def get(self, request: Request) -> Response:
        return Response({"org": clerk_auth(request).org_id})


class DrfBilling(APIView):
    permission_classes = (NotImpersonated,)

    def get(self, request: Request) -> Response:
        return Response({"billing": clerk_auth(request).user_id})


class DrfInvoices(APIView):
    permission_classes = (HasPermission.of("org:invoices:read"),)

    def get(self, request: Request) -> Response:
        return Response({"invoices": []})


class DrfCookieRoleAdmin(APIView):
    """No authentication class (or any but ClerkAuthentication), and a Clerk role check: the role comes
    from the cookie."""

    authentication_classes = ()
    permission_classes = (HasRole.of("admin"),)

    def post(self, request: Request) -> Response:
        return Response({"deleted": True})


class DrfOpen(APIView):
    permission_classes = (AllowAny,)

    def get(self, request: Request) -> Response:
        return Response({"signed_in": request.auth is not None})

    def post(self, request: Request) -> Response:
        return Response({"signed_in": request.auth is not None})


class _TwoPerUser(UserRateThrottle):
    rate = "2/hour"
    scope = "t-two-per-user"


class DrfThrottled(APIView):
    """DRF's own per-user throttle: it keys on ``request.user.pk``."""

    throttle_classes = (_TwoPerUser,)

    def get(self, request: Request) -> Response:
        return Response({"user": request.user.get_username()})


class DrfStaffOnly(APIView):
    permission_classes = (IsAdminUser,)

    def get(self, request: Request) -> Response:
        return Response({"staff": True})


class DrfDjangoAuthenticated(APIView):
    """DRF's own ``IsAuthenticated`` (not a Clerk permission class)."""

    permission_classes = (IsAuthenticated,)

    def get(self, request: Request) -> Response:
        return Response({"user": request.auth.user_id})


class DrfAdminOrOrgAdmin(APIView):
    """DRF's own composition of permission classes: either role opens it."""

    permission_classes = (HasRole.of("admin") | HasOrgRole.of("org:admin"),)

    def get(self, request: Request) -> Response:
        return Response({"user": clerk_auth(request).user_id})


class DrfNotAdmin(APIView):
    """DRF's ``~``: everyone signed in but the app's admins."""

    permission_classes = (~HasRole.of("admin"),)

    def get(self, request: Request) -> Response:
        if request.query_params.get("object"):  # a detail view's check (retrieve, update, destroy) as well
            self.check_object_permissions(request, {"id": request.query_params["object"]})
        return Response({"user": clerk_auth(request).user_id})


class DrfSessionAdminOrOrgAdmin(DrfAdminOrOrgAdmin):
    """The Clerk session verified by ``ClerkMiddleware`` only: DRF's own class authenticates the view."""

    authentication_classes = (SessionAuthentication,)

    def get(self, request: Request) -> Response:
        return Response({"user": clerk_auth(request).user_id, "request_user": str(request.user)})


class DrfSessionNotAdmin(DrfNotAdmin):
    authentication_classes = (SessionAuthentication,)


@clerk_public
class DrfPublicViewSet(viewsets.ViewSet):
    """Open under ``REQUIRE_AUTH``: a ViewSet's view function carries the class as ``cls``, not ``view_class``."""

    permission_classes = (AllowAny,)

    def list(self, request: Request) -> Response:
        return Response({"public": True})


class DrfPrivateViewSet(viewsets.ViewSet):
    permission_classes = (AllowAny,)  # only the middleware's deny-by-default guards it

    def list(self, request: Request) -> Response:
        return Response({"public": False})


@csrf_exempt  # a JSON endpoint, as many projects write them: clerk-sync's Origin check still applies
@require_role("admin")
def csrf_exempt_admin(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"deleted_by": clerk_request(request).require_auth().user_id})


@csrf_exempt
@require_role("admin")
async def async_csrf_exempt_admin(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"deleted_by": (await aclerk_request(request)).require_auth().user_id})


@clerk_public
def public_with_slash(request: HttpRequest) -> JsonResponse:
    """Reached as ``/t/public-slash`` too, through ``APPEND_SLASH``'s redirect."""
    return JsonResponse({"public": True})


def twin_private(request: HttpRequest) -> JsonResponse:
    """Protected by deny-by-default alone, at ``/t/twin/``, while ``/t/twin`` is listed public."""
    return JsonResponse({"secret": True})
