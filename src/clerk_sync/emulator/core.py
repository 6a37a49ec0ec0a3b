"""The :class:`Emulator`: one emulated Clerk instance, usable in-process or behind HTTP.

It wires the record store to webhook delivery (every change becomes a signed Svix-style
message), owns the signing keys and the fault knobs, and offers shortcuts tests use
directly: seeding, minting session tokens, waiting for deliveries.
"""

from __future__ import annotations

import random
import string
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any

from . import orgs, sessions, users
from .config import EmulatorConfig, generate_webhook_secret
from .delivery import SECRET_ROTATION_GRACE_S, Deliverer
from .errors import ClerkAPIError
from .faults import Faults, FaultSettings, RateLimiter
from .state import Store
from .tokens import JWT_TEMPLATE_CATEGORY, KeyRing, SessionClaimsInput, session_claims, template_claims

__all__ = ["REQUEST_ORIGIN", "Emulator"]

JSON = dict[str, Any]
#: ``(client_ip, user_agent)`` of the API request being served, for ``event_attributes``.
REQUEST_ORIGIN: ContextVar[tuple[str, str]] = ContextVar("clerk_emulator_origin", default=("", ""))
_ALPHABET = string.ascii_letters + string.digits


def _message_ids(seed: int | None) -> random.Random:
    """The ``msg_`` id stream: seeded apart from the records' ids (``Store.rng``), whose stream would otherwise
    repeat in it (``msg_X`` for ``user_X``), so nothing could tell a ``svix-id`` from a data id but its prefix."""
    return random.Random(None if seed is None else f"{seed}/svix-id")


