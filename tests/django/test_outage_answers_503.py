"""The Django face during an outage.

1. An outage is no sign-out. With ``ClerkBackend`` and ``ClerkMiddleware``, a request carrying a valid Clerk
   session while clerk-sync's database (or Clerk, during just-in-time sync) is down got ``AnonymousUser`` as
   ``request.user``: ``login_required`` sent the signed-in user to the sign-in page (with Clerk, a redirect loop)
   and pages rendered as signed out. Now ``request.user`` raises ``ClerkUserUnavailable`` and the request ends as
   a 503 with ``Retry-After``, whichever way Django reaches the user (a view, ``await request.auser()``, a
   template's ``{{ user }}``, ``LoginRequiredMiddleware``). Real signed session tokens from the emulator, the
   real SQLite, PostgreSQL and MariaDB; the outage is clerk-sync's engine pointed at a database that cannot be
   reached (a closed loopback port, a SQLite file in a directory that does not exist) while Django's own
   database stays up.
2. ``reset_clerk_sync`` closes the async Clerk client outside the runtime's lock: the close runs on the
   server's event loop, which may need that lock first.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
from django.contrib.auth import authenticate
from django.contrib.auth.decorators import login_not_required, login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template import engines
from django.template.response import TemplateResponse
from django.test import Client, RequestFactory, override_settings
from django.urls import path

from clerk_sync.config import Settings
from clerk_sync.errors import StoreError
from clerk_sync.integrations.django import runtime
from clerk_sync.integrations.django.conf import DjangoOptions
from clerk_sync.integrations.django.middleware import ClerkMiddleware, clerk_public
from clerk_sync.integrations.django.request import ClerkUserUnavailable, clerk_request
from clerk_sync.integrations.django.runtime import ClerkSync, get_clerk_sync, reset_clerk_sync
from clerk_sync.tables import users
from clerk_sync.testing import EmulatorServer
from tests._server import unreachable_engine
from tests.django.conftest import World, bearer, world_for
from tests.django.urls import urlpatterns as test_urls

# -- the views: plain Django, as an app writes them ----------------------------------------------------------

#: ``request.user`` as each view saw it: (view, is_authenticated). An outage must never add a True.
SEEN: list[tuple[str, bool]] = []
_PAGE = "Hello {{ user }}{% if user.is_authenticated %} (signed in){% else %} (signed out){% endif %}"


@login_required
def login_required_view(request: HttpRequest) -> JsonResponse:
    SEEN.append(("login_required", request.user.is_authenticated))
    return JsonResponse({"username": request.user.get_username()})


@login_required
async def async_login_required_view(request: HttpRequest) -> JsonResponse:
    user = await request.auser()
    SEEN.append(("async_login_required", user.is_authenticated))
    return JsonResponse({"username": user.get_username()})


@login_not_required
def signed_in_or_out(request: HttpRequest) -> JsonResponse:
    """A public page that shows who is signed in."""
    SEEN.append(("signed_in_or_out", request.user.is_authenticated))
    return JsonResponse({"signed_in": request.user.is_authenticated})


@clerk_public
@login_not_required
def public(request: HttpRequest) -> JsonResponse:
    """Never reads ``request.user``."""
    return JsonResponse({"public": True})


@login_not_required
def template_response(request: HttpRequest) -> TemplateResponse:
    """Rendered by Django after the view returned (``response.render()`` in the handler)."""
    return TemplateResponse(request, engines["django"].from_string(_PAGE))


@login_not_required
def rendered_in_view(request: HttpRequest) -> HttpResponse:
    return HttpResponse(engines["django"].from_string(_PAGE).render(request=request))


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """This module's ``handler404``: a page that shows who is signed in, as a site's error pages often do."""
    return HttpResponse(engines["django"].from_string(_PAGE).render(request=request), status=404)


handler404 = not_found
urlpatterns = [
    *test_urls,  # the webhook endpoint (the emulator's deliveries) and the guards' test views
    path("r4/login-required", login_required_view),
    path("r4/async-login-required", async_login_required_view),
    path("r4/signed-in-or-out", signed_in_or_out),
    path("r4/public", public),
    path("r4/template-response", template_response),
    path("r4/rendered-in-view", rendered_in_view),
]

BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
LOGIN_REQUIRED_MIDDLEWARE = "django.contrib.auth.middleware.LoginRequiredMiddleware"


@pytest.fixture(autouse=True)
def _seen() -> Iterator[None]:
    SEEN.clear()
    yield
    SEEN.clear()


@contextmanager
def outage_world(db_url: str, transport: str, **settings: Any) -> Iterator[World]:
    """A plain Django project on this module's routes: ``ClerkBackend`` and ``ClerkMiddleware`` as in the example
    project, no ``REQUIRE_AUTH`` (so that nothing but the views decide)."""
    with override_settings(ROOT_URLCONF=__name__), \
            world_for(db_url, transport, REQUIRE_AUTH=False, **settings) as world:
        yield world



@contextmanager
def clerk_sync_db_down(db_url: str, tmp_path: Path) -> Iterator[None]:
    """clerk-sync's database unreachable for the running runtime (its store's engine now points at nothing),
    Django's own database still up; back up afterwards."""
    store = get_clerk_sync().store
    up = store.engine
    store.engine = unreachable_engine(db_url, tmp_path)
    try:
        with pytest.raises(StoreError):  # really down
            store.ping()
        yield
    finally:
        store.engine.dispose()
        store.engine = up


