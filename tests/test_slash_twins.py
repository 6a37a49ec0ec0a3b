"""A public path's trailing-slash twin is public only where the face serves it with the same view.

Review finding (auth review 5, switched on in the faces here): ``/health`` listed public also opened a
separate, protected ``/health/`` route on FastAPI/Starlette and Django."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI

from clerk_sync.auth.sessions import is_public_path
from clerk_sync.integrations.asgi import WEBHOOK_SLASH_TWINS
from clerk_sync.integrations.fastapi import ClerkAuth, webhook_router
from tests import factories as f
from tests._server import running
from tests.test_auth import Harness, bearer, token


@pytest.fixture
def harness(db_url: str) -> Iterator[Harness]:
    h = Harness(db_url)
    yield h
    h.store.dispose()


def _app(h: Harness, **install: object) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/health/")
    async def health_details() -> dict[str, bool]:  # a separate route, meant to be protected
        return {"secret": True}

    app.include_router(webhook_router(h.processor))
    app.include_router(webhook_router(h.processor, "/hooks/clerk"))
    ClerkAuth(h.auth).install(app, **install)  # type: ignore[arg-type]
    return app


def test_by_default_no_twin_is_public_but_the_webhook_routes() -> None:
    public = {"/health", "/webhooks/clerk"}
    assert not is_public_path("/health/", public, ())
    assert not is_public_path("/webhooks/clerk/", public, ())  # the function itself opens none
    assert is_public_path("/webhooks/clerk/", public, (), slash_twins=WEBHOOK_SLASH_TWINS)
    assert not is_public_path("/webhooks/clerk/", {"/health"}, (), slash_twins=WEBHOOK_SLASH_TWINS)  # not listed


def test_fastapi_a_public_paths_twin_route_stays_protected_and_the_webhook_twin_is_served(
        harness: Harness) -> None:
    app = _app(harness, public_paths={"/health", "/webhooks/clerk", "/hooks/clerk"})
    with running(app) as url, httpx.Client(base_url=url) as client:
        assert client.get("/health").json() == {"ok": True}
        refused = client.get("/health/")
        assert (refused.status_code, refused.json()["error"]) == (401, "token_missing")
        assert client.get("/health/", headers=bearer(token("user_twin"))).json() == {"secret": True}
        for n, path in enumerate(("/webhooks/clerk/", "/hooks/clerk", "/hooks/clerk/")):
            headers, body = f.signed(f.envelope("user.created", f.user(f"user_twin{n}", 1)), f"msg_twin{n}")
            answer = client.post(path, content=body, headers=headers)
            expected = (401, None) if path == "/hooks/clerk/" else (200, "applied")  # its twin not named
            assert (answer.status_code, answer.json().get("status")) == expected, path


def test_fastapi_names_the_twins_of_a_webhook_mounted_elsewhere(harness: Harness) -> None:
    app = _app(harness, public_paths={"/health", "/hooks/clerk"}, slash_twins={"/hooks/clerk"})
    with running(app) as url, httpx.Client(base_url=url) as client:
        headers, body = f.signed(f.envelope("user.created", f.user("user_twin_x", 1)), "msg_twin_x")
        answer = client.post("/hooks/clerk/", content=body, headers=headers)
        assert (answer.status_code, answer.json()["status"]) == (200, "applied")
        assert client.get("/health/").status_code == 401
        refused = client.post("/webhooks/clerk/", content=body, headers=headers)  # not public here at all
        assert refused.status_code == 401
