"""clerk_sync.testing.serve_app: the app under test on a real loopback port, so the emulator can deliver
webhooks to it (review: adopters copied a uvicorn thread into their conftest; the repo's runner was private)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from flask import Flask, request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from clerk_sync import testing
from clerk_sync.testing import EmulatorServer, serve_app


def _starlette_receiver(received: list[dict[str, Any]]) -> Starlette:
    async def webhook(req: Request) -> JSONResponse:
        received.append({"svix-id": req.headers["svix-id"], **json.loads(await req.body())})
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/webhooks/clerk", webhook, methods=["POST"])])


def _flask_receiver(received: list[dict[str, Any]]) -> Flask:
    app = Flask(__name__)

    @app.post("/webhooks/clerk")
    def webhook() -> dict[str, bool]:
        received.append({"svix-id": request.headers["svix-id"], **json.loads(request.get_data())})
        return {"ok": True}

    return app


@pytest.mark.parametrize("framework", ["asgi", "wsgi"])
def test_the_emulator_delivers_webhooks_to_the_served_app(framework: str) -> None:
    received: list[dict[str, Any]] = []
    app = _starlette_receiver(received) if framework == "asgi" else _flask_receiver(received)
    assert testing._is_asgi(app) is (framework == "asgi")
    with EmulatorServer(seed=1, time_scale=1000.0) as clerk, serve_app(app) as url:
        assert url.startswith("http://127.0.0.1:") and not url.endswith("/")
        clerk.set_webhook_url(f"{url}/webhooks/clerk")
        user = clerk.create_user("served@example.com")
        clerk.wait_for_deliveries()
        assert [(r["type"], r["data"]["id"]) for r in received] == [("user.created", user["id"])]
        assert [d["status"] for d in clerk.deliveries()] == ["succeeded"]
    with pytest.raises(httpx.TransportError):  # stopped with the block
        httpx.post(f"{url}/webhooks/clerk", timeout=2)


def test_an_explicit_interface_and_port() -> None:
    async def asgi_function(scope: Any, receive: Any, send: Any) -> None:  # a bare ASGI callable
        assert scope["type"] == "http"
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    with serve_app(asgi_function, lifespan="off") as url:
        assert httpx.get(url).status_code == 204
    port = int(url.rsplit(":", 1)[1])
    with serve_app(_flask_receiver([]), port=port, interface="wsgi") as again:  # the port is free again
        assert again == url
        assert httpx.get(f"{again}/webhooks/clerk").status_code == 405


def test_a_failing_start_up_is_an_error_not_a_hang() -> None:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("the database is not migrated")
        yield

    with pytest.raises(RuntimeError, match=r"the app did not start on http://127\.0\.0\.1:\d+"), \
            serve_app(Starlette(lifespan=lifespan), lifespan="on"):
        pass
