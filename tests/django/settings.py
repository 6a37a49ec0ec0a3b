"""Django configured once per test session: the example project's settings, with test routes added.

Each test then points Django's ``default`` database at its own (``django_database``) and sets
``CLERK_SYNC`` with ``override_settings``.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from unittest import mock

import django
from django.conf import settings


def configure_django() -> None:
    if settings.configured:
        return
    # The example requires DJANGO_SECRET_KEY (no public default): a random one unless the environment has one.
    key = os.environ.get("DJANGO_SECRET_KEY") or secrets.token_urlsafe(50)
    with mock.patch.dict(os.environ, {"DJANGO_SECRET_KEY": key}):
        from examples.django_saas import settings as example

    values = {name: getattr(example, name) for name in dir(example) if name.isupper()}
    values.update(
        ROOT_URLCONF="tests.django.urls",
        # A file, not ":memory:" (which clerk-sync refuses outside Django's test runner, a check error of its own):
        # a test that reads the settings without a database of its own must not depend on one an earlier test left
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3",
                               "NAME": str(Path(tempfile.mkdtemp(prefix="clerk_sync_django_")) / "default.db")}},
        CLERK_SYNC={},
    )
    settings.configure(**values)
    django.setup()
