"""Django under test: each test's database (SQLite file or PostgreSQL schema) becomes Django's
``default`` database *and* clerk-sync's (``DATABASE_URL`` is derived from it), Django's own tables are
migrated into it, and ``CLERK_SYNC`` points at a fresh emulator. Requests go through Django's test
client, the WSGI app under a real threaded server, or the ASGI app under uvicorn, all on loopback."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import httpx
import pytest
import sqlalchemy as sa
from django.core.asgi import get_asgi_application
from django.core.management import call_command
from django.core.wsgi import get_wsgi_application
from django.db import connections
from django.test import Client, override_settings

from clerk_sync.integrations.django.runtime import get_clerk_sync, reset_clerk_sync
from clerk_sync.store import Store
from clerk_sync.tables import metadata
from clerk_sync.testing import EmulatorServer
from tests._server import free_port, running

PUBLIC_EXTRA = ["/t/drf/open", "/t/django-login-required"]


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """``CLERK_SYNC`` falls back to the environment: keep the developer's variables out of the tests."""
    import os

    for name in list(os.environ):
        if name.startswith("CLERK_") or name in ("DATABASE_URL", "REDIS_URL"):
            monkeypatch.delenv(name)


def django_db_settings(db_url: str) -> dict[str, Any]:
    """The ``DATABASES`` entry for one of the ``db_url`` fixture's URLs."""
    url = sa.engine.make_url(db_url)
    if url.get_backend_name() == "sqlite":
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": url.database}
    if url.get_backend_name() in ("mysql", "mariadb"):
        return {"ENGINE": "django.db.backends.mysql", "NAME": url.database, "USER": url.username or "",
                "PASSWORD": url.password or "", "HOST": url.host or "", "PORT": str(url.port or ""),
                "OPTIONS": {"charset": "utf8mb4"}}
    options = url.query.get("options")
    return {"ENGINE": "django.db.backends.postgresql", "NAME": url.database, "USER": url.username or "",
            "PASSWORD": url.password or "", "HOST": url.host or "", "PORT": str(url.port or ""),
            "OPTIONS": {"options": options} if options else {}}


@contextmanager
def django_database(db_url: str) -> Iterator[None]:
    """Point Django's ``default`` connection at ``db_url`` (in place: every thread sees it) and migrate."""
    from django.contrib.contenttypes.models import ContentType

    connections.close_all()
    del connections["default"]
    configured = connections.configure_settings({"default": django_db_settings(db_url)})["default"]
    current = connections.settings["default"]
    current.clear()
    current.update(configured)
    ContentType.objects.clear_cache()
    reset_clerk_sync()
    call_command("migrate", verbosity=0, interactive=False)
    try:
        yield
    finally:
        reset_clerk_sync()
        connections.close_all()


def emulator_settings(clerk: EmulatorServer, **extra: Any) -> dict[str, Any]:
    return {"CLERK_WEBHOOK_SIGNING_SECRET": clerk.webhook_secret, "CLERK_SECRET_KEY": clerk.secret_key,
            "CLERK_API_URL": clerk.url, "CLERK_ISSUER": clerk.url, "CLERK_AUTHORIZED_PARTIES": "http://localhost:3000",
            "REQUIRE_AUTH": True, "PUBLIC_PATHS": ["/", "/healthz", *PUBLIC_EXTRA], "DENY_LIST_REFRESH_S": 0,
            **extra}


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def wsgi_server(port: int) -> Iterator[str]:
    """Django's WSGI app under a real (threaded) server on loopback."""
    server = make_server("127.0.0.1", port, get_wsgi_application(), server_class=_ThreadingWSGIServer,
                         handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextmanager
def serve(transport: str, port: int) -> Iterator[Any]:
    """A client for the app: Django's test client (webhooks still arrive over WSGI), or real HTTP."""
    if transport == "asgi":
        with running(get_asgi_application(), port=port) as url, httpx.Client(base_url=url, timeout=30) as client:
            yield client
        return
    with wsgi_server(port) as url:
        if transport == "test-client":
            yield Client()
            return
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client


@dataclass
class World:
    clerk: EmulatorServer
    app: Any  # django.test.Client or httpx.Client: both have get/post(path, headers=...) -> .status_code/.json()
    transport: str

    @property
    def store(self) -> Store:
        return get_clerk_sync().store

    def counts(self) -> dict[str, int]:
        """Rows of every clerk-sync table and of Django's users."""
        with self.store.connect() as conn:
            counts = {t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
                      for t in metadata.sorted_tables}
            counts["auth_user"] = conn.execute(sa.text("SELECT count(*) FROM auth_user")).scalar_one()
        return counts


@contextmanager
def world_for(db_url: str, transport: str, **settings: Any) -> Iterator[World]:
    port = free_port()
    with EmulatorServer(webhook_url=f"http://127.0.0.1:{port}/webhooks/clerk", rate_limit_requests=1000) as clerk, \
            django_database(db_url), override_settings(CLERK_SYNC=emulator_settings(clerk, **settings)), \
            serve(transport, port) as app:
        yield World(clerk, app, transport)


@pytest.fixture(params=["test-client", "wsgi", "asgi"])
def world(request: pytest.FixtureRequest, db_url: str) -> Iterator[World]:
    with world_for(db_url, request.param) as w:
        yield w


@pytest.fixture
def client_world(db_url: str) -> Iterator[World]:
    """Django's test client only (webhooks over WSGI): for tests of one behaviour, not of transports."""
    with world_for(db_url, "test-client") as w:
        yield w


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
