"""clerk_sync.testing as an adopter's conftest uses it, typed: checked by `scripts/check` (mypy --strict)."""

from __future__ import annotations

from collections.abc import Iterator

from django.core.asgi import get_asgi_application
from django.core.wsgi import get_wsgi_application
from fastapi import FastAPI
from flask import Flask

from clerk_sync.errors import ClerkAPIError
from clerk_sync.testing import EmulatorRequestError, EmulatorServer, serve_app


def live_app(clerk: EmulatorServer, app: FastAPI) -> Iterator[str]:
    with serve_app(app, lifespan="on") as url:
        clerk.set_webhook_url(f"{url}/webhooks/clerk")
        yield url


def every_framework() -> list[str]:
    urls: list[str] = []
    with serve_app(Flask(__name__)) as flask_url, serve_app(get_wsgi_application(), interface="wsgi") as wsgi_url, \
            serve_app(get_asgi_application(), port=0, interface="asgi", lifespan="off") as asgi_url:
        urls += [flask_url, wsgi_url, asgi_url]
    return urls


def seed(clerk: EmulatorServer) -> str | None:
    user = clerk.create_user("ada@example.com", first_name="Ada")
    token: str = clerk.mint_session_token(user["id"], expires_in_seconds=60)
    clerk.wait_for_deliveries(timeout=5.0)
    clerk.reset()
    try:
        clerk.create_user("ada@example.com")
    except EmulatorRequestError as refused:
        reason: tuple[int | None, str | None, str | None, str | None, int] = (
            refused.status, refused.clerk_code, refused.long_message, refused.param_name, refused.response.status_code)
        error: ClerkAPIError = refused
        return f"{error.path} {reason}"
    return token
