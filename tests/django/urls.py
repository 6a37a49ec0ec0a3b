"""The example's routes plus views that exercise the rest of the surface (async, mixins, DRF)."""

from __future__ import annotations

from django.urls import path
from examples.django_saas.urls import urlpatterns as example_urls
from rest_framework.routers import SimpleRouter

from tests.django import views

router = SimpleRouter()
router.register("t/drf/public-viewset", views.DrfPublicViewSet, basename="t-public-viewset")
router.register("t/drf/private-viewset", views.DrfPrivateViewSet, basename="t-private-viewset")

urlpatterns = [
    *example_urls,
    path("t/async/me", views.async_me),
    path("t/async/admin", views.async_admin),
    path("t/async/billing", views.async_billing),
    path("t/invoices", views.invoices),
    path("t/org-admin", views.OrgAdmin.as_view()),
    path("t/cbv/billing", views.CbvBilling.as_view()),
    path("t/cbv/invoices", views.CbvInvoices.as_view()),
    path("t/cbv/me", views.CbvMe.as_view()),
    path("t/cbv/async-admin", views.AsyncCbvAdmin.as_view()),
    path("t/django-login-required", views.django_login_required),
    path("t/drf/admin", views.DrfAdmin.as_view()),
    path("t/drf/org-admin", views.DrfOrgAdmin.as_view()),
    path("t/drf/invoices", views.DrfInvoices.as_view()),
    path("t/drf/billing", views.DrfBilling.as_view()),
    path("t/drf/open", views.DrfOpen.as_view()),
    path("t/drf/cookie-role-admin", views.DrfCookieRoleAdmin.as_view()),
    path("t/drf/throttled", views.DrfThrottled.as_view()),
    path("t/drf/staff-only", views.DrfStaffOnly.as_view()),
    path("t/drf/django-authenticated", views.DrfDjangoAuthenticated.as_view()),
    path("t/drf/admin-or-org-admin", views.DrfAdminOrOrgAdmin.as_view()),
    path("t/drf/not-admin", views.DrfNotAdmin.as_view()),
    path("t/drf/session/admin-or-org-admin", views.DrfSessionAdminOrOrgAdmin.as_view()),
    path("t/drf/session/not-admin", views.DrfSessionNotAdmin.as_view()),
    path("t/csrf-exempt/admin", views.csrf_exempt_admin),
    path("t/csrf-exempt/async-admin", views.async_csrf_exempt_admin),
    path("t/public-slash/", views.public_with_slash),
    path("t/twin/", views.twin_private),
    *router.urls,
]
