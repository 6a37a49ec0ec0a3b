"""Walkthrough review: without ``CLERK_AUTHORIZED_PARTIES`` a session token's ``azp`` is not checked. Django's
check W002 and ``clerk-sync doctor`` said so; the FastAPI and Flask faces started silently. Both now warn
once at start-up, and not when the origins are set."""

from __future__ import annotations

from pathlib import Path

import structlog
from fastapi import FastAPI
from flask import Flask

from clerk_sync.auth import Authenticator, verifier_from_settings
from clerk_sync.config import Settings
from clerk_sync.integrations.fastapi import ClerkAuth
from clerk_sync.integrations.flask import ClerkSync
from clerk_sync.store import Store
from tests.conftest import SECRET
from tests.test_sessions import ISS, KEY, pem

ORIGIN = "https://app.example.com"


def _warned(logs: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in logs if e["event"] == "clerk_authorized_parties_unset"]


def test_fastapi_install_warns_while_the_origins_are_unset(tmp_path: Path) -> None:
    for parties, expected in ((None, 1), (ORIGIN, 0)):
        env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'f.db'}", "CLERK_JWT_KEY": pem(KEY), "CLERK_ISSUER": ISS,
               **({"CLERK_AUTHORIZED_PARTIES": parties} if parties else {})}
        settings = Settings.from_env(env)
        store = Store.from_settings(settings)
        try:
            with structlog.testing.capture_logs() as logs:
                ClerkAuth(Authenticator(verifier_from_settings(settings), store)).install(FastAPI(), public_paths={"/"})
        finally:
            store.dispose()
        found = _warned(logs)
        assert len(found) == expected, logs
        if found:
            assert found[0]["log_level"] == "warning" and "CLERK_AUTHORIZED_PARTIES" in str(found[0]["fix"])


def test_flask_init_app_warns_while_the_origins_are_unset(tmp_path: Path) -> None:
    for parties, expected in ((None, 1), (ORIGIN, 0)):
        app = Flask(__name__)
        app.config["CLERK_SYNC"] = {"DATABASE_URL": f"sqlite:///{tmp_path / 'k.db'}", "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                                    "CLERK_JWT_KEY": pem(KEY), "CLERK_ISSUER": ISS,
                                    **({"CLERK_AUTHORIZED_PARTIES": parties} if parties else {})}
        with structlog.testing.capture_logs() as logs:
            ClerkSync(app)
        app.extensions["clerk_sync"].close()
        assert len(_warned(logs)) == expected, logs
