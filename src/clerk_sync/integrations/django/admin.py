"""Read-only admin pages for the mirrored tables, and a "replay" action for failed deliveries.

Nothing can be added, changed or deleted here: the rows are Clerk's, written by webhooks and
``reconcile``. Replaying re-applies a stored ``failed`` delivery through the same code as the console and
``clerk-sync replay``; the others selected are left as they are.

Personal data is masked as in the console (its allow-list, :func:`~clerk_sync.integrations.console._masking.mask`):
a delivery's payload, and the metadata of users and organizations, the private and unsafe blobs whole. The
console reveals them to an admin and audits each reveal; this admin has no such audit, so it never shows
them unmasked, and refuses filters on those fields (``?payload__icontains=…``), which would tell their
contents one guess at a time.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html
from django.utils.safestring import SafeString

from clerk_sync.auth.audit import AuditEntry, record_audit
from clerk_sync.engine import DeliveryStatus
from clerk_sync.ingest import replay_delivery, replay_if_failed
from clerk_sync.integrations.console._masking import mask
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
    """Viewable by staff with the view permission (or superusers); never writable.

    ``masked``: fields shown only masked, as ``<field>_masked`` (a :func:`_masked_json` display on the subclass), and
    never filtered on."""

    masked: tuple[str, ...] = ()

    def get_exclude(self, request: HttpRequest, obj: Any = None) -> Any:
        return (*(super().get_exclude(request, obj) or ()), *self.masked)

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest) -> bool:
        # Django allows any lookup on a local field from the query string; on a masked one it is an oracle.
        if lookup.split("__", 1)[0] in self.masked:
            return False
        return bool(super().lookup_allowed(lookup, value, request))

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _masked_json(field: str, *, key: str | None = None) -> Callable[[Any, Any], SafeString]:
    """A read-only display of ``field`` masked as the console masks it (``key``: the key it sits under in a
    payload, which picks the rule: whole for private and unsafe metadata, all but ``role`` for public)."""

    @admin.display(description=f"{field.replace('_', ' ')} (masked; the console reveals it, audited)")
    def show(self: Any, obj: Any) -> SafeString:
        shown = mask(getattr(obj, field), key)
        return format_html("<pre>{}</pre>", json.dumps(shown, indent=2, sort_keys=True, ensure_ascii=False,
                                                       default=str))

    return show


@admin.register(ClerkUser)
class ClerkUserAdmin(ReadOnlyAdmin):
    list_display = ("clerk_id", "email", "first_name", "last_name", "role", "plan", "banned", "deleted_at")
    list_filter = ("role", "plan", "banned")
    search_fields = ("clerk_id", "email", "first_name", "last_name")
    masked = ("public_metadata", "private_metadata", "unsafe_metadata")
    readonly_fields = ("public_metadata_masked", "private_metadata_masked", "unsafe_metadata_masked")
    public_metadata_masked = _masked_json("public_metadata", key="public_metadata")
    private_metadata_masked = _masked_json("private_metadata", key="private_metadata")
    unsafe_metadata_masked = _masked_json("unsafe_metadata", key="unsafe_metadata")


@admin.register(ClerkOrganization)
class OrganizationAdmin(ReadOnlyAdmin):
    list_display = ("clerk_id", "name", "slug", "plan", "deleted_at")
    search_fields = ("clerk_id", "name", "slug")
    masked = ("public_metadata", "private_metadata")
    readonly_fields = ("public_metadata_masked", "private_metadata_masked")
    public_metadata_masked = _masked_json("public_metadata", key="public_metadata")
    private_metadata_masked = _masked_json("private_metadata", key="private_metadata")


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
    masked = ("payload",)
    readonly_fields = ("payload_masked",)
    payload_masked = _masked_json("payload")

    def has_replay_permission(self, request: HttpRequest) -> bool:
        """Replaying writes to the mirrored tables: superusers only."""
        return bool(getattr(request.user, "is_superuser", False))

    @admin.action(description="Replay the selected failed deliveries", permissions=["replay"])
    def replay(self, request: HttpRequest, queryset: QuerySet[WebhookDelivery]) -> None:
        """Re-apply the selected deliveries that are ``failed``, as the console and ``manage.py clerk_sync replay``
        do; the others are left as they are (an applied one replayed would only be relabelled ``skipped``), and
        the messages say how many of each and why."""
        actor, ip = request.user.get_username() or None, request.META.get("REMOTE_ADDR")
        replayed, left = Counter[str](), Counter[str]()
        for svix_id, status in queryset.order_by("id").values_list("svix_id", "status"):
            done, status = (_replay_failed_audited(svix_id, actor, ip) if status == DeliveryStatus.FAILED
                            else (False, status))
            (replayed if done else left)[status] += 1
        if replayed:
            self.message_user(request, f"Replayed {_deliveries(replayed)}: {_by_status(replayed)}.",
                              messages.WARNING if replayed[DeliveryStatus.FAILED] else messages.SUCCESS)
        if left:
            self.message_user(request, f"Not replayed: {_deliveries(left)} not failed ({_by_status(left)}). Only "
                              "failed deliveries are replayed, as in the console and `manage.py clerk_sync replay`: "
                              "the others were already applied, skipped or ignored.", messages.WARNING)


def _deliveries(counts: Counter[str]) -> str:
    return f"{counts.total()} {'delivery' if counts.total() == 1 else 'deliveries'}"


def _by_status(counts: Counter[str]) -> str:
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))


def replay_audited(svix_id: str, actor: str | None, ip: str | None) -> str:
    """Re-apply one delivery whatever its status (as ``clerk-sync replay --status STATUS`` does); its audit row
    commits with the outcome. The admin action replays failed ones only (:func:`_replay_failed_audited`)."""
    return str(replay_delivery(get_clerk_sync().store, svix_id, audit=_audit(svix_id, actor, ip)))


def _replay_failed_audited(svix_id: str, actor: str | None, ip: str | None) -> tuple[bool, str]:
    """Re-apply one delivery if it is still ``failed`` when its transaction reads it (the row locked: a second
    admin or the console replaying it at the same moment writes nothing), audited as :func:`replay_audited`.
    Returns (replayed, status): the status after the replay, or the one that kept it from being replayed."""
    return replay_if_failed(get_clerk_sync().store, svix_id, audit=_audit(svix_id, actor, ip))


def _audit(svix_id: str, actor: str | None, ip: str | None) -> Callable[[Writer, DeliveryStatus], None]:
    def audit(w: Writer, status: DeliveryStatus) -> None:
        record_audit(w, AuditEntry("django_admin.delivery_replayed", actor,
                                   details={"svix_id": svix_id, "result": str(status)}, ip=ip))

    return audit


@admin.register(AuditLogEntry)
class AuditLogAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "action", "actor_clerk_id", "target_clerk_id", "impersonator_clerk_id", "ip")
    list_filter = ("action",)
    search_fields = ("actor_clerk_id", "target_clerk_id")
