"""``path("", include("clerk_sync.integrations.django.urls"))`` serves ``POST /webhooks/clerk``, and
``/webhooks/clerk/`` too: the URL may be entered in Clerk's Dashboard either way, and Svix follows no
redirect (``APPEND_SLASH`` cannot redirect a POST anyway).

Keep it outside any login requirement: deliveries are authenticated by their signature (the view is
:func:`~.middleware.clerk_public`, so ``REQUIRE_AUTH`` lets both paths through).
"""

from __future__ import annotations

from django.urls import path

from clerk_sync.integrations.django import views

__all__ = ["app_name", "urlpatterns"]

app_name = "clerk_sync"
urlpatterns = [path("webhooks/clerk", views.webhook, name="webhook"), path("webhooks/clerk/", views.webhook)]
