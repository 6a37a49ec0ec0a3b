"""The README's Django section, run exactly as printed: its settings and its urls.py serve real
requests (webhook in, admin page, DRF view) against the emulator."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings

from clerk_sync.testing import EmulatorServer
from tests._server import free_port
from tests.django.conftest import bearer, django_database, serve

README = Path(__file__).resolve().parents[2] / "README.md"


def django_snippets() -> list[str]:
    section = README.read_text().split("## In a Django project\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readme_django_section_runs_as_printed(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    settings_py, urls_py = django_snippets()
    port = free_port()
    with EmulatorServer(webhook_url=f"http://127.0.0.1:{port}/webhooks/clerk") as clerk, django_database(db_url):
        for name, value in {"CLERK_WEBHOOK_SIGNING_SECRET": clerk.webhook_secret, "CLERK_SECRET_KEY": clerk.secret_key,
                            "CLERK_API_URL": clerk.url, "CLERK_ISSUER": clerk.url}.items():
            monkeypatch.setenv(name, value)
        project: dict[str, Any] = {  # a Django project's settings before the snippet's lines
            "INSTALLED_APPS": [a for a in settings.INSTALLED_APPS if "clerk_sync" not in a and a != "rest_framework"],
            "MIDDLEWARE": [m for m in settings.MIDDLEWARE if "clerk_sync" not in m],
        }
        exec(settings_py, project)  # noqa: S102 - the README snippet, run as printed
        assert project["INSTALLED_APPS"] == list(settings.INSTALLED_APPS)
        urls = types.ModuleType("readme_urls")
        exec(urls_py, urls.__dict__)  # noqa: S102 - the README snippet, run as printed
        monkeypatch.setitem(sys.modules, "readme_urls", urls)
        chosen = {k: project[k] for k in ("MIDDLEWARE", "AUTHENTICATION_BACKENDS", "CLERK_SYNC")}
        with override_settings(ROOT_URLCONF="readme_urls", **chosen), serve("wsgi", port) as app:
            owner = clerk.create_user("owner@example.com", public_metadata={"role": "admin"})
            member = clerk.create_user("member@example.com")
            org = clerk.create_organization("Acme", created_by=owner["id"])
            clerk.add_membership(org["id"], member["id"])
            clerk.wait_for_deliveries()  # through the snippet's include(): POST /webhooks/clerk
            as_owner = bearer(clerk.mint_session_token(owner["id"], org_id=org["id"]))
            as_member = bearer(clerk.mint_session_token(member["id"], org_id=org["id"]))
            assert app.get("/admin-page").status_code == 401
            assert app.get("/admin-page", headers=as_owner).json() == {"email": "owner@example.com", "staff": True}
            assert app.get("/admin-page", headers=as_member).status_code == 403
            assert app.get("/members", headers=as_owner).json() == {"org": org["id"]}
            assert app.get("/members", headers=as_member).status_code == 403