def _assert_unavailable(response: Any, *, error: str = "store_unavailable", json: bool = True,
                        guard: bool = False) -> None:
    """A 503 to retry; ``guard``: answered by a clerk-sync guard (the error table's message), else for
    ``request.user``."""
    assert response.status_code == 503, (response.status_code, _text(response))
    assert int(response.headers["Retry-After"]) >= 1
    if json:
        body = response.json()
        assert body["error"] == error, body
        assert "unavailable" in body["message"] and "retry" in body["message"]
        if error == "store_unavailable" and not guard:
            assert body["message"].startswith("the auth database is unavailable")
    else:
        assert response.headers["Content-Type"].startswith("text/plain")
        assert _text(response).startswith("Service unavailable: the auth database is unavailable")


def _text(response: Any) -> str:
    content = getattr(response, "content", b"")
    return content.decode() if isinstance(content, bytes) else str(content)


def _get(world: World, url: str, headers: dict[str, str] | None = None) -> Any:
    """GET without following redirects, on Django's test client or over HTTP."""
    if isinstance(world.app, Client):
        return world.app.get(url, headers=headers or {})
    return world.app.get(url, headers=headers or {}, follow_redirects=False)


def _signed_in(world: World, email: str) -> dict[str, str]:
    """A user synced by the webhook, whose session works while the database is up (its Django user made)."""
    user = world.clerk.create_user(email)
    world.clerk.wait_for_deliveries()
    tok = bearer(world.clerk.mint_session_token(user["id"]))
    assert _get(world, "/r4/login-required", tok).json() == {"username": user["id"]}
    return tok


def _unavailable_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line["event"] == "django_user_unavailable"]


# -- 1. the session cannot be checked (the deny list is read on every request here) ----------------------------


@pytest.mark.parametrize("transport", ["test-client", "wsgi", "asgi"])
def test_database_down_a_signed_in_user_gets_503_not_the_sign_in_page(db_url: str, transport: str,
                                                                        tmp_path: Path) -> None:
    with outage_world(db_url, transport) as world:
        tok = _signed_in(world, "ada@example.com")
        SEEN.clear()
        with clerk_sync_db_down(db_url, tmp_path), structlog.testing.capture_logs() as lines:
            _assert_unavailable(_get(world, "/r4/login-required", tok))  # was: 302 to the sign-in page
            _assert_unavailable(_get(world, "/r4/async-login-required", tok))  # await request.auser()
            _assert_unavailable(_get(world, "/r4/signed-in-or-out", tok))  # was: rendered as signed out
            _assert_unavailable(_get(world, "/r4/template-response", tok))  # {{ user }} after the view returned
            _assert_unavailable(_get(world, "/r4/rendered-in-view", tok))
            _assert_unavailable(_get(world, "/r4/login-required", {**tok, **BROWSER}), json=False)
            # the guards and DRF classes answered 503 already: still
            for guarded in ("/t/async/me", "/t/cbv/me", "/t/drf/admin", "/t/drf/django-authenticated"):
                _assert_unavailable(_get(world, guarded, tok), guard=True)
            # unchanged: a public view that never reads request.user, and requests without a (valid) session
            assert _get(world, "/r4/public", tok).json() == {"public": True}
            for anonymous in ({}, bearer("not.a.token")):
                refused = _get(world, "/r4/login-required", anonymous)
                assert refused.status_code == 302
                assert refused.headers["Location"].startswith("/accounts/login/?next=")
                assert _get(world, "/r4/signed-in-or-out", anonymous).json() == {"signed_in": False}
                assert _get(world, "/r4/public", anonymous).json() == {"public": True}
        unavailable = _unavailable_lines(lines)
        assert len(unavailable) == 6  # one line per request that read request.user (the guards answer before)
        assert {line["error"] for line in unavailable} == {"store_unavailable"}
        assert {line["log_level"] for line in unavailable} == {"warning"}
        assert ("signed_in_or_out", True) not in SEEN and ("login_required", True) not in SEEN
        assert SEEN == [("signed_in_or_out", False)] * 2  # the two requests without a valid session
        # back up: the same session is signed in again
        assert _get(world, "/r4/login-required", tok).status_code == 200


