"""Authentication outcomes on /metrics: every face (FastAPI, Starlette's backend, Flask) counts a request once,
in the app's registry: accepted in ``clerk_sync_auth_authenticated_total``, refused in
``clerk_sync_auth_refused_total{code}`` under the error's code (a token from a host clock's future under the clock's
code), an anonymous request in neither; JWKS fetches by outcome. Real tokens from an emulator whose clock a test
moves, real servers on loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import Depends, FastAPI
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.authentication import requires
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from clerk_sync.auth import Authenticator, DenyList, verifier_from_settings
from clerk_sync.auth.claims import Auth
from clerk_sync.config import Settings
from clerk_sync.errors import TokenKeysUnavailable
from clerk_sync.integrations.asgi import ClerkAuthBackend, ClerkAuthMiddleware
from clerk_sync.integrations.fastapi import ClerkAuth
from clerk_sync.integrations.flask import ClerkSync, clerk_login_required, clerk_state, current_clerk, optional_clerk
from clerk_sync.integrations.flask import current_user as flask_current_user
from clerk_sync.integrations.starlette import build_processor
from clerk_sync.metrics import AUTH_REFUSAL_CODES, JWKS_FETCH_OUTCOMES, Metrics
from clerk_sync.testing import EmulatorServer
from tests._flask import running_wsgi
from tests._server import running

AUTHENTICATED = "clerk_sync_auth_authenticated_total"
REFUSED = "clerk_sync_auth_refused_total"
JWKS = "clerk_sync_jwks_fetches_total"
STRANGER = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def counts(metrics: Metrics) -> dict[str, float]:
    """The authentication series of one registry: ``authenticated``, each refusal code, ``jwks:<outcome>``."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name == AUTHENTICATED:
                found["authenticated"] = s.value
            elif s.name == REFUSED and s.value:
                found[s.labels["code"]] = s.value
            elif s.name == JWKS and s.value:
                found["jwks:" + s.labels["outcome"]] = s.value
    return found


@dataclass
class Clerk:
    """An emulator whose clock the test moves (``skew_s``: how far Clerk's clock is from this host's)."""

    server: EmulatorServer
    skew: list[float]

    def token(self, skew_s: float = 0.0) -> str:
        self.skew[0] = skew_s
        try:
            return self.server.mint_session_token(self.server.create_user(f"u{time.monotonic_ns()}@example.com")["id"])
        finally:
            self.skew[0] = 0.0

    def settings(self, db_url: str) -> Settings:
        return Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": self.server.webhook_secret,
                                  "CLERK_SECRET_KEY": self.server.secret_key, "CLERK_API_URL": self.server.url,
                                  "CLERK_ISSUER": self.server.url})


@pytest.fixture(scope="module")
def clerk() -> Iterator[Clerk]:
    skew = [0.0]
    with EmulatorServer(clock=lambda: time.time() + skew[0]) as server:
        yield Clerk(server, skew)


def stranger_token() -> str:
    """Signed by a key no JWKS holds (a kid the instance never published): refused as token_key_unknown."""
    now = int(time.time())
    claims = {"sub": "user_x", "sid": "sess_x", "iat": now, "nbf": now - 5, "exp": now + 60}
    return jwt.encode(claims, STRANGER, algorithm="RS256", headers={"kid": "ins_stranger"})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- FastAPI: the middleware, then the dependencies ------------------------------------------------------------

@pytest.fixture
def fastapi_app(clerk: Clerk, sqlite_url: str) -> Iterator[tuple[httpx.Client, Metrics]]:
    settings = clerk.settings(sqlite_url)
    processor = build_processor(settings)
    authenticator = Authenticator(verifier_from_settings(settings), processor.store,
                                  deny_list=DenyList(processor.store, refresh_s=0), metrics=processor.metrics)
    auth = ClerkAuth(authenticator)
    app = FastAPI()
    auth.install(app, public_paths={"/", "/open"})

    @app.get("/")
    def home() -> dict[str, str]:
        return {"page": "public"}

    @app.get("/me")
    async def me(a: Auth = Depends(auth.current_auth), again: Auth = Depends(auth.not_impersonated)) -> dict[str, str]:
        return {"user": a.user_id}

    @app.get("/open")  # public, yet a dependency asks for the session: the middleware's verdict, not a second one
    async def open_page(a: Auth = Depends(auth.current_auth)) -> dict[str, str]:
        return {"user": a.user_id}

    with running(app) as url, httpx.Client(base_url=url) as client:
        yield client, processor.metrics
    processor.store.dispose()


