"""Sessions, actor (impersonation) tokens and sign-in tokens.

Real Clerk creates sessions when a user signs in through the Frontend API; the emulator
offers the testing-only ``POST /v1/sessions`` plus "accept" endpoints for actor and sign-in
tokens, which stand in for the user following the token's URL.
"""

from __future__ import annotations

from typing import Any

from .errors import ClerkAPIError
from .records import (
    ActorTokenRecord,
    SessionRecord,
    SignInTokenRecord,
    UserRecord,
    lockout_remaining_s,
    render_session,
    render_user,
)
from .state import Store

__all__ = [
    "accept_actor_token",
    "accept_sign_in_token",
    "create_actor_token",
    "create_session",
    "create_sign_in_token",
    "end_session",
    "get_session",
    "list_sessions",
    "remove_all_for_user",
    "render_actor_token",
    "render_sign_in_token",
    "require_session",
    "revoke_actor_token",
    "revoke_all_for_user",
    "revoke_sign_in_token",
    "session_event_data",
    "sign_in_refusal",
]

JSON = dict[str, Any]
_DAY_MS = 24 * 3600 * 1000
_EVENT_FOR_STATUS = {
    "revoked": "session.revoked",
    "ended": "session.ended",
    "removed": "session.removed",
}


def require_session(store: Store, session_id: str) -> SessionRecord:
    """The session, or a Clerk 404."""
    session = store.sessions.get(session_id)
    if session is None:
        raise ClerkAPIError.not_found()
    return session


def session_event_data(store: Store, session: SessionRecord) -> JSON:
    """Session webhook ``data``: the Session plus the full ``user`` (when still present)."""
    data = render_session(session, session.updated_at)
    user = store.users.get(session.user_id)
    if user is not None:
        data["user"] = render_user(user)
    return data


def sign_in_refusal(user: UserRecord) -> ClerkAPIError | None:
    """Why ``user`` may not sign in now: banned ("not allowed to sign in again"), deprovisioned ("restricted
    from signing in") or locked until the lock expires (spec, ``LockUser``). The spec names no status or code
    for these on ``POST /sessions`` (its 400/422 are about the request): 403 with a Clerk-shaped error, the
    code naming the reason (``user_banned``, ``user_deprovisioned``, ``user_locked`` with the seconds left)."""
    if user.banned:
        return ClerkAPIError(403, "user_banned", "This account is banned",
                             f"User {user.id} is banned and is not allowed to sign in.")
    if user.deprovisioned:
        return ClerkAPIError(403, "user_deprovisioned", "This account has been deprovisioned",
                             f"User {user.id} was deprovisioned by their identity provider and may not sign in.")
    locked, seconds = lockout_remaining_s(user)
    if locked:
        when = "until an admin unlocks it" if seconds is None else f"for {seconds} more seconds"
        return ClerkAPIError(403, "user_locked", "This account is locked",
                             f"User {user.id} is locked {when}.", meta={"lockout_expires_in_seconds": seconds})
    return None


def _may_sign_in(store: Store, user_id: str) -> None:
    user = store.users.get(user_id)
    refusal = None if user is None else sign_in_refusal(user)
    if refusal is not None:
        raise refusal


def create_session(
    store: Store,
    user_id: str,
    *,
    organization_id: str | None = None,
    actor: JSON | None = None,
    pending: bool = False,
    lifetime_ms: int = 7 * _DAY_MS,
) -> JSON:
    """Sign a user in: emits ``session.created`` (or ``session.pending``)."""
    with store.lock:
        user = store.users.get(user_id)
        if user is None:
            raise ClerkAPIError.not_found()
        refusal = sign_in_refusal(user)
        if refusal is not None:
            raise refusal
        if organization_id is not None and user_id not in store.memberships.get(organization_id, {}):
            raise ClerkAPIError.invalid("active_organization_id", "user is not a member")
        now = store.now_ms()
        session = SessionRecord(
            id=store.new_id("sess"),
            user_id=user_id,
            client_id=store.new_id("client"),
            status="pending" if pending else "active",
            created_at=now,
            updated_at=now,
            expire_at=now + lifetime_ms,
            abandon_at=now + 30 * _DAY_MS,
            actor=dict(actor) if actor else None,
            last_active_organization_id=organization_id,
        )
        store.sessions[session.id] = session
        user.last_sign_in_at = now
        user.last_active_at = now
        store.emit("session.pending" if pending else "session.created", session_event_data(store, session))
        return render_session(session, session.updated_at)


