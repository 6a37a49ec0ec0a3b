"""The Django app: ``INSTALLED_APPS = [..., "clerk_sync.integrations.django"]``."""

from __future__ import annotations

from django.apps import AppConfig
from django.core import checks

__all__ = ["ClerkSyncConfig"]


class ClerkSyncConfig(AppConfig):
    """Registers the system checks and the admin pages; models are unmanaged (clerk-sync migrates)."""

    name = "clerk_sync.integrations.django"
    label = "clerk_sync"
    verbose_name = "Clerk sync"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from clerk_sync.integrations.django import runtime  # noqa: F401 - connects setting_changed
        from clerk_sync.integrations.django.checks import check_settings

        checks.register(check_settings)