def test_fastapi_counts_an_accepted_request_once_through_the_middleware_and_its_dependencies(
        clerk: Clerk, fastapi_app: tuple[httpx.Client, Metrics]) -> None:
    client, metrics = fastapi_app
    assert client.get("/me", headers=bearer(clerk.token())).status_code == 200
    assert counts(metrics) == {"authenticated": 1, "jwks:ok": 1}
    assert client.get("/").status_code == 200  # anonymous: counted in neither series
    assert counts(metrics) == {"authenticated": 1, "jwks:ok": 1}


def test_fastapi_counts_a_refused_request_once_under_its_code_on_a_protected_and_a_public_path(
        clerk: Clerk, fastapi_app: tuple[httpx.Client, Metrics]) -> None:
    client, metrics = fastapi_app
    refused = client.get("/me", headers=bearer(clerk.token(skew_s=-200)))  # Clerk's clock 200 s behind: expired
    assert refused.status_code == 401 and refused.json()["error"] == "token_expired"
    assert counts(metrics) == {"authenticated": 0, "token_expired": 1, "jwks:ok": 1}
    # A public path: the middleware serves it as anonymous, the route's dependency answers its refusal (not
    # verified, nor counted, a second time)
    future = client.get("/open", headers=bearer(clerk.token(skew_s=120)))  # this host's clock 120 s behind Clerk's
    assert future.status_code == 401 and future.json()["error"] == "token_not_active_yet"
    assert counts(metrics) == {"authenticated": 0, "token_expired": 1, "token_not_active_yet": 1, "jwks:ok": 1}


def test_fastapi_counts_a_token_of_a_key_no_jwks_holds_as_key_unknown(
        clerk: Clerk, fastapi_app: tuple[httpx.Client, Metrics]) -> None:
    client, metrics = fastapi_app
    assert client.get("/me", headers=bearer(clerk.token())).status_code == 200  # the first fetch
    answer = client.get("/me", headers=bearer(stranger_token()))
    assert answer.status_code == 401 and answer.json()["error"] == "token_key_unknown"
    # (no refetch for its kid: the last fetch is within CLERK_SYNC_JWKS_MIN_REFETCH_S)
    assert counts(metrics) == {"authenticated": 1, "token_key_unknown": 1, "jwks:ok": 1}


