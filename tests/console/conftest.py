"""A running service with the console, beside the Clerk emulator, on a real database.

``stack`` serves ``create_app`` (webhooks + ``/console``) on loopback, wired to an emulator that has
an admin (Ada) and a regular user (Grace), both synced through real signed webhooks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from clerk_sync.auth.audit import AuditEntry, record_audit
from clerk_sync.config import Settings
from clerk_sync.integrations.console._access import SIGN_IN, ConsoleAccess
from clerk_sync.integrations.console._console import Console
from clerk_sync.integrations.starlette import build_processor, create_app
from clerk_sync.store import Store
from clerk_sync.tables import audit_log, users
from clerk_sync.testing import EmulatorServer
from tests._server import free_port, running

OPERATOR_TOKEN = "operator-token-for-tests-0123456789"


@dataclass
class ConsoleStack:
    url: str
    emulator: EmulatorServer
    store: Store
    console: Console
    admin_id: str
    user_id: str

    @property
    def console_url(self) -> str:
        return f"{self.url}/console"

    def sign_in_link(self, user_id: str) -> str:
        """What ``clerk-sync dev`` prints: a sign-in link carrying an emulator-minted session token."""
        token = self.emulator.mint_session_token(user_id, expires_in_seconds=600)
        return f"{self.console_url}/login/clerk?token={token}"

    def audit_rows(self) -> list[Any]:
        with self.store.connect() as conn:
            return list(conn.execute(sa.select(audit_log).order_by(audit_log.c.id)).mappings())

    def user_row(self, clerk_id: str) -> Any:
        with self.store.connect() as conn:
            return conn.execute(sa.select(users).where(users.c.clerk_id == clerk_id)).mappings().first()

    def failed_delivery(self, user_id: str, **changes: Any) -> str:
        """A stored ``failed`` user.updated delivery that would change ``user_id`` (as if the database had
        refused it once), written through the store's own inbox API."""
        user = self.emulator.request("GET", f"/v1/users/{user_id}")
        user.update(changes, updated_at=user["updated_at"] + 1000)
        svix_id = f"msg_console_{user_id}_{time.monotonic_ns()}"
        payload = {"object": "event", "type": "user.updated", "data": user, "timestamp": user["updated_at"],
                   "instance_id": self.emulator.config.instance_id}
        with self.store.transaction() as w:
            w.record_delivery(svix_id, payload, event_type="user.updated", instance_id=payload["instance_id"],
                              event_timestamp=user["updated_at"], status="failed",
                              error="database error: OperationalError: database is locked")
        return svix_id

    def wait_synced(self) -> None:
        self.emulator.wait_for_deliveries(timeout=20)


def console_of(app: Any) -> Console:
    for route in app.routes:
        if getattr(route, "path", None) == "/console":
            return route.app.state.console  # type: ignore[no-any-return]
    raise LookupError("the console is not mounted")


def settings_for(db_url: str, emulator: EmulatorServer, **extra: str) -> Settings:
    return Settings.from_env({
        "DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": emulator.webhook_secret,
        "CLERK_SECRET_KEY": emulator.secret_key, "CLERK_API_URL": emulator.url,
        "CLERK_SYNC_CONSOLE": "1", "CLERK_SYNC_CONSOLE_TOKEN": OPERATOR_TOKEN, **extra,
    })


@pytest.fixture
def stack(db_url: str) -> Iterator[ConsoleStack]:
    yield from make_stack(db_url)


def make_stack(db_url: str, **extra: str) -> Iterator[ConsoleStack]:
    port = free_port()
    with EmulatorServer(webhook_url=f"http://127.0.0.1:{port}/webhooks/clerk") as emulator:
        settings = settings_for(db_url, emulator, **extra)
        processor = build_processor(settings)
        app = create_app(settings, processor)
        console = console_of(app)
        with running(app, port) as url:
            admin = emulator.create_user("ada@example.com", first_name="Ada", last_name="Lovelace",
                                         public_metadata={"role": "admin"})
            user = emulator.create_user("grace@example.com", first_name="Grace", last_name="Hopper")
            emulator.wait_for_deliveries(timeout=20)
            try:
                yield ConsoleStack(url, emulator, processor.store, console, admin["id"], user["id"])
            finally:
                if console.drift is not None:
                    console.drift.wait(30)
                if console.clerk is not None:
                    console.clerk.close()
        processor.store.dispose()


def operator_client(stack: ConsoleStack) -> httpx.Client:
    """An API caller with the operator token as Bearer (no cookie, so no CSRF token needed)."""
    return httpx.Client(base_url=stack.console_url, headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
                        timeout=30)


def admin_signed_in(access: ConsoleAccess, clerk_id: str, session_id: str) -> str:
    """An admin's console cookie as a sign-in opens one: minted, and its ``console.login`` row (which names
    the Clerk session) written first, as the app does; a cookie without that row is refused."""
    identity = access.admin_session(clerk_id, session_id)
    with access.store.transaction() as w:
        record_audit(w, AuditEntry(SIGN_IN, clerk_id, clerk_id, details={"via": "console", "as": "admin",
                                                                         "sid": session_id,
                                                                         "session": identity.session_digest}))
    assert identity.new_cookie is not None
    return identity.new_cookie
