"""Server for bench/auth.py: one FastAPI app under uvicorn (one worker) with a protected and a public route.

``/me`` depends on ``clerk.current_auth``; ``/open`` and ``/healthz`` are public paths of the same
``ClerkAuthMiddleware``, so both routes share the whole stack and differ only by the session check.
The Authenticator's store is a SQLite file migrated with ``clerk_sync.migrations.upgrade``.

    python bench/_auth_server.py PORT SQLITE_PATH PEM_PATH ISSUER AZP
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI

from clerk_sync import migrations
from clerk_sync.auth.authenticator import Authenticator, DenyList
from clerk_sync.auth.claims import Auth, ClaimsValidator
from clerk_sync.auth.jwks import StaticKeySource
from clerk_sync.auth.sessions import SessionVerifier
from clerk_sync.integrations.asgi import ClerkAuthMiddleware
from clerk_sync.integrations.fastapi import ClerkAuth
from clerk_sync.store import Store

PUBLIC = ("/open", "/healthz")


def build(db_path: str, pem: str, issuer: str, azp: str) -> ClerkAuthMiddleware:
    store = Store.from_url(f"sqlite:///{db_path}")
    migrations.upgrade(store.engine)
    verifier = SessionVerifier(StaticKeySource(pem), ClaimsValidator(issuer=issuer, authorized_parties=frozenset({azp})))
    authenticator = Authenticator(verifier, store, deny_list=DenyList(store, refresh_s=1.0))
    clerk = ClerkAuth(authenticator)
    app = FastAPI()
    clerk.install(app, public_paths=PUBLIC, deny_by_default=False)  # the middleware wraps the app below

    @app.get("/me")
    async def me(auth: Auth = Depends(clerk.current_auth)) -> dict[str, Any]:  # noqa: B008 (as tests/test_auth.py)
        return {"user_id": auth.user_id}

    @app.get("/open")
    async def open_route() -> dict[str, Any]:
        return {"user_id": None}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return ClerkAuthMiddleware(app, authenticator, public_paths=PUBLIC)


def main() -> None:
    port, db_path, pem_path, issuer, azp = sys.argv[1:6]
    app = build(db_path, Path(pem_path).read_text(), issuer, azp)
    uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
