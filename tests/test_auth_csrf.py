"""Cross-site request forgery: a POST riding on the ``__session`` cookie alone was served whatever page sent it (cross-site
request forgery), by the ASGI middleware (so FastAPI's ``install``) and by Flask. An unsafe request
authenticated by the cookie must now come from an allowed origin: ``Origin`` (else ``Referer``) in
``CLERK_AUTHORIZED_PARTIES`` when set, else this site's own origin. Real servers on loopback, real tokens."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from flask import Flask

from clerk_sync.auth.authenticator import Authenticator, DenyList
from clerk_sync.auth.claims import ClaimsValidator
from clerk_sync.auth.jwks import StaticKeySource
from clerk_sync.auth.sessions import SessionVerifier
from clerk_sync.integrations.fastapi import ClerkAuth
from clerk_sync.integrations.flask import ClerkSync, clerk_login_required, current_clerk, optional_clerk, public
from tests import factories as f
from tests._flask import running_wsgi
from tests._server import running
from tests.conftest import SECRET
from tests.test_auth import Harness, bearer, token
from tests.test_sessions import AZP, ISS, KEY, pem

EVIL = "https://evil.example.test"
pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # no database question here


def asgi_app(authenticator: Authenticator, served: list[str]) -> FastAPI:
    clerk = ClerkAuth(authenticator)
    app = FastAPI()
    clerk.install(app, public_paths={"/newsletter", "/api/ping"})

    @app.post("/transfer")
    async def transfer(request: Request) -> dict[str, Any]:
        auth = await clerk.current_auth(request)
        served.append(auth.user_id)
        return {"user": auth.user_id}

    @app.delete("/transfer")
    async def cancel(request: Request) -> dict[str, Any]:
        return {"user": (await clerk.current_auth(request)).user_id}

    @app.get("/transfer")
    async def show(request: Request) -> dict[str, Any]:
        return {"user": (await clerk.current_auth(request)).user_id}

    @app.post("/newsletter")
    def newsletter(request: Request) -> dict[str, Any]:  # public: open to anyone, signed in or not
        auth = request.scope["clerk_auth"]
        return {"user": auth.user_id if auth else None}

    @app.post("/api/ping")
    async def ping(request: Request) -> dict[str, Any]:  # public to the middleware, guarded by its dependency
        auth = await clerk.current_auth(request)
        served.append(auth.user_id)
        return {"user": auth.user_id}

    return app


@pytest.fixture
def harness(db_url: str) -> Iterator[Harness]:
    h = Harness(db_url)
    h.event("user.created", f.user("user_c", 1))
    yield h
    h.store.dispose()


def without_parties(h: Harness) -> Authenticator:
    """The same instance, without CLERK_AUTHORIZED_PARTIES: only this site's own origin is allowed."""
    verifier = SessionVerifier(StaticKeySource(pem(KEY)), ClaimsValidator(issuer=ISS))
    return Authenticator(verifier, h.store, deny_list=DenyList(h.store, refresh_s=0))


def test_asgi_refuses_a_cookie_post_from_another_origin(harness: Harness) -> None:
    served: list[str] = []
    cookie = {"Cookie": f"__session={token('user_c')}"}
    with running(asgi_app(harness.auth, served)) as url, httpx.Client(base_url=url) as client:
        for headers in ({"Origin": EVIL}, {"Referer": f"{EVIL}/pay"}, {"Origin": "null"}, {}):
            r = client.post("/transfer", headers={**cookie, **headers})
            assert (r.status_code, r.json()["error"]) == (403, "cross_site_request"), headers
        assert "CLERK_AUTHORIZED_PARTIES" in client.post("/transfer", headers={**cookie, "Origin": EVIL}).json()["message"]
        assert "neither Origin nor Referer" in client.post("/transfer", headers=cookie).json()["message"]
        assert client.delete("/transfer", headers={**cookie, "Origin": EVIL}).status_code == 403
        assert served == []
        # Allowed: from an authorized party (Origin, else Referer); safe methods; Bearer (no ambient credential).
        assert client.post("/transfer", headers={**cookie, "Origin": AZP}).json() == {"user": "user_c"}
        assert client.post("/transfer", headers={**cookie, "Referer": f"{AZP}/account?x=1"}).status_code == 200
        assert client.get("/transfer", headers={**cookie, "Origin": EVIL}).status_code == 200
        assert client.post("/transfer", headers={**bearer(token("user_c")), "Origin": EVIL}).status_code == 200
        # A public path stays public: the cross-site cookie reads as no session, nothing refused.
        r = client.post("/newsletter", headers={**cookie, "Origin": EVIL})
        assert (r.status_code, r.json()) == (200, {"user": None})
        assert client.post("/newsletter", headers={**cookie, "Origin": AZP}).json() == {"user": "user_c"}
        # ... and the app's own dependency, verifying again, sees no session cookie either.
        r = client.post("/api/ping", headers={"Cookie": f"theme=dark; __session={token('user_c')}", "Origin": EVIL})
        assert (r.status_code, r.json()["error"]) == (401, "token_missing")
    assert served == ["user_c", "user_c", "user_c"]


