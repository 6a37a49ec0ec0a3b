"""Test helpers: run the Clerk emulator on a loopback port for the duration of a test.

Usage::

    from clerk_sync.testing import EmulatorServer

    with EmulatorServer(webhook_url="http://127.0.0.1:8000/webhooks/clerk") as clerk:
        user = clerk.create_user(email="ada@example.com", first_name="Ada")
        token = clerk.mint_session_token(user["id"])
        clerk.wait_for_deliveries()

The helpers go over HTTP (the same path our code uses); ``.emulator`` gives in-process
access to the knobs (``clerk.emulator.faults.update({...})``) and state.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import httpx
import uvicorn

from .emulator import Emulator, EmulatorConfig, create_app

__all__ = ["EmulatorServer"]

JSON = dict[str, Any]


def _bind_loopback() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


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
            headers={"Authorization": f"Bearer {self.config.secret_key}"},
            timeout=30.0,
        )

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def secret_key(self) -> str:
        return self.config.secret_key

    @property
    def webhook_secret(self) -> str:
        return self.config.effective_webhook_secret

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
        """Call the emulator with the secret key; raise on non-2xx; return the JSON body."""
        response = self._client.request(method, path, **kwargs)
        response.raise_for_status()
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

    def jwks(self) -> JSON:
        result: JSON = self.request("GET", "/v1/jwks")
        return result

    def set_webhook_url(self, url: str | None) -> None:
        """Point webhook deliveries at ``url`` (``None`` stops them)."""
        self.request("POST", "/_emulator/webhook", json={"url": url})

    def set_faults(self, **knobs: Any) -> JSON:
        """``POST /_emulator/faults``, e.g. ``set_faults(outage=True)``."""
        result: JSON = self.request("POST", "/_emulator/faults", json=knobs)
        return result

    def deliveries(self, include_payload: bool = False) -> list[JSON]:
        """The delivery log: one entry per message with its attempts and status codes."""
        params = {"include_payload": "true"} if include_payload else {}
        result: list[JSON] = self.request("GET", "/_emulator/deliveries", params=params)["data"]
        return result

    def wait_for_deliveries(self, timeout: float = 10.0) -> None:
        """Block until the delivery queue is drained (``TimeoutError`` if it is not)."""
        self.emulator.wait_for_deliveries(timeout)

    def reset(self) -> None:
        self.request("POST", "/_emulator/reset")


def _compact(body: JSON) -> JSON:
    return {k: v for k, v in body.items() if v is not None}