def get_session(store: Store, session_id: str) -> JSON:
    with store.lock:
        session = require_session(store, session_id)
        return render_session(session, session.updated_at)


def list_sessions(store: Store, *, user_id: str | None, client_id: str | None, status: str | None) -> list[JSON]:
    """Sessions matching the filters, newest first."""
    with store.lock:
        found = [
            s
            for s in store.sessions.values()
            if (user_id is None or s.user_id == user_id)
            and (client_id is None or s.client_id == client_id)
            and (status is None or s.status == status)
        ]
        found.reverse()
        return [render_session(s, s.updated_at) for s in found]


def _finish(store: Store, session: SessionRecord, status: str, emit: bool = True) -> JSON:
    session.status = status
    session.updated_at = store.bump_ms(session.updated_at)
    if emit:
        store.emit(_EVENT_FOR_STATUS[status], session_event_data(store, session))
    return render_session(session, session.updated_at)


def end_session(store: Store, session_id: str, status: str) -> JSON:
    """Move an active session to ``revoked``, ``ended`` or ``removed`` and emit the event."""
    with store.lock:
        session = require_session(store, session_id)
        if session.status not in {"active", "pending"}:
            raise ClerkAPIError(
                400,
                "session_not_active",
                "Session is not active",
                f"The session is {session.status} and cannot be {status}.",
            )
        return _finish(store, session, status)


def revoke_all_for_user(store: Store, user_id: str) -> None:
    """Revoke every live session of a user (banning does this), one event each."""
    for session in list(store.sessions.values()):
        if session.user_id == user_id and session.status in {"active", "pending"}:
            _finish(store, session, "revoked")


def remove_all_for_user(store: Store, user_id: str) -> None:
    """Drop a deleted user's sessions silently."""
    for session_id in [s.id for s in store.sessions.values() if s.user_id == user_id]:
        del store.sessions[session_id]


def render_actor_token(token: ActorTokenRecord, base_url: str) -> JSON:
    return {
        "object": "actor_token",
        "id": token.id,
        "status": token.status,
        "user_id": token.user_id,
        "actor": dict(token.actor),
        "token": token.token,
        "url": f"{base_url}/v1/tickets/accept?ticket={token.token}",
        "created_at": token.created_at,
        "updated_at": token.updated_at,
    }


def create_actor_token(store: Store, body: JSON) -> ActorTokenRecord:
    """``POST /actor_tokens``: an impersonation ticket for ``user_id`` acting as ``actor.sub``."""
    user_id = body.get("user_id")
    actor = body.get("actor")
    if not isinstance(user_id, str):
        raise ClerkAPIError.missing("user_id")
    if not isinstance(actor, dict) or not isinstance(actor.get("sub"), str):
        raise ClerkAPIError.missing("actor.sub")
    expires_in = int(body.get("expires_in_seconds") or 3600)
    max_duration = int(body.get("session_max_duration_in_seconds") or 1800)
    with store.lock:
        if user_id not in store.users:
            raise ClerkAPIError.not_found()
        now = store.now_ms()
        token = ActorTokenRecord(
            id=store.new_id("act"),
            user_id=user_id,
            actor=dict(actor),
            token=store.new_token(),
            status="pending",
            created_at=now,
            updated_at=now,
            expires_at=now + expires_in * 1000,
            session_max_duration_s=max_duration,
        )
        store.actor_tokens[token.id] = token
        return token