def test_an_unreachable_jwks_counts_the_fetch_and_the_refusal(sqlite_url: str) -> None:
    """No JWKS at all (the URL answers nothing): each request is refused 503 ``token_keys_unavailable``."""
    settings = Settings.from_env({"DATABASE_URL": sqlite_url, "CLERK_JWKS_URL": "http://127.0.0.1:9/jwks"})
    processor = build_processor(Settings.from_env({"DATABASE_URL": sqlite_url, "CLERK_WEBHOOK_SIGNING_SECRET":
                                                   "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}))
    authenticator = Authenticator(verifier_from_settings(settings), processor.store, metrics=processor.metrics)
    with pytest.raises(TokenKeysUnavailable, match="no signing keys yet"):
        authenticator.authenticate({"authorization": f"Bearer {stranger_token()}"}, {})
    assert counts(processor.metrics) == {"authenticated": 0, "token_keys_unavailable": 1, "jwks:unreachable": 1}
    processor.store.dispose()


# -- Starlette: ClerkAuthBackend, alone and inside ClerkAuthMiddleware -------------------------------------------

async def whoami(request: Request) -> JSONResponse:
    return JSONResponse({"user": request.user.display_name if request.user.is_authenticated else None})


@pytest.mark.parametrize("outer_middleware", [False, True], ids=["backend", "middleware-then-backend"])
def test_starlette_counts_a_request_once_whether_one_or_two_layers_check_it(
        clerk: Clerk, sqlite_url: str, outer_middleware: bool) -> None:
    settings = clerk.settings(sqlite_url)
    processor = build_processor(settings)
    authenticator = Authenticator(verifier_from_settings(settings), processor.store,
                                  deny_list=DenyList(processor.store, refresh_s=0), metrics=processor.metrics)
    layers = [Middleware(ClerkAuthMiddleware, authenticator=authenticator, public_paths={"/open"})] \
        if outer_middleware else []
    layers.append(Middleware(AuthenticationMiddleware, backend=ClerkAuthBackend(authenticator),
                             on_error=ClerkAuthBackend.on_error))
    app = Starlette(routes=[Route("/me", requires("authenticated")(whoami)), Route("/open", whoami)],
                    middleware=layers)
    with running(app) as url, httpx.Client(base_url=url) as client:
        assert client.get("/me", headers=bearer(clerk.token())).status_code == 200
        refused = client.get("/open", headers=bearer(clerk.token(skew_s=120)))
        assert refused.status_code == 401 and refused.json()["error"] == "token_not_active_yet"
        assert client.get("/open").status_code == 200  # anonymous
    assert counts(processor.metrics) == {"authenticated": 1, "token_not_active_yet": 1, "jwks:ok": 1}
    processor.store.dispose()


# -- Flask: deny_by_default, optional_clerk and current_user in one request -------------------------------------

def test_flask_counts_a_request_once_however_many_times_the_view_asks(clerk: Clerk, sqlite_url: str) -> None:
    app = Flask(__name__)
    app.config["CLERK_SYNC"] = {"DATABASE_URL": sqlite_url, "CLERK_WEBHOOK_SIGNING_SECRET": clerk.server.webhook_secret,
                                "CLERK_SECRET_KEY": clerk.server.secret_key, "CLERK_API_URL": clerk.server.url,
                                "CLERK_ISSUER": clerk.server.url}
    ClerkSync(app, deny_by_default=True, revocation_refresh_s=0, public_endpoints={"open_page"}, jit=False)

    @app.get("/me")
    @clerk_login_required
    def me() -> dict[str, Any]:
        return {"user": current_clerk.user_id, "again": current_clerk.user_id}

    @app.get("/open")
    def open_page() -> dict[str, Any]:  # public: asks three times (the session, the user row, the session again)
        first, row, again = optional_clerk(), flask_current_user, optional_clerk()
        return {"user": first.user_id if first else None, "signed_in": bool(row), "again": again is not None}

    state = clerk_state(app)
    assert state.processor is not None
    try:
        with running_wsgi(app) as url, httpx.Client(base_url=url) as client:
            assert client.get("/me", headers=bearer(clerk.token())).status_code == 200
            refused = client.get("/me", headers=bearer(clerk.token(skew_s=-200)))
            assert refused.status_code == 401 and refused.json()["error"] == "token_expired"
            answer = client.get("/open", headers=bearer(clerk.token(skew_s=120)))
            assert answer.json() == {"user": None, "signed_in": False, "again": False}
            assert client.get("/open").status_code == 200
        assert counts(state.processor.metrics) == {"authenticated": 1, "token_expired": 1, "token_not_active_yet": 1,
                                                   "jwks:ok": 1}
    finally:
        state.close()


# -- the series themselves ---------------------------------------------------------------------------------------

def test_the_series_exist_at_zero_with_bounded_labels_in_every_registry() -> None:
    """Every registry has them from the start (an alert's ratio has both sides, a scrape of ``serve`` shows
    them); a code no refusal carries is counted as ``other``, so nothing a client sends grows the label set."""
    metrics = Metrics()
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert families["clerk_sync_auth_authenticated"].type == "counter"
    assert families["clerk_sync_auth_refused"].type == "counter"
    assert families["clerk_sync_jwks_fetches"].type == "counter"
    codes = {s.labels["code"] for s in families["clerk_sync_auth_refused"].samples if s.name == REFUSED}
    assert codes == set(AUTH_REFUSAL_CODES)
    assert {"token_expired", "token_not_active_yet", "token_iat_in_the_future", "token_key_unknown",
            "token_keys_unavailable", "token_signature_invalid", "session_revoked", "session_user_banned",
            "user_locked", "user_deprovisioned", "token_invalid_authorized_parties", "other"} <= codes
    assert "token_missing" not in codes
    outcomes = {s.labels["outcome"] for s in families["clerk_sync_jwks_fetches"].samples if s.name == JWKS}
    assert outcomes == set(JWKS_FETCH_OUTCOMES)
    metrics.auth_refused("made_up_by_a_subclass")
    assert counts(metrics) == {"authenticated": 0, "other": 1}
