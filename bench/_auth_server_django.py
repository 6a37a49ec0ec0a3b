"""Django server for bench/auth.py: the WSGI app under gunicorn (one gthread worker, as the Flask row), or
the ASGI app under uvicorn (one worker).

``/me`` is a sync view under ``clerk_login_required``; ``/open`` and ``/healthz`` are public. Both go
through the same middleware stack (``ClerkMiddleware`` included), so they differ only by the session.
The store is a SQLite file migrated with ``clerk_sync.migrations.upgrade`` (the deny list reads it).

    python bench/_auth_server_django.py PORT SQLITE_PATH PEM_PATH ISSUER AZP asgi|wsgi

Under WSGI the whole Django path is sync; under ASGI ``ClerkMiddleware`` runs async and the sync views
in Django's thread executor.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import django
import uvicorn
from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.urls import path
from gunicorn.app.base import BaseApplication

from clerk_sync import migrations
from clerk_sync.store import create_engine


def me(request: HttpRequest) -> JsonResponse:
    from clerk_sync.integrations.django.request import clerk_request

    auth = clerk_request(request).auth
    return JsonResponse({"user_id": auth.user_id if auth else None})


def open_route(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"user_id": None})


def main() -> None:
    port, db_path, pem_path, issuer, azp, interface = sys.argv[1:7]
    engine = create_engine(f"sqlite:///{db_path}")
    migrations.upgrade(engine)
    engine.dispose()
    settings.configure(
        DEBUG=False, SECRET_KEY="bench-only",  # noqa: S106 - a throwaway benchmark server
        ALLOWED_HOSTS=["127.0.0.1"], ROOT_URLCONF=__name__, USE_TZ=True,
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "clerk_sync.integrations.django"],
        MIDDLEWARE=["django.middleware.common.CommonMiddleware", "django.middleware.csrf.CsrfViewMiddleware",
                    "clerk_sync.integrations.django.middleware.ClerkMiddleware"],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": db_path}},
        CLERK_SYNC={"CLERK_JWT_KEY": Path(pem_path).read_text(), "CLERK_ISSUER": issuer,
                    "CLERK_AUTHORIZED_PARTIES": azp, "REQUIRE_AUTH": True, "PUBLIC_PATHS": ["/open", "/healthz"]},
    )
    django.setup()
    from django.core.asgi import get_asgi_application
    from django.core.wsgi import get_wsgi_application

    from clerk_sync.integrations.django.decorators import clerk_login_required

    global urlpatterns
    urlpatterns = [path("me", clerk_login_required(me)), path("open", open_route), path("healthz", open_route)]
    if interface == "wsgi":
        _Gunicorn(int(port), get_wsgi_application()).run()
    else:
        uvicorn.run(get_asgi_application(), host="127.0.0.1", port=int(port), log_level="warning",
                    access_log=False)


class _Gunicorn(BaseApplication):
    """gunicorn from Python, configured as bench/_auth_flask_server.py's (1 gthread worker x 8 threads)."""

    def __init__(self, port: int, app: Any) -> None:
        self.port, self.app = port, app
        super().__init__()

    def load_config(self) -> None:
        for key, value in {"bind": f"127.0.0.1:{self.port}", "workers": 1, "worker_class": "gthread",
                           "threads": 8, "keepalive": 75, "loglevel": "warning", "accesslog": None}.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self.app


urlpatterns: list[object] = []

if __name__ == "__main__":
    main()
