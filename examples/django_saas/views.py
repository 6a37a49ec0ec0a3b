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

from clerk_sync.auth.claims import Auth
from clerk_sync.auth.users import AuthUser
from clerk_sync.errors import AccessDenied
from clerk_sync.integrations.django.decorators import (
    clerk_guard,
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


ORG_ROLES = ("org:admin", "org:member")


def live_org_member(auth: Auth, user: AuthUser | None) -> None:
    """A guard check: the session's active organization membership is live in our tables.

    The token's org claims last until it expires (60 s): a member whose removal was already applied
    (``organizationMembership.deleted``) would keep them. The row is the authority: no row, a deleted
    one or a role not in ``ORG_ROLES`` is refused (403)."""
    live = ClerkMembership.objects.filter(organization_clerk_id=auth.org_id, user_clerk_id=auth.user_id,
                                          deleted_at=None, role__in=ORG_ROLES).exists()
    if not live:
        raise AccessDenied(f"no live membership of organization {auth.org_id} with a role in {sorted(ORG_ROLES)}")


@clerk_login_required
def dashboard(request: HttpRequest) -> JsonResponse:
    clerk = clerk_request(request)
    user = clerk.user  # the users row, fetched from Clerk just in time if the webhook is late
    return JsonResponse({"user": user.clerk_id, "email": user.email, "role": user.role, "plan": user.plan,
                         "impersonated_by": clerk.require_auth().actor_id,
                         "django_user": request.user.get_username() if request.user.is_authenticated else None})


@require_org_role(*ORG_ROLES)  # the token's claim, then
@clerk_guard(live_org_member)  # the same membership confirmed against the DB
def org_page(request: HttpRequest) -> JsonResponse:
    auth = clerk_request(request).require_auth()
    org = ClerkOrganization.objects.filter(clerk_id=auth.org_id).values("name", "slug").first()
    memberships = dict(ClerkMembership.objects.filter(organization_clerk_id=auth.org_id, deleted_at=None)
                       .values_list("user_clerk_id", "role"))
    members = ClerkUser.objects.filter(clerk_id__in=memberships, deleted_at=None).order_by("email")
    return JsonResponse({"org": org, "your_role": memberships.get(auth.user_id),
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
    role = request.GET.get("role")
    if not role:
        return JsonResponse({"error": "bad_request", "message": "the query parameter 'role' is required"}, status=400)
    admin = clerk_request(request).user
    change = get_clerk_sync().admin_actions.promote(clerk_id, role, by=admin.clerk_id,
                                                    ip=request.META.get("REMOTE_ADDR"))
    return JsonResponse({"user": clerk_id, "role": change.role, "status": change.status,
                         "previous": change.previous_role})


@require_POST
@not_impersonated
def impersonate(request: HttpRequest, clerk_id: str) -> JsonResponse:
    # AdminActions checks the admin role itself, so that a refusal is audited too.
    auth = clerk_request(request).require_auth()
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
    auth = clerk_request(request).require_auth()
    return JsonResponse({"billing": "sensitive", "user": auth.user_id})


class ApiMe(APIView):
    """DRF: ``request.auth`` is the verified session, ``request.user`` the linked Django user."""

    permission_classes = (IsClerkAuthenticated,)

    def get(self, request: Request) -> Response:
        body: dict[str, Any] = {"user": request.auth.user_id, "django_user": request.user.get_username()}
        return Response(body)