def test_asgi_without_authorized_parties_allows_only_its_own_origin(harness: Harness) -> None:
    cookie = {"Cookie": f"__session={token('user_c')}"}
    with running(asgi_app(without_parties(harness), [])) as url, httpx.Client(base_url=url) as client:
        assert client.post("/transfer", headers={**cookie, "Origin": url}).json() == {"user": "user_c"}
        assert client.post("/transfer", headers={**cookie, "Referer": f"{url}/page"}).status_code == 200
        port = int(url.rsplit(":", 1)[1])
        for origin in (f"http://127.0.0.1:{port + 1}", f"https://127.0.0.1:{port}", AZP):
            r = client.post("/transfer", headers={**cookie, "Origin": origin})
            assert (r.status_code, r.json()["error"]) == (403, "cross_site_request"), origin
            assert url in r.json()["message"]  # names the origin it expected


def flask_app(db_url: str, served: list[str], **config: str) -> Flask:
    app = Flask(__name__)
    app.config["CLERK_SYNC"] = {"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                                "CLERK_JWT_KEY": pem(KEY), "CLERK_ISSUER": ISS, **config}
    ClerkSync(app, deny_by_default=True, revocation_refresh_s=0)

    @app.post("/transfer")
    @clerk_login_required
    def transfer() -> dict[str, Any]:
        served.append(current_clerk.user_id)
        return {"user": current_clerk.user_id}

    @app.post("/newsletter")
    @public
    def newsletter() -> dict[str, Any]:
        auth = optional_clerk()
        return {"user": auth.user_id if auth else None}

    return app


def test_flask_refuses_a_cookie_post_from_another_origin(harness: Harness, db_url: str) -> None:
    served: list[str] = []
    app = flask_app(db_url, served, CLERK_AUTHORIZED_PARTIES=AZP)
    cookie = {"Cookie": f"__session={token('user_c')}"}
    with running_wsgi(app) as url, httpx.Client(base_url=url) as client:
        for headers in ({"Origin": EVIL}, {"Referer": f"{EVIL}/pay"}, {}):
            r = client.post("/transfer", headers={**cookie, **headers})
            assert (r.status_code, r.json()["error"]) == (403, "cross_site_request"), headers
        assert served == []
        assert client.post("/transfer", headers={**cookie, "Origin": AZP}).json() == {"user": "user_c"}
        assert client.post("/transfer", headers={**bearer(token("user_c")), "Origin": EVIL}).status_code == 200
        r = client.post("/newsletter", headers={**cookie, "Origin": EVIL})
        assert (r.status_code, r.json()) == (200, {"user": None})
    app.extensions["clerk_sync"].close()
    own = flask_app(db_url, served)  # no CLERK_AUTHORIZED_PARTIES: this site's own origin only
    with running_wsgi(own) as url, httpx.Client(base_url=url) as client:
        assert client.post("/transfer", headers={**cookie, "Origin": url}).status_code == 200
        assert client.post("/transfer", headers={**cookie, "Origin": AZP}).status_code == 403
    own.extensions["clerk_sync"].close()
    assert served == ["user_c", "user_c", "user_c"]


def test_the_starlette_backend_refuses_a_cross_site_cookie_post(harness: Harness) -> None:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.authentication import AuthenticationMiddleware
    from starlette.requests import Request as StarletteRequest
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from clerk_sync.integrations.asgi import ClerkAuthBackend

    async def whoami(request: StarletteRequest) -> PlainTextResponse:
        return PlainTextResponse(request.user.display_name if request.user.is_authenticated else "anonymous")

    app = Starlette(routes=[Route("/", whoami, methods=["GET", "POST"])],
                    middleware=[Middleware(AuthenticationMiddleware, backend=ClerkAuthBackend(harness.auth))])
    cookie = {"Cookie": f"__session={token('user_c')}"}
    with running(app) as url, httpx.Client(base_url=url) as client:
        r = client.post("/", headers={**cookie, "Origin": EVIL})
        assert (r.status_code, r.text) == (400, "cross_site_request")  # Starlette's on_error answer
        assert client.post("/", headers={**cookie, "Origin": AZP}).text == "user_c"
        assert client.get("/", headers={**cookie, "Origin": EVIL}).text == "user_c"


def test_flask_refuses_a_cookie_websocket_handshake_from_another_origin(harness: Harness, db_url: str) -> None:
    """As ASGI's faces do: a handshake is a GET, which the POST rule lets through, so a page on another site
    could open the socket with the visitor's cookie (cross-site websocket hijacking). flask-sock and
    simple-websocket serve handshakes through Flask's routing (a ``websocket=True`` rule) and its guards."""
    served: list[str] = []
    app = flask_app(db_url, served, CLERK_AUTHORIZED_PARTIES=AZP)

    @app.route("/socket", websocket=True)
    @clerk_login_required
    def socket() -> dict[str, Any]:  # where flask-sock would upgrade the connection
        served.append(current_clerk.user_id)
        return {"user": current_clerk.user_id}

    handshake = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                 "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    cookie = {"Cookie": f"__session={token('user_c')}"}
    with running_wsgi(app) as url, httpx.Client(base_url=url) as client:
        r = client.get("/socket", headers={**handshake, **cookie, "Origin": EVIL})
        assert (r.status_code, r.json()["error"]) == (403, "cross_site_request"), r.text
        assert "WEBSOCKET" in r.json()["message"] and EVIL in r.json()["message"]
        assert served == []
        assert client.get("/socket", headers={**handshake, **cookie, "Origin": AZP}).json() == {"user": "user_c"}
        # Bearer: no ambient credential; no Origin: no browser sent it (as the ASGI faces judge both)
        assert client.get("/socket", headers={**handshake, **bearer(token("user_c")), "Origin": EVIL}).status_code == 200
        assert client.get("/socket", headers={**handshake, **cookie}).status_code == 200
    app.extensions["clerk_sync"].close()
    assert served == ["user_c", "user_c", "user_c"]