# -- 2. the session checked (deny list fresh), its users row unreadable ---------------------------------------


@pytest.mark.parametrize("transport", ["test-client", "asgi"])
def test_database_down_while_reading_the_users_row_answers_503(db_url: str, transport: str,
                                                                tmp_path: Path) -> None:
    with outage_world(db_url, transport, DENY_LIST_REFRESH_S=3600) as world:
        tok = _signed_in(world, "ada@example.com")  # (loads the deny list while the database is up)
        SEEN.clear()
        with clerk_sync_db_down(db_url, tmp_path), structlog.testing.capture_logs() as lines:
            _assert_unavailable(_get(world, "/r4/login-required", tok))
            _assert_unavailable(_get(world, "/r4/async-login-required", tok))
            _assert_unavailable(_get(world, "/r4/template-response", tok))
            _assert_unavailable(_get(world, "/r4/signed-in-or-out", {**tok, **BROWSER}), json=False)
            _assert_unavailable(_get(world, "/t/drf/admin", tok), guard=True)
            assert _get(world, "/r4/public", tok).json() == {"public": True}
            assert _get(world, "/r4/login-required").status_code == 302
        unavailable = _unavailable_lines(lines)
        assert len(unavailable) == 4 and all(line["clerk_id"].startswith("user_") for line in unavailable)
        assert SEEN == []


def test_the_outage_is_resolved_once_per_request_and_nobody_is_authenticated(db_url: str, tmp_path: Path) -> None:
    """Every read of ``request.user`` (and ``auser()``) in the request raises the same error without another try
    at the database, and Django's own ``authenticate()`` authenticates nobody either."""
    with outage_world(db_url, "test-client") as world:
        _resolved_once(world, db_url, tmp_path)


def _resolved_once(world: World, db_url: str, tmp_path: Path) -> None:
    tok = _signed_in(world, "ada@example.com")
    request = RequestFactory().get("/r4/public", headers=tok)
    seen: dict[str, Any] = {}

    def view(request: HttpRequest) -> HttpResponse:
        for attempt in range(3):
            with pytest.raises(ClerkUserUnavailable) as raised:
                _ = request.user.is_authenticated
            seen[f"user{attempt}"] = raised.value
        with pytest.raises(ClerkUserUnavailable) as raised:
            asyncio.run(request.auser())
        seen["auser"] = raised.value
        with pytest.raises(ClerkUserUnavailable):
            authenticate(request, clerk_request=clerk_request(request))
        return HttpResponse("view ran")

    with clerk_sync_db_down(db_url, tmp_path), structlog.testing.capture_logs() as lines:
        from django.contrib.auth.middleware import AuthenticationMiddleware
        from django.contrib.sessions.middleware import SessionMiddleware

        handler = SessionMiddleware(AuthenticationMiddleware(ClerkMiddleware(view)))
        assert _text(handler(request)) == "view ran"
    errors = {id(e) for e in seen.values()}
    assert len(errors) == 1  # the same exception each time: resolved once
    assert isinstance(seen["user0"].error, StoreError)
    assert len(_unavailable_lines(lines)) == 1


