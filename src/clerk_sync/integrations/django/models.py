"""Read-only Django models over clerk-sync's tables, for the admin pages and ORM joins.

They are unmanaged (``managed = False``): the tables belong to clerk-sync's own migrations
(``manage.py clerk_sync migrate``), in the database clerk-sync writes. Write through clerk-sync, never
through these models: rows are guarded by Clerk's ``updated_at`` ordering, which the ORM would bypass.

Which database: clerk-sync writes the one its ``DATABASE_URL`` names, by default derived from Django's
``DATABASES['default']``. These models are Django's and read what Django's routers give them, ``default``
without a router: they do *not* follow ``CLERK_SYNC['DATABASE_URL']`` (nor a ``DATABASE_URL`` in the
environment, which clerk-sync falls back to outside tests). Keep clerk-sync on Django's ``default`` database, or
give its database a ``DATABASES`` entry and route the app label ``clerk_sync`` there (``DATABASE_ROUTERS``,
``db_for_read``); the system check ``clerk_sync.W004`` says when the two differ.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db import models

__all__ = ["AuditLogEntry", "ClerkMembership", "ClerkOrganization", "ClerkUser", "WebhookDelivery"]


class _ReadOnly(models.Model):
    class Meta:
        abstract = True
        managed = False

    def save(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} is written by clerk-sync only (webhooks, reconcile)")

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        raise TypeError(f"{type(self).__name__} is written by clerk-sync only (webhooks, reconcile)")


class _Mirrored(_ReadOnly):
    clerk_id: models.CharField[str, str] = models.CharField(max_length=64, unique=True)
    clerk_created_at: models.BigIntegerField[int | None, int | None] = models.BigIntegerField(null=True)
    clerk_updated_at: models.BigIntegerField[int, int] = models.BigIntegerField()
    created_at: models.DateTimeField[datetime, datetime] = models.DateTimeField()
    updated_at: models.DateTimeField[datetime, datetime] = models.DateTimeField()
    deleted_at: models.DateTimeField[datetime | None, datetime | None] = models.DateTimeField(null=True)

    class Meta(_ReadOnly.Meta):
        abstract = True

    def __str__(self) -> str:
        return self.clerk_id


class ClerkUser(_Mirrored):
    """A ``users`` row: Clerk's user, mirrored."""

    email: models.CharField[str | None, str | None] = models.CharField(max_length=320, null=True)
    email_addresses: models.JSONField[Any, Any] = models.JSONField(default=list)
    first_name: models.CharField[str | None, str | None] = models.CharField(max_length=255, null=True)
    last_name: models.CharField[str | None, str | None] = models.CharField(max_length=255, null=True)
    username: models.CharField[str | None, str | None] = models.CharField(max_length=255, null=True)
    image_url: models.TextField[str | None, str | None] = models.TextField(null=True)
    public_metadata: models.JSONField[Any, Any] = models.JSONField(default=dict)
    private_metadata: models.JSONField[Any, Any] = models.JSONField(default=dict)
    unsafe_metadata: models.JSONField[Any, Any] = models.JSONField(default=dict)
    role: models.CharField[str, str] = models.CharField(max_length=64)
    plan: models.CharField[str, str] = models.CharField(max_length=64)
    banned: models.BooleanField[bool, bool] = models.BooleanField()
    locked: models.BooleanField[bool, bool] = models.BooleanField()
    last_sign_in_at: models.BigIntegerField[int | None, int | None] = models.BigIntegerField(null=True)

    class Meta(_Mirrored.Meta):
        db_table = "users"
        verbose_name = "Clerk user"


class ClerkOrganization(_Mirrored):
    """An ``organizations`` row."""

    name: models.CharField[str | None, str | None] = models.CharField(max_length=255, null=True)
    slug: models.CharField[str | None, str | None] = models.CharField(max_length=255, null=True)
    image_url: models.TextField[str | None, str | None] = models.TextField(null=True)
    public_metadata: models.JSONField[Any, Any] = models.JSONField(default=dict)
    private_metadata: models.JSONField[Any, Any] = models.JSONField(default=dict)
    plan: models.CharField[str, str] = models.CharField(max_length=64)

    class Meta(_Mirrored.Meta):
        db_table = "organizations"
        verbose_name = "Clerk organization"


class ClerkMembership(_Mirrored):
    """An ``organization_memberships`` row (Clerk ids, not foreign keys: it may arrive first)."""

    organization_clerk_id: models.CharField[str, str] = models.CharField(max_length=64)
    user_clerk_id: models.CharField[str, str] = models.CharField(max_length=64)
    role: models.CharField[str, str] = models.CharField(max_length=64)
    permissions: models.JSONField[Any, Any] = models.JSONField(default=list)

    class Meta(_Mirrored.Meta):
        db_table = "organization_memberships"
        verbose_name = "Clerk organization membership"


class WebhookDelivery(_ReadOnly):
    """A ``webhook_events`` row: one Clerk delivery in the inbox, with its outcome."""

    svix_id: models.CharField[str, str] = models.CharField(max_length=128, unique=True)
    type: models.CharField[str, str] = models.CharField(max_length=128)
    instance_id: models.CharField[str | None, str | None] = models.CharField(max_length=64, null=True)
    event_timestamp: models.BigIntegerField[int | None, int | None] = models.BigIntegerField(null=True)
    received_at: models.DateTimeField[datetime, datetime] = models.DateTimeField()
    payload: models.JSONField[Any, Any] = models.JSONField()
    status: models.CharField[str, str] = models.CharField(max_length=16)
    attempts: models.IntegerField[int, int] = models.IntegerField()
    last_error: models.TextField[str | None, str | None] = models.TextField(null=True)
    applied_at: models.DateTimeField[datetime | None, datetime | None] = models.DateTimeField(null=True)

    class Meta(_ReadOnly.Meta):
        db_table = "webhook_events"
        verbose_name = "webhook delivery"
        verbose_name_plural = "webhook deliveries"

    def __str__(self) -> str:
        return f"{self.type} {self.svix_id}"


class AuditLogEntry(_ReadOnly):
    """An ``audit_log`` row: a privileged action (promotion, impersonation, refusals)."""

    action: models.CharField[str, str] = models.CharField(max_length=64)
    actor_clerk_id: models.CharField[str | None, str | None] = models.CharField(max_length=64, null=True)
    target_clerk_id: models.CharField[str | None, str | None] = models.CharField(max_length=64, null=True)
    impersonator_clerk_id: models.CharField[str | None, str | None] = models.CharField(max_length=64, null=True)
    details: models.JSONField[Any, Any] = models.JSONField(default=dict)
    ip: models.CharField[str | None, str | None] = models.CharField(max_length=64, null=True)
    created_at: models.DateTimeField[datetime, datetime] = models.DateTimeField()

    class Meta(_ReadOnly.Meta):
        db_table = "audit_log"
        verbose_name = "audit log entry"
        verbose_name_plural = "audit log"

    def __str__(self) -> str:
        return f"{self.action} by {self.actor_clerk_id}"
