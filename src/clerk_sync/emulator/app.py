"""Application factory and server entry point.

Usage::

    app, emulator = create_app(EmulatorConfig(webhook_url="http://127.0.0.1:8000/webhooks/clerk"))
    serve(EmulatorConfig(), host="127.0.0.1", port=4010)   # blocking
"""

from __future__ import annotations

import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import TextIO

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from .admin import admin_routes
from .api import bapi_routes
from .config import EmulatorConfig
from .core import Emulator
from .errors import ClerkAPIError

__all__ = ["CannotListen", "check_secret_key", "create_app", "serve"]

_WELL_KNOWN_KEY = EmulatorConfig.secret_key  # sk_test_emulator: printed, it is no secret


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown paths and methods answer in Clerk's error shape too."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 404:
        return ClerkAPIError.not_found().to_response()
    return ClerkAPIError(status, "request_invalid", "Request is not valid", str(exc)).to_response()


async def _unexpected(request: Request, exc: Exception) -> Response:
    """A bug still answers in Clerk's error shape, so clients parse it as they would Clerk's 500."""
    detail = f"The Clerk emulator failed on this request ({type(exc).__name__}: {exc}); its log has the traceback."
    return ClerkAPIError(500, "internal_clerk_error", "Oops, an unexpected error occurred", detail).to_response()


def create_app(config: EmulatorConfig, emulator: Emulator | None = None) -> tuple[Starlette, Emulator]:
    """Build the ASGI app and the :class:`Emulator` behind it.

    The emulator can be driven in-process (knobs, seeding, token minting) while the app
    serves HTTP; its delivery worker stops when the app's lifespan ends.
    """
    emulator = emulator or Emulator(config)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            emulator.close()

    app = Starlette(
        routes=[*bapi_routes(), *admin_routes()],
        exception_handlers={HTTPException: _http_error, Exception: _unexpected},
        lifespan=lifespan,
    )
    app.state.emulator = emulator
    return app, emulator


class CannotListen(OSError):
    """The emulator's address cannot be bound (busy, or not this host's): raised before anything is printed."""


def _listen(host: str, port: int) -> socket.socket:
    """Bind before anything is printed: a busy port must not first announce URLs and a secret. The address
    family is the host's own (``localhost`` may be IPv6 only)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family)
    except OSError as exc:
        raise CannotListen(exc.errno, f"the Clerk emulator cannot listen on {host}:{port} ({exc}): pass another "
                                      "--host") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does (TIME_WAIT only)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CannotListen(exc.errno, f"the Clerk emulator cannot listen on {host}:{port} ({exc.strerror}): "
                                      "pass another port (--port), or stop what uses it") from None
    return sock


def check_secret_key(config: EmulatorConfig) -> None:
    """Refuse a live key (``ValueError``): the emulator is never production, and it prints the key it serves."""
    if config.secret_key.startswith("sk_live_"):
        raise ValueError("CLERK_SECRET_KEY is a live (production) key: the emulator is never production and "
                         "must not be handed one. Unset CLERK_SECRET_KEY in its environment (it then uses "
                         f"{_WELL_KNOWN_KEY}), or set a test key of your own")


def _shown_key(key: str) -> str:
    """The well-known default in full; any other key (adopted from CLERK_SECRET_KEY) masked, as it may be real."""
    return key if key == _WELL_KNOWN_KEY else f"{key[:8]}… from CLERK_SECRET_KEY"


def _public_host(host: str) -> str:
    return "localhost" if host in {"0.0.0.0", "::", ""} else host  # noqa: S104 (a comparison)


def serve(
    config: EmulatorConfig,
    host: str = "127.0.0.1",
    port: int = 4010,
    *,
    log_level: str = "info",
    out: TextIO | None = None,
) -> None:
    """Run the emulator with uvicorn until interrupted (blocking).

    Prints the URLs and, when it was generated, the webhook signing secret: the receiving
    service needs it as ``CLERK_WEBHOOK_SIGNING_SECRET``; a secret key of the caller's is masked.
    Raises ``ValueError`` for a live key (:func:`check_secret_key`), and ``OSError`` (naming the
    address) if ``host:port`` cannot be bound, both before printing anything.
    """
    check_secret_key(config)
    stream = out or sys.stdout
    with _listen(host, port) as sock:
        port = int(sock.getsockname()[1])  # the real one when port=0 was asked for
        app, emulator = create_app(config)
        url = f"http://{_public_host(host)}:{port}"
        emulator.frontend_url = config.frontend_url or url
        print(f"Clerk emulator: Backend API {url}/v1  (secret key {_shown_key(config.secret_key)})", file=stream)
        if config.webhook_secret_was_generated:
            print(f"Webhook signing secret (generated): {config.effective_webhook_secret}", file=stream)
        print(f"Webhooks -> {config.webhook_url or '(none; POST /_emulator/webhook to set)'}", file=stream)
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, ws="none"))
        with suppress(KeyboardInterrupt):  # Ctrl-C is how it stops, as with uvicorn.run
            server.run(sockets=[sock])
