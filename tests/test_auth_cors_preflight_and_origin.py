"""Auth at the CORS preflight and without a request method.

1. A browser's CORS preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) never
   carries the session (Fetch; MDN: "the preflight request does not include credentials"), yet
   ``ClerkAuthMiddleware`` answers it 401 on every protected path: the CORS layer must sit outside it. A
   fix that let preflights through to a CORS layer inside ran the app's routes
   for any client sending a preflight's headers, so the 401 stays, now saying where the CORS layer goes.
2. ``Authenticator.authenticate(headers, cookies)`` without ``method`` skipped the Origin check: a caller
   who forgot it served cookie-authenticated cross-site POSTs. Without a method, a session read from the
   ``__session`` cookie must now come with an allowed ``Origin`` whenever the request carries one.

Real servers on loopback, real tokens, Starlette's own ``CORSMiddleware``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse
from starlette.routing import Route

from clerk_sync.auth.authenticator import Authenticator, DenyList
from clerk_sync.auth.claims import ClaimsValidator
from clerk_sync.auth.jwks import StaticKeySource
from clerk_sync.auth.sessions import SessionVerifier
from clerk_sync.errors import CrossSiteRequest
from clerk_sync.integrations.asgi import ClerkAuthMiddleware
from clerk_sync.integrations.fastapi import ClerkAuth
from tests import factories as f
from tests._server import running
from tests.test_auth import Harness, bearer, token
from tests.test_sessions import AZP, ISS, KEY, pem

EVIL = "https://evil.example.test"
PARTNER = "https://partner.example.test"  # CORS lets its pages read answers; it is no CLERK_AUTHORIZED_PARTIES entry
pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # no database question here

CORS: dict[str, Any] = {"allow_origins": [AZP, PARTNER], "allow_methods": ["*"], "allow_headers": ["authorization", "content-type"],
        "allow_credentials": True}
PREFLIGHT = {"Origin": AZP, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


@pytest.fixture
def harness(db_url: str) -> Iterator[Harness]:
    h = Harness(db_url)
    h.event("user.created", f.user("user_p", 1))
    yield h
    h.store.dispose()


# --- 1. CORS preflights through ClerkAuthMiddleware -----------------------------------------------------------
def _starlette_routes(served: list[str]) -> list[Route]:
    async def export(request: StarletteRequest) -> JSONResponse:
        auth = request.scope["clerk_auth"]
        served.append(f"{request.method} {auth.user_id if auth else None}")
        return JSONResponse({"secret": "every customer", "user": auth.user_id if auth else None})

    async def hello(request: StarletteRequest) -> JSONResponse:
        served.append(f"{request.method} hello")
        return JSONResponse({"page": "public"})

    return [Route("/export", export, methods=["GET", "POST", "OPTIONS"]), Route("/hello", hello)]


def starlette_cors_inside(h: Harness, served: list[str]) -> Any:
    inner = Starlette(routes=_starlette_routes(served), middleware=[Middleware(CORSMiddleware, **CORS)])
    return ClerkAuthMiddleware(inner, h.auth, public_paths={"/hello"})


def starlette_cors_outside(h: Harness, served: list[str]) -> Any:
    inner = ClerkAuthMiddleware(Starlette(routes=_starlette_routes(served)), h.auth, public_paths={"/hello"})
    return CORSMiddleware(inner, **CORS)


def _fastapi(h: Harness, served: list[str], *, cors_inside: bool) -> FastAPI:
    clerk = ClerkAuth(h.auth)
    app = FastAPI()
    if cors_inside:  # added before install(): inside the deny-by-default middleware
        app.add_middleware(CORSMiddleware, **CORS)
    clerk.install(app, public_paths={"/hello"})
    if not cors_inside:
        app.add_middleware(CORSMiddleware, **CORS)

    @app.api_route("/export", methods=["GET", "POST"])
    async def export(request: Request) -> dict[str, Any]:
        auth = await clerk.current_auth(request)
        served.append(f"{request.method} {auth.user_id}")
        return {"secret": "every customer", "user": auth.user_id}

    return app


def fastapi_cors_inside(h: Harness, served: list[str]) -> Any:
    return _fastapi(h, served, cors_inside=True)


def fastapi_cors_outside(h: Harness, served: list[str]) -> Any:
    return _fastapi(h, served, cors_inside=False)


@pytest.mark.parametrize("build", [starlette_cors_outside, fastapi_cors_outside], ids=lambda b: b.__name__)
def test_a_browser_preflight_is_answered_by_the_cors_middleware_outside(
        harness: Harness, build: Callable[[Harness, list[str]], Any]) -> None:
    """CORS outside the deny-by-default middleware (FastAPI: added after ``install()``) answers the
    preflight; the real request after it is authenticated and origin-checked as any other."""
    served: list[str] = []
    with running(build(harness, served)) as url, httpx.Client(base_url=url) as client:
        answer = client.options("/export", headers=PREFLIGHT)
        assert answer.status_code == 200, answer.text
        assert answer.headers["access-control-allow-origin"] == AZP
        assert answer.headers["access-control-allow-credentials"] == "true"
        refused = client.options("/export", headers={**PREFLIGHT, "Origin": EVIL})
        assert (refused.status_code, refused.text) == (400, "Disallowed CORS origin")
        assert served == []  # no view ran for any of them
        anonymous = client.post("/export", headers={"Origin": AZP})
        assert (anonymous.status_code, anonymous.json()["error"]) == (401, "token_missing")
        assert client.post("/export", headers={**bearer(token("user_p")), "Origin": AZP}).json()["user"] == "user_p"
        cookie = {"Cookie": f"__session={token('user_p')}"}
        assert client.post("/export", headers={**cookie, "Origin": AZP}).json()["user"] == "user_p"
        for origin in (PARTNER, EVIL):  # CORS may let a page read answers: it is no licence to ride the cookie
            forged = client.post("/export", headers={**cookie, "Origin": origin})
            assert (forged.status_code, forged.json()["error"]) == (403, "cross_site_request"), origin
    assert served == ["POST user_p", "POST user_p"]


@pytest.mark.parametrize("build", [starlette_cors_inside, fastapi_cors_inside], ids=lambda b: b.__name__)
def test_a_preflight_reaching_the_middleware_is_refused_saying_where_cors_goes(
        harness: Harness, build: Callable[[Harness, list[str]], Any]) -> None:
    """Fixed: letting a preflight through to a CORS layer inside ran the app's routes for any client that
    sends a preflight's headers (a view taking OPTIONS, a mounted app ignoring the method). It is refused as
    any request without a session, and the message says what to change; public paths stay public."""
    served: list[str] = []
    with running(build(harness, served)) as url, httpx.Client(base_url=url) as client:
        answer = client.options("/export", headers=PREFLIGHT)
        assert (answer.status_code, answer.json()["error"]) == (401, "token_missing")
        assert "CORSMiddleware outside" in answer.json()["message"]
        assert client.options("/hello", headers=PREFLIGHT).status_code == 200  # public: the CORS layer answers
    assert served == []


@pytest.mark.parametrize("build", [starlette_cors_inside, fastapi_cors_inside], ids=lambda b: b.__name__)
def test_what_is_not_a_browser_preflight_keeps_todays_answer(
        harness: Harness, build: Callable[[Harness, list[str]], Any]) -> None:
    """A plain OPTIONS (no ``Access-Control-Request-Method``), one without ``Origin``, or one carrying a
    credential is an ordinary request: authenticated, refused without a valid session, with the usual message."""
    served: list[str] = []
    with running(build(harness, served)) as url, httpx.Client(base_url=url) as client:
        for headers in ({"Origin": AZP}, {}, {"Access-Control-Request-Method": "POST"},
                        {**PREFLIGHT, "Authorization": "Bearer garbage"},
                        {**PREFLIGHT, "Cookie": "__session=garbage"}):
            answer = client.options("/export", headers=headers)
            assert answer.status_code == 401, headers
            assert answer.json()["error"] in ("token_missing", "token_malformed"), headers
            assert "CORSMiddleware" not in answer.json()["message"], headers
        # with a valid session it is authenticated as any other request (the CORS middleware answers it)
        assert client.options("/export", headers={**PREFLIGHT, **bearer(token("user_p"))}).status_code == 200
    assert served == []


def test_a_faked_preflight_with_no_cors_layer_runs_no_view(harness: Harness) -> None:
    """Any client can send a preflight's headers: on a protected path no route runs for it (a view taking
    OPTIONS itself, the router's 404/405), so nothing is revealed or done."""
    served: list[str] = []
    app = ClerkAuthMiddleware(Starlette(routes=_starlette_routes(served)), harness.auth, public_paths={"/hello"})
    with running(app) as url, httpx.Client(base_url=url) as client:
        for path in ("/export", "/nowhere", "/export/"):
            answer = client.options(path, headers=PREFLIGHT)
            assert (answer.status_code, answer.json()["error"]) == (401, "token_missing"), path
            assert "every customer" not in answer.text
            assert answer.headers["www-authenticate"] == "Bearer"
        assert client.options("/hello", headers=PREFLIGHT).status_code == 405  # public: the router's own answer
    assert served == []


