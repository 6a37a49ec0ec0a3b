"""Flask server for bench/auth.py: ``ClerkSync`` under gunicorn (one gthread worker) with a protected and a public route.

``/me`` is ``@clerk_login_required`` and answers ``current_clerk.user_id``; ``/open`` and ``/healthz``
are ``@public`` views of the same app (deny by default on), so both routes share the whole stack and
differ only by the session check. Settings come from ``app.config["CLERK_SYNC"]`` as an app would set
them (a PEM key: networkless verification); the store is a SQLite file migrated before the worker starts.

    python bench/_auth_flask_server.py PORT SQLITE_PATH PEM_PATH ISSUER AZP
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from clerk_sync import migrations
from clerk_sync.integrations.flask import ClerkSync, clerk_login_required, current_clerk, public
from clerk_sync.store import Store

THREADS = 8  # one per load-generator connection (bench/auth.py runs c=8 keep-alive)


def build(db_path: str, pem: str, issuer: str, azp: str) -> Flask:
    app = Flask(__name__)
    app.config["CLERK_SYNC"] = {"DATABASE_URL": f"sqlite:///{db_path}", "CLERK_JWT_KEY": pem,
                                "CLERK_ISSUER": issuer, "CLERK_AUTHORIZED_PARTIES": azp}
    ClerkSync(app, deny_by_default=True, webhook_path=None)  # auth only: the webhook route is not measured

    @app.get("/me")
    @clerk_login_required
    def me() -> dict[str, Any]:
        return {"user_id": current_clerk.user_id}

    @app.get("/open")
    @public
    def open_route() -> dict[str, Any]:
        return {"user_id": None}

    @app.get("/healthz")
    @public
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


class _Gunicorn(BaseApplication):
    """gunicorn run from Python: the app is built in the worker (after the fork), not in the arbiter."""

    def __init__(self, port: int, args: tuple[str, str, str, str]) -> None:
        self.port, self.args = port, args
        super().__init__()

    def load_config(self) -> None:
        for key, value in {"bind": f"127.0.0.1:{self.port}", "workers": 1, "worker_class": "gthread",
                           "threads": THREADS, "keepalive": 75, "loglevel": "warning", "accesslog": None}.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return build(*self.args)


def main() -> None:
    port, db_path, pem_path, issuer, azp = sys.argv[1:6]
    store = Store.from_url(f"sqlite:///{db_path}")
    migrations.upgrade(store.engine)
    store.dispose()
    _Gunicorn(int(port), (db_path, Path(pem_path).read_text(), issuer, azp)).run()


if __name__ == "__main__":
    main()