def actor_tokens_in_last_month(store: Store) -> int:
    """Actor tokens created in the last 30 days (what a plan's monthly impersonation limit counts)."""
    since = store.now_ms() - 30 * 24 * 3600 * 1000
    with store.lock:
        return sum(1 for token in store.actor_tokens.values() if token.created_at >= since)


def _pending_token(table: dict[str, Any], token_id: str, now: int) -> Any:
    token = table.get(token_id)
    if token is None:
        raise ClerkAPIError.not_found()
    if token.status != "pending" or token.expires_at <= now:
        raise ClerkAPIError(
            400,
            "token_invalid",
            "Token is not valid",
            f"The token is {token.status if token.status != 'pending' else 'expired'}.",
        )
    return token


def revoke_actor_token(store: Store, token_id: str) -> ActorTokenRecord:
    """``POST /actor_tokens/{id}/revoke`` (pending tokens only)."""
    with store.lock:
        token: ActorTokenRecord = _pending_token(store.actor_tokens, token_id, store.now_ms())
        token.status = "revoked"
        token.updated_at = store.bump_ms(token.updated_at)
        return token


def accept_actor_token(store: Store, token_id: str) -> JSON:
    """Emulator-only: use the ticket, starting an impersonated session that carries ``act``."""
    with store.lock:
        token: ActorTokenRecord = _pending_token(store.actor_tokens, token_id, store.now_ms())
        _may_sign_in(store, token.user_id)  # before the ticket is used up
        token.status = "accepted"
        token.updated_at = store.bump_ms(token.updated_at)
        return create_session(
            store,
            token.user_id,
            actor=token.actor,
            lifetime_ms=token.session_max_duration_s * 1000,
        )


def render_sign_in_token(token: SignInTokenRecord, base_url: str) -> JSON:
    return {
        "object": "sign_in_token",
        "id": token.id,
        "status": token.status,
        "user_id": token.user_id,
        "token": token.token,
        "url": f"{base_url}/v1/tickets/accept?ticket={token.token}",
        "created_at": token.created_at,
        "updated_at": token.updated_at,
    }


def create_sign_in_token(store: Store, body: JSON) -> SignInTokenRecord:
    """``POST /sign_in_tokens``: a single-use sign-in ticket (default lifetime 30 days)."""
    user_id = body.get("user_id")
    if not isinstance(user_id, str):
        raise ClerkAPIError.missing("user_id")
    expires_in = int(body.get("expires_in_seconds") or 2592000)
    with store.lock:
        if user_id not in store.users:
            raise ClerkAPIError.not_found()
        now = store.now_ms()
        token = SignInTokenRecord(
            id=store.new_id("sit"),
            user_id=user_id,
            token=store.new_token(),
            status="pending",
            created_at=now,
            updated_at=now,
            expires_at=now + expires_in * 1000,
            org_id=body.get("org_id"),
        )
        store.sign_in_tokens[token.id] = token
        return token


def revoke_sign_in_token(store: Store, token_id: str) -> SignInTokenRecord:
    with store.lock:
        token: SignInTokenRecord = _pending_token(store.sign_in_tokens, token_id, store.now_ms())
        token.status = "revoked"
        token.updated_at = store.bump_ms(token.updated_at)
        return token


def accept_sign_in_token(store: Store, token_id: str) -> JSON:
    """Emulator-only: use the ticket, creating a session (with ``org_id`` active if given)."""
    with store.lock:
        token: SignInTokenRecord = _pending_token(store.sign_in_tokens, token_id, store.now_ms())
        _may_sign_in(store, token.user_id)  # before the ticket is used up
        token.status = "accepted"
        token.updated_at = store.bump_ms(token.updated_at)
        return create_session(store, token.user_id, organization_id=token.org_id)
