"""The pages: public, signed-in (JIT row), organization, admin, promotion, impersonation, audit and a
route refused while impersonating. Sessions are verified locally, roles read from our own tables."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, JsonResponse
from django.views import View
from django.views.decorators.http import require_GET, require_POST
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from clerk_sync.integrations.django.decorators import (
    clerk_login_required,
    not_impersonated,
    require_org_role,
    require_role,
)
from clerk_sync.integrations.django.mixins import RoleRequiredMixin
from clerk_sync.integrations.django.models import AuditLogEntry, ClerkMembership, ClerkOrganization, ClerkUser
from clerk_sync.integrations.django.request import clerk_request
from clerk_sync.integrations.django.rest_framework import IsClerkAuthenticated
from clerk_sync.integrations.django.runtime import get_clerk_sync


@require_GET
def home(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"page": "public", "hint": "GET /dashboard with Authorization: Bearer <session token>"})


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@clerk_login_required
def dashboard(request: HttpRequest) -> JsonResponse:
    clerk = clerk_request(request)
    user = clerk.user  # the users row, fetched from Clerk just in time if the webhook is late
    assert clerk.auth is not None
    return JsonResponse({"user": user.clerk_id, "email": user.email, "role": user.role, "plan": user.plan,
                         "impersonated_by": clerk.auth.actor_id,
                         "django_user": request.user.get_username() if request.user.is_authenticated else None})


@require_org_role("org:admin", "org:member")
def org_page(request: HttpRequest) -> JsonResponse:
    auth = clerk_request(request).auth
    assert auth is not None
    org = ClerkOrganization.objects.filter(clerk_id=auth.org_id).values("name", "slug").first()
    memberships = dict(ClerkMembership.objects.filter(organization_clerk_id=auth.org_id, deleted_at=None)
                       .values_list("user_clerk_id", "role"))
    members = ClerkUser.objects.filter(clerk_id__in=memberships, deleted_at=None).order_by("email")
    return JsonResponse({"org": org, "your_role": auth.org_role,
                         "members": [{"email": m.email, "role": memberships[m.clerk_id]} for m in members]})


class AdminUsers(RoleRequiredMixin, View):
    required_roles = ("admin",)

    def get(self, request: HttpRequest) -> JsonResponse:
        rows = ClerkUser.objects.filter(deleted_at=None).order_by("id").values("clerk_id", "email", "role")
        return JsonResponse({"admin": clerk_request(request).user.clerk_id, "users": list(rows)})


@require_POST
@require_role("admin")
@not_impersonated
def set_role(request: HttpRequest, clerk_id: str) -> JsonResponse:
    admin = clerk_request(request).user
    change = get_clerk_sync().admin_actions.promote(clerk_id, request.GET["role"], by=admin.clerk_id,
                                                    ip=request.META.get("REMOTE_ADDR"))
    return JsonResponse({"user": clerk_id, "role": change.role, "status": change.status,
                         "previous": change.previous_role})


@require_POST
@not_impersonated
def impersonate(request: HttpRequest, clerk_id: str) -> JsonResponse:
    # AdminActions checks the admin role itself, so that a refusal is audited too.
    auth = clerk_request(request).auth
    assert auth is not None
    grant = get_clerk_sync().admin_actions.start_impersonation(auth.user_id, clerk_id,
                                                               ip=request.META.get("REMOTE_ADDR"))
    return JsonResponse({"method": grant.method, "token": grant.token, "url": grant.url,
                         "expires_in_s": grant.expires_in_s})


@require_role("admin")
def audit(request: HttpRequest) -> JsonResponse:
    rows = AuditLogEntry.objects.order_by("-id").values()[:50]
    return JsonResponse([{**r, "created_at": r["created_at"].isoformat()} for r in rows], safe=False)


@not_impersonated
def billing(request: HttpRequest) -> JsonResponse:
    auth = clerk_request(request).auth
    assert auth is not None
    return JsonResponse({"billing": "sensitive", "user": auth.user_id})


class ApiMe(APIView):
    """DRF: ``request.auth`` is the verified session, ``request.user`` the linked Django user."""

    permission_classes = (IsClerkAuthenticated,)

    def get(self, request: Request) -> Response:
        body: dict[str, Any] = {"user": request.auth.user_id, "django_user": request.user.get_username()}
        return Response(body)