# --- 2. authenticate() without method ------------------------------------------------------------------------
def _cookie_session(user_id: str = "user_p") -> dict[str, str]:
    return {"__session": token(user_id)}


@pytest.mark.anyio
async def test_authenticate_without_a_method_checks_a_cookie_sessions_origin(harness: Harness) -> None:
    """Regression: ``authenticate(headers, cookies)`` served a cookie session whatever ``Origin`` sent it."""
    auth = harness.auth
    for check in (auth.authenticate, auth.aauthenticate):
        async def call(headers: dict[str, str], cookies: dict[str, str], check: Any = check) -> Any:
            result = check(headers, cookies)
            return (await result) if inspect.isawaitable(result) else result

        for origin in (EVIL, PARTNER, "null"):
            with pytest.raises(CrossSiteRequest, match="method="):
                await call({"origin": origin}, _cookie_session())
        # allowed: an authorized party's origin; no Origin at all (a link followed, a page typed in: browsers
        # send Origin on every cross-origin request but GET/HEAD navigations); Bearer (no ambient credential)
        assert (await call({"origin": AZP}, _cookie_session())).user_id == "user_p"
        assert (await call({}, _cookie_session())).user_id == "user_p"
        assert (await call({"referer": f"{EVIL}/page"}, _cookie_session())).user_id == "user_p"
        assert (await call({"origin": EVIL, "authorization": f"Bearer {token('user_p')}"}, {})).user_id == "user_p"