def test_banned_deleted_and_not_synced_users_keep_their_answers(db_url: str) -> None:
    """No outage: the refusals about the user stay ``AnonymousUser`` (the sign-in page), as before."""
    with outage_world(db_url, "test-client", JIT=False) as world:
        clerk = world.clerk
        late, banned, gone = (clerk.create_user(f"{name}@example.com") for name in ("late", "banned", "gone"))
        clerk.wait_for_deliveries()
        tokens = {user["id"]: bearer(clerk.mint_session_token(user["id"])) for user in (late, banned, gone)}
        for tok in tokens.values():
            assert _get(world, "/r4/login-required", tok).status_code == 200
        with world.store.transaction() as w:  # late's webhook "not arrived yet" (JIT is off)
            w.conn.execute(users.delete().where(users.c.clerk_id == late["id"]))
        clerk.request("POST", f"/v1/users/{banned['id']}/ban")
        clerk.request("DELETE", f"/v1/users/{gone['id']}")
        clerk.wait_for_deliveries()
        SEEN.clear()
        with structlog.testing.capture_logs() as lines:
            for tok in tokens.values():
                assert _get(world, "/r4/login-required", tok).status_code == 302
                assert _get(world, "/r4/signed-in-or-out", tok).json() == {"signed_in": False}
        assert _unavailable_lines(lines) == []
        assert SEEN == [("signed_in_or_out", False)] * 3


# -- 3. Clerk down during just-in-time sync -------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["test-client", "asgi"])
def test_clerk_down_during_jit_sync_answers_503_with_its_retry_after(db_url: str, transport: str) -> None:
    with outage_world(db_url, transport) as world:
        clerk = world.clerk
        _signed_in(world, "ada@example.com")  # the JWKS fetched while Clerk is up
        SEEN.clear()
        clerk.set_webhook_url(None)  # a new user whose webhook has not arrived: JIT fetches them from Clerk
        new = clerk.create_user("new@example.com")
        tok = bearer(clerk.mint_session_token(new["id"]))
        clerk.set_faults(outage=True)
        try:
            with structlog.testing.capture_logs() as lines:
                _assert_unavailable(_get(world, "/r4/login-required", tok), error="clerk_unavailable")
                assert _get(world, "/r4/public", tok).json() == {"public": True}
        finally:
            clerk.set_faults(outage=False)
        assert [line["error"] for line in _unavailable_lines(lines)] == ["clerk_unavailable"]
        assert SEEN == []


# -- 4. where Django calls no process_exception -------------------------------------------------------------


@pytest.mark.parametrize("transport", ["test-client", "wsgi", "asgi"])
def test_login_required_middleware_answers_503_too(db_url: str, transport: str, tmp_path: Path) -> None:
    """``LoginRequiredMiddleware`` reads ``request.user`` in ``process_view``, where an exception is not given to
    ``process_exception``: Django makes it a 500, which ClerkMiddleware answers as the 503. It reads the user
    before it looks at the view (Django 5), so a ``login_not_required`` view answers 503 too to a request with a
    session (and as before to one without). Django 6 (Python 3.12+) looks at the view first: a public view then
    never reads the user and answers 200 through the outage (a Python 3.13 run of the suite)."""
    import django
    from django.conf import settings

    middleware = [*settings.MIDDLEWARE, LOGIN_REQUIRED_MIDDLEWARE]
    with override_settings(MIDDLEWARE=middleware), outage_world(db_url, transport) as world:
        if isinstance(world.app, Client):
            world.app = Client(raise_request_exception=False)  # a server answers the 500, the test client raises
        tok = _signed_in(world, "ada@example.com")
        SEEN.clear()
        with clerk_sync_db_down(db_url, tmp_path):
            _assert_unavailable(_get(world, "/t/invoices", tok))  # any view but a login_not_required one
            _assert_unavailable(_get(world, "/r4/login-required", {**tok, **BROWSER}), json=False)
            if django.VERSION < (6,):
                _assert_unavailable(_get(world, "/r4/public", tok))  # LoginRequiredMiddleware read request.user
            else:  # the view is login_not_required: the user is never read
                assert _get(world, "/r4/public", tok).json() == {"public": True}
            assert _get(world, "/r4/public").json() == {"public": True}
            refused = _get(world, "/t/invoices")
            assert refused.status_code == 302 and refused.headers["Location"].startswith("/accounts/login/")
        assert SEEN == []


