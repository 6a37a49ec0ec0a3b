"""Django server for bench/auth.py: under uvicorn (one worker), as the ASGI app or (``wsgi``) the WSGI one.

``/me`` is a sync view under ``clerk_login_required``; ``/open`` and ``/healthz`` are public. Both go
through the same middleware stack (``ClerkMiddleware`` included), so they differ only by the session.
The store is a SQLite file migrated with ``clerk_sync.migrations.upgrade`` (the deny list reads it).

    python bench/_auth_server_django.py PORT SQLITE_PATH PEM_PATH ISSUER AZP asgi|wsgi

Under WSGI the whole Django path is sync (uvicorn hands each request to a worker thread); under ASGI
``ClerkMiddleware`` runs async and the sync views in Django's thread executor.
"""

from __future__ import annotations

import sys
from pathlib import Path

import django
import uvicorn
from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.urls import path

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
    app = get_wsgi_application() if interface == "wsgi" else get_asgi_application()
    uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning", access_log=False,
                interface="wsgi" if interface == "wsgi" else "asgi3")


urlpatterns: list[object] = []

if __name__ == "__main__":
    main()