def test_with_a_method_the_rule_is_as_before(harness: Harness) -> None:
    auth = harness.auth
    assert auth.authenticate({"origin": EVIL}, _cookie_session(), method="GET").user_id == "user_p"
    with pytest.raises(CrossSiteRequest, match="neither Origin nor Referer"):
        auth.authenticate({}, _cookie_session(), method="POST")
    with pytest.raises(CrossSiteRequest):
        auth.authenticate({"referer": f"{EVIL}/page"}, _cookie_session(), method="DELETE")
    assert auth.authenticate({"origin": AZP}, _cookie_session(), method="POST").user_id == "user_p"


def test_without_authorized_parties_the_sites_own_origin_is_the_one_allowed(harness: Harness) -> None:
    verifier = SessionVerifier(StaticKeySource(pem(KEY)), ClaimsValidator(issuer=ISS))
    auth = Authenticator(verifier, harness.store, deny_list=DenyList(harness.store, refresh_s=0))
    own = {"host": "app.example.test", "origin": "https://app.example.test"}
    for scheme in ("https", "wss"):  # a websocket handshake's scheme names the same origin
        assert auth.authenticate(own, _cookie_session(), scheme=scheme).user_id == "user_p"
    with pytest.raises(CrossSiteRequest):
        auth.authenticate({**own, "origin": "https://evil.example.test"}, _cookie_session(), scheme="https")
    with pytest.raises(CrossSiteRequest):  # no scheme: this site's origin is unknown, nothing matches
        auth.authenticate(own, _cookie_session())
    assert auth.authenticate({"host": "app.example.test"}, _cookie_session()).user_id == "user_p"
