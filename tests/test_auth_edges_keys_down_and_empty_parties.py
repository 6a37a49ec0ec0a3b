"""Two auth edges (review): a websocket refused because Clerk's keys could not be fetched is closed "try again
later" (1013), as HTTP answers it 503, not "policy violation" (1008); and ``CLERK_AUTHORIZED_PARTIES`` that lists
no origin at all ("," or " , ": a template whose parts were all empty) is refused at start-up, where it refused
every session (401) and every cookie POST (no origin allowed) with nothing said."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from clerk_sync import migrations
from clerk_sync.auth.authenticator import Authenticator
from clerk_sync.auth.claims import ClaimsValidator
from clerk_sync.auth.jwks import JWKSKeySource
from clerk_sync.auth.sessions import SessionVerifier
from clerk_sync.config import Settings
from clerk_sync.errors import ConfigError
from clerk_sync.integrations.asgi import ClerkAuthMiddleware
from clerk_sync.store import Store
from tests.test_auth import token


@pytest.mark.anyio
async def test_a_websocket_refused_while_the_keys_cannot_be_fetched_closes_with_1013(tmp_path: Path) -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    store = Store.from_url(f"sqlite:///{tmp_path / 'ws.db'}")
    migrations.upgrade(store.engine)
    keys = JWKSKeySource("https://clerk.example.com/.well-known/jwks.json",
                         client=httpx.Client(transport=httpx.MockTransport(refused)))
    called: list[str] = []
    sent: list[dict[str, Any]] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        called.append(scope["path"])

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/ws", "extensions": {},
             "headers": [(b"authorization", f"Bearer {token('user_w')}".encode())]}
    try:
        await ClerkAuthMiddleware(inner, Authenticator(SessionVerifier(keys, ClaimsValidator()), store))(
            scope, receive, send)
    finally:
        store.dispose()
    assert sent == [{"type": "websocket.close", "code": 1013, "reason": "token_keys_unavailable"}]
    assert called == []


@pytest.mark.parametrize("value", [",", " , ", ",,"])
def test_authorized_parties_listing_no_origin_is_refused_with_what_to_set(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"DATABASE_URL": "sqlite://", "CLERK_AUTHORIZED_PARTIES": value})
    message = str(caught.value)
    assert "CLERK_AUTHORIZED_PARTIES" in message and "no origin in it" in message, message
    assert "https://app.example.com" in message and "or unset it" in message, message


@pytest.mark.parametrize("value", ["", "   "])
def test_a_blank_authorized_parties_is_unset(value: str) -> None:
    settings = Settings.from_env({"DATABASE_URL": "sqlite://", "CLERK_AUTHORIZED_PARTIES": value})
    assert settings.authorized_parties() is None  # (azp unchecked, warned at start-up: not every session refused)


def test_authorized_parties_with_an_empty_entry_keeps_the_others() -> None:
    settings = Settings.from_env({"DATABASE_URL": "sqlite://",
                                  "CLERK_AUTHORIZED_PARTIES": "https://app.example.com, ,"})
    assert settings.authorized_parties() == frozenset({"https://app.example.com"})
