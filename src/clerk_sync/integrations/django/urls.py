"""``path("", include("clerk_sync.integrations.django.urls"))`` serves ``POST /webhooks/clerk``.

Keep it outside any login requirement: deliveries are authenticated by their signature.
"""

from __future__ import annotations

from django.urls import path

from clerk_sync.integrations.django import views

__all__ = ["app_name", "urlpatterns"]

app_name = "clerk_sync"
urlpatterns = [path("webhooks/clerk", views.webhook, name="webhook")]