class Emulator:
    """State, keys, knobs and webhook delivery of one emulated Clerk instance."""

    def __init__(self, config: EmulatorConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.frontend_url: str | None = config.frontend_url
        self.session_token_template: Mapping[str, Any] | None = config.session_token_template
        self.faults = Faults(FaultSettings.from_config(config), config.seed)
        self.rate_limiter = RateLimiter()
        # Clerk's per-user/organization/membership limits (``endpoints.PER_OBJECT_LIMITED``), on this clock
        self.object_rate_limiter = RateLimiter(clock)
        self.keys = KeyRing(config.instance_id, grace_s=config.key_grace_s, clock=clock)
        self._msg_rng = _message_ids(config.seed)
        self.delivery = Deliverer(
            secret=config.effective_webhook_secret,
            url=config.webhook_url,
            faults=self.faults,
            new_id=self._new_message_id,
            schedule=config.retry_schedule_s,
            timeout_s=config.delivery_timeout_s,
            reorder_hold_s=config.reorder_hold_s,
            clock=clock,
            jitter=config.retry_jitter,
        )
        self.store = Store(seed=config.seed, clock=clock, sink=self._emit, role_permissions=config.role_permissions)

    @property
    def webhook_secret(self) -> str:
        """The ``whsec_`` secret deliveries are signed with (the newest, after :meth:`rotate_webhook_secret`)."""
        return self.delivery.secret

    def rotate_webhook_secret(self, secret: str | None = None, *, grace_s: float = SECRET_ROTATION_GRACE_S) -> str:
        """The Dashboard's "rotate signing secret": deliveries are signed with ``secret`` (a fresh one if None,
        returned) and, for ``grace_s`` more seconds on the emulator's clock (Svix: 24 h), with the previous
        secret too (``svix-signature: v1,<new> v1,<old>``). :meth:`reset` restores the configured secret."""
        new = secret or generate_webhook_secret()
        self.delivery.rotate_secret(new, grace_s=grace_s)
        return new

    def _new_message_id(self) -> str:
        return "msg_" + "".join(self._msg_rng.choices(_ALPHABET, k=27))

    def _emit(self, event_type: str, data: JSON) -> None:
        client_ip, user_agent = REQUEST_ORIGIN.get()
        envelope = {
            "data": data,
            "event_attributes": {"http_request": {"client_ip": client_ip, "user_agent": user_agent}},
            "instance_id": self.config.instance_id,
            "object": "event",
            "timestamp": int(self.clock() * 1000),
            "type": event_type,
        }
        self.delivery.enqueue(event_type, envelope)

    # -- lifecycle -----------------------------------------------------------------------

    def reset(self) -> None:
        """Drop all records, messages and rate-limit windows; restore the configured knobs.

        The webhook URL is configuration, not state: it stays the last one set (``set_webhook_url`` at run
        time, typically once the app under test has a port), else the configured one. A pause
        (``set_webhook_url(None)``, a test's "the webhook is late") ends: the messages it held are dropped with
        the rest, and deliveries resume to that URL.
        """
        with self.store.lock:
            self.store.reset()
            self.delivery.clear()  # drops the messages a pause held, and ends the pause
            self._msg_rng = _message_ids(self.config.seed)
        self.faults.reset(FaultSettings.from_config(self.config))
        self.rate_limiter.reset()
        self.object_rate_limiter.reset()
        self.session_token_template = self.config.session_token_template

    def close(self) -> None:
        """Stop the delivery worker."""
        self.delivery.close()

    def set_webhook_url(self, url: str | None) -> None:
        """Deliver webhooks to ``url`` from now on (kept by :meth:`reset`). ``None`` pauses deliveries ("the
        webhook is late"): messages meanwhile (and retries that come due) are held, unsent, until the next
        URL, which gets them in order with their ``svix-id``, or until :meth:`reset`, which drops them."""
        self.delivery.set_url(url)

    def wait_for_deliveries(self, timeout: float = 10.0) -> None:
        """Block until every queued, held and in-flight delivery attempt has finished.

        ``TimeoutError`` names each message still pending (URL, last attempt, next one); ``RuntimeError``
        while deliveries are paused and messages are held (set a URL to send them, or reset), or if messages
        since the last wait went nowhere because no webhook URL was ever set.
        """
        self.delivery.wait_idle(timeout)

    # -- data shortcuts ------------------------------------------------------------------

    def create_user(self, **body: Any) -> JSON:
        """Same as ``POST /v1/users`` (``email_address`` is a list of addresses)."""
        return users.create_user(self.store, body)

    def create_organization(self, **body: Any) -> JSON:
        return orgs.create_org(self.store, body)

    def add_membership(self, organization_id: str, user_id: str, role: str = "org:member") -> JSON:
        return orgs.create_membership(self.store, organization_id, {"user_id": user_id, "role": role})

    def bulk_create_users(self, count: int) -> int:
        """Add ``count`` users without webhooks (fast, memory-lean; for benchmarks)."""
        return users.bulk_create_users(self.store, count)

    def seed_demo(self, n_users: int = 10, n_orgs: int = 3) -> JSON:
        """Deterministic demo data (emits webhooks): users, orgs, one admin per org, members."""
        created_users = [
            self.create_user(
                email_address=[f"demo{i}@example.com"],
                first_name="Demo",
                last_name=f"User {i}",
                username=f"demo{i}",
                public_metadata={"role": "admin" if i == 0 else "user"},
            )
            for i in range(n_users)
        ]
        created_orgs = []
        for j in range(n_orgs):
            creator = created_users[j % n_users]["id"] if n_users else None
            org = self.create_organization(name=f"Demo Org {j}", slug=f"demo-org-{j}", created_by=creator)
            created_orgs.append(org)
        for i, user in enumerate(created_users):
            if n_orgs and i >= n_orgs:
                self.add_membership(created_orgs[i % n_orgs]["id"], user["id"])
        return {"users": [u["id"] for u in created_users], "organizations": [o["id"] for o in created_orgs]}

    # -- tokens --------------------------------------------------------------------------

    def issuer(self, fallback: str = "http://localhost") -> str:
        return (self.frontend_url or fallback).rstrip("/")

    def session_token(
        self,
        session_id: str,
        *,
        template_name: str | None = None,
        expires_in_s: int | None = None,
        issuer: str | None = None,
    ) -> str:
        """Mint a token for a live session (``POST /v1/sessions/{id}/tokens[/{template}]``)."""
        template = None
        if template_name is not None:
            template = self.config.jwt_templates.get(template_name)
            if template is None:
                raise ClerkAPIError.not_found()
        with self.store.lock:
            data = self._claims_input(session_id, expires_in_s, issuer or self.issuer())
        now = int(self.clock())
        if template is not None:
            return self.keys.sign(template_claims(template, data, now), category=JWT_TEMPLATE_CATEGORY)
        return self.keys.sign(session_claims(data, now))

    def _claims_input(self, session_id: str, expires_in_s: int | None, issuer: str) -> SessionClaimsInput:
        session = sessions.require_session(self.store, session_id)
        if session.status not in {"active", "pending"}:
            raise ClerkAPIError(
                404,
                "session_not_active",
                "Session is not active",
                f"Cannot create a token for a {session.status} session.",
            )
        user = users.get_user(self.store, session.user_id)
        org = membership = None
        org_id = session.last_active_organization_id
        if org_id is not None and org_id in self.store.orgs:
            membership = self.store.memberships[org_id].get(session.user_id)
            org = orgs.org_json(self.store, self.store.orgs[org_id]) if membership else None
        return SessionClaimsInput(
            user=user,
            session_id=session.id,
            issuer=issuer,
            authorized_party=self.config.authorized_party,
            lifetime_s=expires_in_s or self.config.session_token_lifetime_s,
            jti=self.store.new_token(20),
            org=org,
            membership_role=membership.role if membership else None,
            permissions=self.store.permissions_for(membership.role) if membership else (),
            actor=session.actor,
            pending=session.status == "pending",
            template=self.session_token_template,
            version=self.config.session_token_version,
        )

    def mint_session_token(
        self,
        user_id: str,
        org_id: str | None = None,
        actor: JSON | None = None,
        *,
        pending: bool = False,
        template_name: str | None = None,
        expires_in_s: int | None = None,
    ) -> str:
        """Create a session for ``user_id`` (optionally in ``org_id``, impersonated by
        ``actor``) and return a fresh token for it."""
        session = sessions.create_session(self.store, user_id, organization_id=org_id, actor=actor, pending=pending)
        return self.session_token(session["id"], template_name=template_name, expires_in_s=expires_in_s)
