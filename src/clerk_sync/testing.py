"""Test helpers: run the Clerk emulator on a loopback port for the duration of a test.

Usage::

    from clerk_sync.testing import EmulatorServer

    with EmulatorServer(webhook_url="http://127.0.0.1:8000/webhooks/clerk") as clerk:
        user = clerk.create_user(email="ada@example.com", first_name="Ada")
        token = clerk.mint_session_token(user["id"])
        clerk.wait_for_deliveries()

The helpers go over HTTP, through the emulator's Backend API routes (the same path our code uses, so each change
sends the webhooks Clerk would): users, organizations and memberships, sessions and their tokens, and the changes
a test of revocation, banning or demotion needs (:meth:`EmulatorServer.revoke_session`,
:meth:`~EmulatorServer.ban_user`, :meth:`~EmulatorServer.update_user_metadata`,
:meth:`~EmulatorServer.update_membership`); :meth:`~EmulatorServer.session_id_of` reads a minted token's
session. ``.emulator`` gives in-process
access to the knobs (``clerk.emulator.faults.update({...})``) and state. The helpers' own requests are
not counted against the emulator's Backend API rate limit: that budget is the app's under test.
A refused helper request raises :class:`EmulatorRequestError`, with Clerk's reason.

:func:`serve_app` serves the app under test on a loopback port, so the emulator can deliver webhooks to it::

    with EmulatorServer() as clerk, serve_app(app) as app_url:
        clerk.set_webhook_url(f"{app_url}/webhooks/clerk")
"""

from __future__ import annotations

import base64
import binascii
import inspect
import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from types import TracebackType
from typing import Any, Literal
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import httpx
import uvicorn

from .emulator import Emulator, EmulatorConfig, create_app
from .emulator.endpoints import HELPER_HEADER
from .errors import ClerkAPIError

__all__ = ["EmulatorRequestError", "EmulatorServer", "serve_app"]

JSON = dict[str, Any]


