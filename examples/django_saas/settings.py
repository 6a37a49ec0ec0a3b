"""Django settings of the example: clerk-sync's keys come from the environment (``__main__`` sets
them from the emulator), its tables live in Django's own database.

``DJANGO_SECRET_KEY`` is required: Django signs sessions, password resets and CSRF tokens with it, so a
default written here would be public (``python -m examples.django_saas`` sets a random one per run)."""

from __future__ import annotations

import os

from django.core.exceptions import ImproperlyConfigured

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    raise ImproperlyConfigured(
        "DJANGO_SECRET_KEY is not set: export a long random value, e.g. "
        "DJANGO_SECRET_KEY=$(python -c 'import secrets; print(secrets.token_urlsafe(50))')")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
USE_TZ = True
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ROOT_URLCONF = "examples.django_saas.urls"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "rest_framework",
    "clerk_sync.integrations.django",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",  # X-Frame-Options: DENY (the admin's pages too)
    "clerk_sync.integrations.django.middleware.ClerkMiddleware",
]
AUTHENTICATION_BACKENDS = [
    "clerk_sync.integrations.django.backends.ClerkBackend",
    "django.contrib.auth.backends.ModelBackend",
]
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3",
                         "NAME": os.environ.get("EXAMPLE_DB", "django_saas_example.db")}}
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["clerk_sync.integrations.django.rest_framework.ClerkAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["clerk_sync.integrations.django.rest_framework.IsClerkAuthenticated"],
    "UNAUTHENTICATED_USER": None,
}
# Everything else (webhook secret, keys, issuer) falls back to the environment variables.
CLERK_SYNC = {
    "REQUIRE_AUTH": True,
    "PUBLIC_PATHS": ["/", "/healthz"],
    "PUBLIC_PREFIXES": ["/django-admin/", "/static/"],  # the admin guards its own pages (local superusers too)
}
