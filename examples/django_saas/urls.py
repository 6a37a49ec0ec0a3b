"""The example's routes: the pages of ``examples/saas``, a DRF endpoint and the Django admin."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from clerk_sync.integrations.django.views import sync_me
from examples.django_saas import views

urlpatterns = [
    path("", include("clerk_sync.integrations.django.urls")),  # POST /webhooks/clerk
    path("", views.home),
    path("healthz", views.healthz),
    path("dashboard", views.dashboard),
    path("sync/me", sync_me),  # right after sign-up: the row before the webhook
    path("org", views.org_page),
    path("admin/users", views.AdminUsers.as_view()),
    path("admin/users/<str:clerk_id>/role", views.set_role),
    path("admin/impersonate/<str:clerk_id>", views.impersonate),
    path("admin/audit", views.audit),
    path("billing", views.billing),
    path("api/me", views.ApiMe.as_view()),
    path("django-admin/", admin.site.urls),
]