def _bind_loopback(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


class EmulatorRequestError(ClerkAPIError, httpx.HTTPStatusError):
    """The emulator refused a helper's request; the message says why, as Clerk's error body did.

    A :class:`clerk_sync.errors.ClerkAPIError` (``status``, ``clerk_code``, ``trace_id``, ``method``, ``path``)
    with Clerk's ``errors[0]`` ``long_message`` and ``meta.param_name`` (``param_name``, or ``None``), and an
    :class:`httpx.HTTPStatusError` (``.response``), which the helpers raised before.
    """

    def __init__(self, response: httpx.Response) -> None:
        request = response.request
        first = _first_error(response)
        meta = first.get("meta")
        param = meta.get("param_name") if isinstance(meta, dict) else None
        code = first.get("code")
        long_message = first.get("long_message") or first.get("message") or response.text[:200] or None
        message = f"{request.method} {request.url.path} answered {response.status_code}"
        message += f" {code}" if code else ""
        message += f": {long_message}" if long_message else ""
        if param:
            message += f" (param_name: {param})"
        httpx.HTTPStatusError.__init__(self, message, request=request, response=response)
        body = _json_or_none(response)
        trace = body.get("clerk_trace_id") if isinstance(body, dict) else None
        self.status = response.status_code
        self.clerk_code = str(code) if code is not None else None
        self.trace_id = str(trace) if trace is not None else None
        self.method = request.method
        self.path = request.url.path
        self.long_message = str(long_message) if long_message is not None else None
        self.param_name = str(param) if param is not None else None


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _first_error(response: httpx.Response) -> dict[str, Any]:
    """``errors[0]`` of a ``ClerkErrors`` body (``{}`` for any other body)."""
    body = _json_or_none(response)
    errors = body.get("errors") if isinstance(body, dict) else None
    first = errors[0] if isinstance(errors, list) and errors else None
    return first if isinstance(first, dict) else {}


class EmulatorServer:
    """Context manager serving a fresh emulator on ``127.0.0.1:<free port>`` in a thread.

    Pass an :class:`EmulatorConfig`, or keyword arguments for one (not both). ``clock`` (unix seconds)
    drives the emulator's time: token ``iat``/``exp``, key grace periods, event timestamps.
    """

    def __init__(self, config: EmulatorConfig | None = None, *, clock: Callable[[], float] = time.time,
                 **overrides: Any) -> None:
        if config is not None and overrides:
            raise TypeError("pass either a config or keyword overrides, not both")
        self._sock = _bind_loopback()
        port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        base = config or EmulatorConfig(**overrides)
        self.config = base if base.frontend_url else base.replace(frontend_url=self.url)
        app, emulator = create_app(self.config, Emulator(self.config, clock=clock))
        self.emulator: Emulator = emulator
        uv_config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            ws="none",
            lifespan="on",
        )
        self._server = uvicorn.Server(uv_config)
        self._thread: threading.Thread | None = None
        self._client = httpx.Client(
            base_url=self.url,
            # the helper header: these requests set up a test, they do not spend the app's rate-limit budget
            headers={"Authorization": f"Bearer {self.config.secret_key}", HELPER_HEADER: "1"},
            timeout=30.0,
        )

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def secret_key(self) -> str:
        return self.config.secret_key

    @property
    def webhook_secret(self) -> str:
        """The secret deliveries are signed with now (the newest after a rotation)."""
        return self.emulator.webhook_secret

    @property
    def api_url(self) -> str:
        """Backend API base, what ``Clerk(server_url=...)`` wants."""
        return f"{self.url}/v1"

    def start(self) -> EmulatorServer:
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._sock]},
            name="clerk-emulator",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the Clerk emulator did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._client.close()
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.emulator.close()
        self._sock.close()

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- HTTP helpers ------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call the emulator with the secret key (not rate limited: see the module's docstring) and return the
        JSON body; a non-2xx answer raises :class:`EmulatorRequestError` with Clerk's reason."""
        response = self._client.request(method, path, **kwargs)
        if not response.is_success:
            raise EmulatorRequestError(response)
        return response.json()

    def create_user(
        self,
        email: str | list[str] | None = None,
        *,
        first_name: str | None = None,
        last_name: str | None = None,
        public_metadata: JSON | None = None,
        **extra: Any,
    ) -> JSON:
        """``POST /v1/users``; returns the Clerk User object."""
        emails = [email] if isinstance(email, str) else list(email or [])
        body = {
            "email_address": emails,
            "first_name": first_name,
            "last_name": last_name,
            "public_metadata": public_metadata,
            **extra,
        }
        result: JSON = self.request("POST", "/v1/users", json=_compact(body))
        return result

    def create_organization(
        self,
        name: str,
        *,
        created_by: str | None = None,
        slug: str | None = None,
        public_metadata: JSON | None = None,
        **extra: Any,
    ) -> JSON:
        """``POST /v1/organizations``; ``created_by`` becomes an ``org:admin`` member."""
        body = {"name": name, "created_by": created_by, "slug": slug, "public_metadata": public_metadata, **extra}
        result: JSON = self.request("POST", "/v1/organizations", json=_compact(body))
        return result

    def add_membership(self, organization_id: str, user_id: str, role: str = "org:member") -> JSON:
        """``POST /v1/organizations/{id}/memberships``."""
        result: JSON = self.request(
            "POST",
            f"/v1/organizations/{organization_id}/memberships",
            json={"user_id": user_id, "role": role},
        )
        return result

    def create_session(self, user_id: str, org_id: str | None = None) -> JSON:
        """``POST /v1/sessions`` (testing-instance endpoint); emits ``session.created``."""
        body = _compact({"user_id": user_id, "active_organization_id": org_id})
        result: JSON = self.request("POST", "/v1/sessions", json=body)
        return result

    def mint_session_token(
        self,
        user_id: str,
        org_id: str | None = None,
        actor: JSON | str | None = None,
        *,
        pending: bool = False,
        template_name: str | None = None,
        expires_in_seconds: int | None = None,
    ) -> str:
        """Sign ``user_id`` in (in ``org_id``; impersonated by ``actor``, a user id or an
        ``{"sub": ...}`` dict) and return a session token (or a JWT-template token).

        ``pending=True``: the session still has a task to finish (choose an organization); its token
        carries ``sts: "pending"``, which verifiers refuse by default.
        """
        if actor is not None and pending:
            raise ValueError("an impersonated session is never pending: pass actor or pending, not both")
        if pending:
            body = _compact({"user_id": user_id, "active_organization_id": org_id, "pending": True})
            signed_in = self.request("POST", "/_emulator/sessions", json=body)
            if template_name is None and expires_in_seconds is None:
                return str(signed_in["jwt"])
            return self.session_token(signed_in["session"]["id"], template_name=template_name,
                                      expires_in_seconds=expires_in_seconds)
        if actor is not None:
            actor_body = {"sub": actor} if isinstance(actor, str) else actor
            ticket = self.request("POST", "/v1/actor_tokens", json={"user_id": user_id, "actor": actor_body})
            accepted = self.request("POST", f"/_emulator/actor_tokens/{ticket['id']}/accept")
            if template_name is None and expires_in_seconds is None:
                return str(accepted["jwt"])
            session_id = accepted["session"]["id"]
        else:
            session_id = self.create_session(user_id, org_id)["id"]
        return self.session_token(session_id, template_name=template_name, expires_in_seconds=expires_in_seconds)

    def session_token(
        self,
        session_id: str,
        *,
        template_name: str | None = None,
        expires_in_seconds: int | None = None,
    ) -> str:
        """``POST /v1/sessions/{id}/tokens[/{template}]``: a fresh token for an existing session."""
        path = f"/v1/sessions/{session_id}/tokens"
        if template_name is not None:
            path += f"/{template_name}"
        body = _compact({"expires_in_seconds": expires_in_seconds})
        return str(self.request("POST", path, json=body)["jwt"])

    @staticmethod
    def session_id_of(token: str) -> str:
        """The session id (``sid`` claim) of a session token minted here, e.g. to :meth:`revoke_session` it. The
        token is read, not verified. ``ValueError`` for a string that is not a JWT, or a token without ``sid`` (a
        JWT-template token carries only its template's claims)."""
        try:
            payload = token.split(".")[1]
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except (IndexError, ValueError, binascii.Error):
            raise ValueError(f"not a JWT (header.payload.signature): {token[:20]!r}...") from None
        sid = claims.get("sid") if isinstance(claims, dict) else None
        if not isinstance(sid, str):
            raise ValueError("the token has no sid claim (a JWT-template token carries only its template's claims):"
                             " mint a session token, or keep the id from create_session()['id']")
        return sid

    def revoke_session(self, session_id: str) -> JSON:
        """``POST /v1/sessions/{id}/revoke``: the session becomes ``revoked`` (its tokens with it, for a verifier
        that checks sessions); emits ``session.revoked``. Returns the Session."""
        result: JSON = self.request("POST", f"/v1/sessions/{session_id}/revoke")
        return result

    def ban_user(self, user_id: str) -> JSON:
        """``POST /v1/users/{id}/ban``: ``banned`` true, every active session of the user revoked, as Clerk does;
        emits ``user.updated`` and a ``session.revoked`` per session. Returns the User."""
        result: JSON = self.request("POST", f"/v1/users/{user_id}/ban")
        return result

    def unban_user(self, user_id: str) -> JSON:
        """``POST /v1/users/{id}/unban`` (revoked sessions stay revoked); emits ``user.updated``."""
        result: JSON = self.request("POST", f"/v1/users/{user_id}/unban")
        return result

    def update_user_metadata(
        self,
        user_id: str,
        *,
        public_metadata: JSON | None = None,
        private_metadata: JSON | None = None,
        unsafe_metadata: JSON | None = None,
    ) -> JSON:
        """``PATCH /v1/users/{id}/metadata``: each given metadata deep-merged into the user's, a key set to
        ``None`` removed (e.g. ``public_metadata={"role": None}``); emits ``user.updated``. Returns the User."""
        body = _compact({"public_metadata": public_metadata, "private_metadata": private_metadata,
                         "unsafe_metadata": unsafe_metadata})
        result: JSON = self.request("PATCH", f"/v1/users/{user_id}/metadata", json=body)
        return result

    def update_membership(self, organization_id: str, user_id: str, role: str) -> JSON:
        """``PATCH /v1/organizations/{id}/memberships/{user_id}``: the member's role (e.g. ``"org:member"`` to
        demote an admin); emits ``organizationMembership.updated``. Tokens minted before keep the old role
        until they expire, as Clerk's do. Returns the membership."""
        result: JSON = self.request("PATCH", f"/v1/organizations/{organization_id}/memberships/{user_id}",
                                    json={"role": role})
        return result

    def jwks(self) -> JSON:
        result: JSON = self.request("GET", "/v1/jwks")
        return result

    def set_webhook_url(self, url: str | None) -> None:
        """Point webhook deliveries at ``url``, e.g. the app's :func:`serve_app` URL + its webhook path. It is
        configuration: :meth:`reset` keeps it. ``None`` pauses deliveries ("the webhook is late"): the messages
        meanwhile are held, unsent, until the next URL, which gets them in order (same ``svix-id``, signed at
        send time), or until :meth:`reset`, which drops them."""
        self.request("POST", "/_emulator/webhook", json={"url": url})

    def set_faults(self, **knobs: Any) -> JSON:
        """``POST /_emulator/faults``, e.g. ``set_faults(outage=True)`` or ``set_faults(delivery_concurrency=4)``;
        :meth:`reset` restores the configured values."""
        result: JSON = self.request("POST", "/_emulator/faults", json=knobs)
        return result

    def deliveries(self, include_payload: bool = False) -> list[JSON]:
        """The delivery log: one entry per message with its attempts and status codes."""
        params = {"include_payload": "true"} if include_payload else {}
        result: list[JSON] = self.request("GET", "/_emulator/deliveries", params=params)["data"]
        return result

    def wait_for_deliveries(self, timeout: float = 10.0) -> None:
        """Block until the delivery queue is drained.

        ``TimeoutError`` if it is not, naming each pending message's URL, last attempt and next one (a
        receiver that fails is retried on Svix's schedule divided by ``time_scale``). ``RuntimeError`` if
        messages since the last wait were not sent because no webhook URL is set: call :meth:`set_webhook_url`;
        and while deliveries are paused (``set_webhook_url(None)``) with messages held: set the URL again to
        send them, or :meth:`reset` to drop them.
        """
        self.emulator.wait_for_deliveries(timeout)

    def reset(self) -> None:
        """Forget all data and messages, restore the configured knobs; keep the webhook URL (see
        :meth:`set_webhook_url`)."""
        self.request("POST", "/_emulator/reset")


def _compact(body: JSON) -> JSON:
    return {k: v for k, v in body.items() if v is not None}


# -- serving the app under test --------------------------------------------------------------


def _is_asgi(app: Callable[..., Any]) -> bool:
    """``async def __call__(scope, receive, send)`` (FastAPI, Starlette, Django's ASGIHandler) or an async
    function; a plain callable is taken for WSGI (Flask, Django's WSGIHandler)."""
    method = getattr(app, "__call__", None)  # noqa: B004 (its own kind is asked, not whether app is callable)
    return inspect.iscoroutinefunction(app) or inspect.iscoroutinefunction(method)


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a request still running (a long poll) does not hold up the test's exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log line on stderr per request."""


@contextmanager
def serve_app(
    app: Callable[..., Any],
    *,
    port: int = 0,
    interface: Literal["auto", "asgi", "wsgi"] = "auto",
    lifespan: Literal["auto", "on", "off"] = "auto",
) -> Iterator[str]:
    """Serve the app under test on ``127.0.0.1`` in a background thread; yield its base URL
    (``http://127.0.0.1:<port>``, no trailing slash) and stop it when the block ends.

    For the emulator to deliver webhooks to the app: ``clerk.set_webhook_url(f"{url}/webhooks/clerk")``.
    ``port=0`` takes a free one. ``interface="auto"`` serves an ASGI app (an ``async`` ``__call__``: FastAPI,
    Starlette, Django's ``get_asgi_application()``) with uvicorn and any other callable as WSGI (Flask,
    Django's ``get_wsgi_application()``) with the standard library's threaded ``wsgiref`` server; pass
    ``"asgi"`` or ``"wsgi"`` when the guess is wrong. ``lifespan`` is uvicorn's (ASGI only): ``"on"`` makes a
    failing start-up task an error here, ``"auto"`` runs it if the app supports it.
    """
    kind = interface if interface != "auto" else ("asgi" if _is_asgi(app) else "wsgi")
    if kind == "asgi":
        with _serving_asgi(app, port, lifespan) as url:
            yield url
    else:
        with _serving_wsgi(app, port) as url:
            yield url


@contextmanager
def _serving_asgi(app: Callable[..., Any], port: int, lifespan: Literal["auto", "on", "off"]) -> Iterator[str]:
    sock = _bind_loopback(port)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan))

    def run() -> None:
        with suppress(SystemExit):  # uvicorn's answer to a failed start-up (logged): reported below instead
            server.run(sockets=[sock])

    thread = threading.Thread(target=run, name="clerk-sync-app", daemon=True)
    try:
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the app did not start on {url} (its start-up failed? uvicorn's log says why)")
            time.sleep(0.01)
        yield url
    finally:
        server.should_exit = True
        if thread.is_alive():
            thread.join(10)
        sock.close()


@contextmanager
def _serving_wsgi(app: Callable[..., Any], port: int) -> Iterator[str]:
    server = _ThreadingWSGIServer(("127.0.0.1", port), _QuietHandler)  # bound and listening on return
    server.set_app(app)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="clerk-sync-app",
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