@pytest.mark.parametrize("transport", ["test-client", "asgi"])
def test_an_error_page_that_shows_the_user_answers_503_too(db_url: str, transport: str, tmp_path: Path) -> None:
    """A ``handler404`` rendering ``{{ user }}``: Django renders error pages outside ``process_exception`` and makes
    the failure a 500, which ClerkMiddleware answers as the 503."""
    with outage_world(db_url, transport) as world:
        if isinstance(world.app, Client):
            world.app = Client(raise_request_exception=False)
        tok = _signed_in(world, "ada@example.com")
        assert _text(_get(world, "/r4/nowhere", tok)).startswith(f"Hello {_username(world, tok)} (signed in)")
        with clerk_sync_db_down(db_url, tmp_path):
            _assert_unavailable(_get(world, "/r4/nowhere", tok))
            missing = _get(world, "/r4/nowhere")
            assert (missing.status_code, _text(missing)) == (404, "Hello AnonymousUser (signed out)")


def _username(world: World, tok: dict[str, str]) -> str:
    username: str = _get(world, "/r4/login-required", tok).json()["username"]
    return username


# -- Task 2: reset_clerk_sync closes outside its lock -----------------------------------------------------------


@pytest.fixture
def server_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a thread of its own, as an ASGI server's."""
    from tests.django.test_runtime_close_async_client import _server_loop

    with _server_loop() as loop:
        yield loop


def test_reset_closes_the_async_client_without_holding_the_runtime_lock(
        server_loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed (untested until now): ``reset_clerk_sync`` closed the runtime while holding ``_lock``. The
    async Clerk client is closed on the server's loop, and the loop may need ``_lock`` first (an ASGI request's
    ``runtime.auser`` claims the client for its loop under it): the loop then stalled on the lock for
    ``_ACLOSE_WAIT_S`` while reset waited for it, and reset returned with the client not closed.

    Here the close, on the server's loop, first does what such a request does (``_aclerk_usable``, which takes
    ``_lock``). Outside the lock it finishes before ``reset_clerk_sync`` returns; held, it cannot, and reset gives
    up after the bounded ``_ACLOSE_WAIT_S`` (no sleep: events, and the runtime's own bounded wait)."""
    with EmulatorServer() as clerk:
        settings = Settings.from_env({"CLERK_SECRET_KEY": clerk.secret_key, "CLERK_API_URL": clerk.url,
                                      "DATABASE_URL": "sqlite:///:memory:"})
        parts = ClerkSync(settings, DjangoOptions())
        aclerk = parts.aclerk
        assert aclerk is not None

        async def claim() -> None:  # the first ASGI request with JIT sync: the client is this loop's
            assert parts._aclerk_usable()

        asyncio.run_coroutine_threadsafe(claim(), server_loop).result(30)
        original_aclose = aclerk.aclose
        took_lock, closed = threading.Event(), threading.Event()

        async def aclose_needing_the_lock() -> None:
            assert threading.current_thread() is not threading.main_thread()  # on the server's loop
            assert parts._aclerk_usable()  # takes runtime._lock: blocks the loop while reset holds it
            took_lock.set()
            await original_aclose()
            closed.set()

        monkeypatch.setattr(aclerk, "aclose", aclose_needing_the_lock)
        monkeypatch.setattr(runtime, "_current", [parts])
        try:
            reset_clerk_sync()
            assert took_lock.is_set(), "the close on the server's loop could not take the runtime's lock"
            assert closed.is_set() and aclerk._http.is_closed
            assert runtime._current == []
        finally:
            # (with the old behaviour the close finishes on the loop once reset let go of the lock)
            assert closed.wait(30)
            parts.close()


def test_a_user_row_refused_for_good_is_no_outage() -> None:
    """Fixed: ``StoreDataError`` (the database refused a value for good, e.g. the app's mapped
    table refuses a just-in-time user row) is a ``StoreError`` too, and was answered "unavailable, retry in
    5 s" on every request for ever. No retry heals it: the session has no usable user (as for a user not
    synced), and the outage answer is kept for what passes."""
    from types import SimpleNamespace

    from clerk_sync.errors import StoreDataError
    from clerk_sync.integrations.django.backends import ClerkBackend
    from clerk_sync.integrations.django.request import ClerkRequest, is_outage

    refused = StoreDataError("people refused user.created for user_1: NOT NULL column 'dept'; fix the table")
    assert not is_outage(refused) and is_outage(StoreError("database down"))

    class Runtime:
        options = SimpleNamespace()

        def user(self, auth: Any) -> Any:
            raise refused

        def naming_database(self, error: Any) -> Any:  # (ClerkSync's: a missing table names the database)
            return error

    state = ClerkRequest(Runtime(), SimpleNamespace(user_id="user_1"))  # type: ignore[arg-type]
    assert ClerkBackend().authenticate(None, clerk_request=state) is None
