"""Read-only admin pages for the mirrored tables, and a "replay" action for deliveries.

Nothing can be added, changed or deleted here: the rows are Clerk's, written by webhooks and
``reconcile``. Replaying re-applies a stored delivery through the same code as ``clerk-sync replay``.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from clerk_sync.auth.audit import AuditEntry, record_audit
from clerk_sync.engine import DeliveryStatus
from clerk_sync.ingest import replay_delivery
from clerk_sync.integrations.django.models import (
    AuditLogEntry,
    ClerkMembership,
    ClerkOrganization,
    ClerkUser,
    WebhookDelivery,
)
from clerk_sync.integrations.django.runtime import get_clerk_sync
from clerk_sync.store import Writer

__all__ = ["AuditLogAdmin", "ClerkUserAdmin", "MembershipAdmin", "OrganizationAdmin", "ReadOnlyAdmin",
           "WebhookDeliveryAdmin", "replay_audited"]


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Viewable by staff with the view permission (or superusers); never writable."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(ClerkUser)
class ClerkUserAdmin(ReadOnlyAdmin):
    list_display = ("clerk_id", "email", "first_name", "last_name", "role", "plan", "banned", "deleted_at")
    list_filter = ("role", "plan", "banned")
    search_fields = ("clerk_id", "email", "first_name", "last_name")


@admin.register(ClerkOrganization)
class OrganizationAdmin(ReadOnlyAdmin):
    list_display = ("clerk_id", "name", "slug", "plan", "deleted_at")
    search_fields = ("clerk_id", "name", "slug")


@admin.register(ClerkMembership)
class MembershipAdmin(ReadOnlyAdmin):
    list_display = ("clerk_id", "organization_clerk_id", "user_clerk_id", "role", "deleted_at")
    list_filter = ("role",)
    search_fields = ("organization_clerk_id", "user_clerk_id")


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(ReadOnlyAdmin):
    list_display = ("svix_id", "type", "status", "attempts", "received_at", "last_error")
    list_filter = ("status", "type")
    search_fields = ("svix_id",)
    actions = ("replay",)

    def has_replay_permission(self, request: HttpRequest) -> bool:
        """Replaying writes to the mirrored tables: superusers only."""
        return bool(getattr(request.user, "is_superuser", False))

    @admin.action(description="Replay the selected deliveries", permissions=["replay"])
    def replay(self, request: HttpRequest, queryset: QuerySet[WebhookDelivery]) -> None:
        actor = request.user.get_username() or None
        counts: dict[str, int] = {}
        for svix_id in queryset.order_by("id").values_list("svix_id", flat=True):
            status = replay_audited(svix_id, actor, request.META.get("REMOTE_ADDR"))
            counts[status] = counts.get(status, 0) + 1
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "nothing"
        self.message_user(request, f"Replayed: {summary}.",
                          messages.WARNING if "failed" in counts else messages.SUCCESS)


def replay_audited(svix_id: str, actor: str | None, ip: str | None) -> str:
    """Re-apply one delivery (as ``clerk-sync replay`` does); its audit row commits with the outcome."""
    store = get_clerk_sync().store

    def audit(w: Writer, status: DeliveryStatus) -> None:
        record_audit(w, AuditEntry("django_admin.delivery_replayed", actor,
                                   details={"svix_id": svix_id, "result": str(status)}, ip=ip))

    return str(replay_delivery(store, svix_id, audit=audit))


@admin.register(AuditLogEntry)
class AuditLogAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "action", "actor_clerk_id", "target_clerk_id", "impersonator_clerk_id", "ip")
    list_filter = ("action",)
    search_fields = ("actor_clerk_id", "target_clerk_id")
