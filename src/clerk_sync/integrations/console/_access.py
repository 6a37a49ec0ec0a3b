"""Who may use the console, and the CSRF token of their console session.

Two ways in:

- an **admin signed in with Clerk**: a verified session token (``__session`` cookie, ``Bearer``, or a
  sign-in link carrying one, which asks first when followed from another site or into an open console
  session: :meth:`ConsoleAccess.pending_sign_in`), then the ``admin`` role confirmed against the database,
  on every request: a demoted admin loses access at once;
- an **operator token** from the environment (``CLERK_SYNC_CONSOLE_TOKEN``), typed into the login
  form or sent as ``Authorization: Bearer``.

A browser sign-in becomes a console session: a cookie signed with itsdangerous that holds the
identity and a random CSRF token, which every form repeats in a hidden field. ``Bearer`` callers
carry no ambient credential, so they need no CSRF token. An admin's console session also holds the
Clerk session it was opened with (``sid``), and ends when Clerk revokes, ends or removes that session
(signing out everywhere, a compromised session): the deny list and the ``revoked_sessions`` table are
checked on every request, as the role is. A Clerk session that merely expires (its lifetime, an
inactivity timeout) sends no webhook, so every console session also ends ``max_age_s`` after sign-in
(``CLERK_SYNC_CONSOLE_SESSION_S``, 8 hours by default): keep it near your Clerk session lifetime.
Signing out deletes the cookie and writes a ``console.logout`` audit row, which ends every console
session of that identity opened before it (the cookie is signed, not stored: without the row, a copy of
it would stay valid until ``max_age_s``); the operator token is one identity, so an operator's sign-out
ends every operator session.

The cookie's signature is only as secret as its key (:func:`signing_key`): the key is derived from
secrets no third party holds, never from the webhook signing secret. An admin's console session must
also belong to a sign-in the console recorded: its ``console.login`` audit row names the Clerk session
(``sid``), so a cookie signed for a session nobody signed in with is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from itsdangerous import BadSignature, TimestampSigner, URLSafeTimedSerializer

from clerk_sync.auth.admin import ADMIN_ROLE
from clerk_sync.auth.authenticator import Authenticator
from clerk_sync.auth.users import read_user, standing_error
from clerk_sync.config import _CONSOLE_SECRET_HELP
from clerk_sync.errors import AccessDenied, ConfigError, SessionRevoked, TokenError, TokenMissing
from clerk_sync.store import Store
from clerk_sync.tables import audit_log, revoked_sessions

__all__ = ["ADMIN", "COOKIE", "LOGIN_COOKIE", "NO_KEY", "OPERATOR", "PENDING_COOKIE", "PENDING_S", "SIGN_IN",
           "SIGN_OUT", "ConsoleAccess", "Identity", "bearer_token", "check_csrf", "signing_key"]

COOKIE = "clerk_sync_console"
LOGIN_COOKIE = "clerk_sync_console_login"
PENDING_COOKIE = "clerk_sync_console_pending"  # a sign-in link's sign-in, waiting for its confirmation
PENDING_S = 300  # how long a sign-in link's confirmation page may be answered
OPERATOR = "operator"
ADMIN = "admin"
SIGN_OUT = "console.logout"  # the audit action that ends an identity's earlier console sessions
SIGN_IN = "console.login"  # the audit action that opens one (an admin's names its Clerk session: ``sid``)
_CLOCK_SLACK_S = 300  # a sign-in row stamped this much before its cookie's time still counts
NO_KEY = ("the console has no secret of its own to sign its session cookies: set CLERK_SYNC_CONSOLE_SECRET (at "
          f"least 32 characters; {_CONSOLE_SECRET_HELP}), the same on every worker and host. It is needed when "
          "neither CLERK_SYNC_CONSOLE_TOKEN nor CLERK_SECRET_KEY is set; the webhook signing secret is never used "
          "for it, as Clerk and Svix hold it too")


@dataclass(frozen=True, slots=True)
class Identity:
    """A console user: an operator (token) or an admin (``clerk_id``); ``csrf`` is None for Bearer callers."""

    kind: str
    clerk_id: str | None
    csrf: str | None
    new_cookie: str | None = None  # a console session minted by this request (set it on the response)
    session_id: str | None = None  # an admin's Clerk session (``sid``), which the sign-in's audit row records
    # The digest of the secret only a minted cookie carries (``n``), which the sign-in's audit row records as
    # ``session`` (:meth:`ConsoleAccess._unrecorded`); set on a new admin session only.
    session_digest: str | None = None

    @property
    def actor(self) -> str | None:
        """The audit log's ``actor_clerk_id``: the admin, or None for the operator (as the CLI)."""
        return self.clerk_id

    @property
    def label(self) -> str:
        return self.clerk_id or "operator (token)"


def signing_key(*, console_secret: str | None = None, operator_token: str | None = None,
                clerk_secret_key: str | None = None) -> bytes:
    """The console's cookie-signing key, derived from the secrets that are set (so every worker and host
    agrees on it, and rotating any of them ends every console session); a ConfigError when none is.

    Only secrets no third party could use to sign in are inputs. ``CLERK_SYNC_CONSOLE_SECRET`` and the
    operator token are the console's alone. ``CLERK_SECRET_KEY`` is Clerk's too, but whoever holds it already
    commands Clerk's Backend API (a sign-in token for any admin, then a real console sign-in), so a key
    derived from it gives them nothing more, and set-ups that relied on it keep working. The webhook signing
    secret is never an input: Svix and the Clerk Dashboard hold it, and it is deployed wherever webhooks are
    received; a key derived from it alone let anyone holding it sign a console session for any admin
    (security review of 2026-12-05). Each input is named and length-prefixed, so two set-ups never meet on
    one key by moving a value from one setting to another.
    """
    material = (("CLERK_SYNC_CONSOLE_SECRET", console_secret), ("CLERK_SYNC_CONSOLE_TOKEN", operator_token),
                ("CLERK_SECRET_KEY", clerk_secret_key))
    known = [(name, value.encode()) for name, value in material if value]
    if not known:
        raise ConfigError(NO_KEY)
    message = b"".join(b"%s\x00%d\x00%s" % (name.encode(), len(value), value) for name, value in known)
    return hmac.new(b"clerk-sync console cookie key v2", message, hashlib.sha256).digest()


class ConsoleAccess:
    """Resolves a request's :class:`Identity` and issues console sessions."""

    def __init__(self, store: Store, *, operator_token: str | None, authenticator: Authenticator | None,
                 secret: bytes, max_age_s: int = 8 * 3600, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.operator_token = operator_token
        self.authenticator = authenticator
        self.max_age_s = max_age_s
        self.clock = clock
        self._sessions = _Serializer(secret, salt="clerk-sync-console-session", clock=clock)
        self._login = _Serializer(secret, salt="clerk-sync-console-login", clock=clock)
        self._pending = _Serializer(secret, salt="clerk-sync-console-pending", clock=clock)

    # -- per request -----------------------------------------------------------------------------
    def identify(self, headers: Mapping[str, str], cookies: Mapping[str, str], *, method: str | None = None,
                 scheme: str | None = None) -> Identity:
        """The caller, or TokenError (401: sign in) / AccessDenied (403: signed in, not an admin). The
        request's ``method`` and ``scheme`` judge a Clerk cookie's Origin as every face does (a same-origin
        POST of an admin whose console session ended signs in again, a cross-site one is refused)."""
        bearer = bearer_token(headers)
        if bearer is not None:
            if self.is_operator_token(bearer):
                return self.operator()
            return Identity(ADMIN, self._clerk_admin(headers, {})[0], None)
        session = self._session(cookies.get(COOKIE))
        ended: TokenError | None = None
        if session is not None and self._signed_out(*session):
            session, ended = None, TokenMissing("this console session was signed out: sign in again")
        if session is not None:
            kind, clerk_id, csrf, session_id, _, nonce = session
            if kind == OPERATOR:
                if not self.operator_token:
                    raise TokenMissing("operator sign-in is disabled (CLERK_SYNC_CONSOLE_TOKEN is not set)")
                return Identity(kind, clerk_id, csrf)
            ended = self._ended(session_id) or self._unrecorded(clerk_id, session_id, nonce)
            if ended is None:
                self.confirm_admin(str(clerk_id))
                return Identity(kind, clerk_id, csrf, session_id=session_id)
        if self.authenticator is not None and any(n.startswith("__session") for n in cookies):
            return self.admin_session(*self._clerk_admin(headers, cookies, method=method, scheme=scheme))
        raise ended or TokenMissing("sign in to the console: an admin's Clerk session or the operator token")

    def is_operator_token(self, presented: str) -> bool:
        """Whether ``presented`` is the operator token (constant time, no I/O: run on the event loop by
        :meth:`Console.sign_in`, between the throttle's check and its record)."""
        return bool(self.operator_token) and hmac.compare_digest(presented.encode(),
                                                                 str(self.operator_token).encode())

    @staticmethod
    def operator() -> Identity:
        """The operator, as a ``Bearer`` holding the operator token is (no console session)."""
        return Identity(OPERATOR, None, None)

    def signing_out(self, headers: Mapping[str, str], cookies: Mapping[str, str]) -> Identity | None:
        """The console session a sign-out ends: the cookie's signature and age only, not the role, standing
        or Clerk session, so an admin demoted, locked or banned can still end it (and its copies). None for
        Bearer callers, no cookie, or one already signed out (:meth:`identify` answers those)."""
        if bearer_token(headers) is not None:
            return None
        session = self._session(cookies.get(COOKIE))
        if session is None or self._signed_out(*session):
            return None
        kind, clerk_id, csrf, session_id, _, nonce = session
        if kind == ADMIN and self._unrecorded(clerk_id, session_id, nonce) is not None:
            return None  # no sign-in of this admin opened it: it may not end theirs
        return Identity(kind, clerk_id, csrf, session_id=session_id)

    def sign_out_details(self) -> dict[str, float]:
        """What the ``console.logout`` audit row records: console sessions of the identity opened before
        ``ended_through`` (this clock) are over."""
        return {"ended_through": self.clock()}

    def _signed_out(self, kind: str, clerk_id: str | None, _csrf: str, _sid: str | None, issued: float,
                    _nonce: str | None = None) -> bool:
        """Whether the identity signed out of the console after this session was opened (its latest
        ``console.logout`` row; an operator's have no actor, as every operator action)."""
        actor = audit_log.c.actor_clerk_id
        query = (sa.select(audit_log.c.details)
                 .where(audit_log.c.action == SIGN_OUT, actor.is_(None) if kind == OPERATOR else actor == clerk_id)
                 .order_by(audit_log.c.id.desc()).limit(1))
        with self.store.connect() as conn:
            details = conn.execute(query).scalar()
        through = details.get("ended_through") if isinstance(details, dict) else None
        return isinstance(through, int | float) and not isinstance(through, bool) and issued < through

    def confirm_admin(self, clerk_id: str) -> None:
        """The database, not the token, says who is an admin (as ``Authenticator.require_role``)."""
        user = read_user(self.store, clerk_id)
        if user is None or user.role != ADMIN_ROLE:
            raise AccessDenied(f"the console requires the {ADMIN_ROLE!r} role")
        refusal = standing_error(user)  # banned, deleted, deprovisioned by the IdP, or locked: out at once
        if refusal is not None:
            raise refusal

    def _ended(self, session_id: str | None) -> TokenError | None:
        """Why an admin's console session is over: its Clerk session was revoked, ended or removed (the
        table keeps the row after the deny list forgets it, once the session would have expired anyway;
        a console session lasts up to ``max_age_s``), or it predates this check (no ``sid``)."""
        if not session_id:
            return SessionRevoked("this console session was opened before console sessions followed their "
                                  "Clerk session: sign in again")
        revocations = self.authenticator.verifier.revocations if self.authenticator is not None else None
        with self.store.connect() as conn:
            revoked = conn.execute(sa.select(revoked_sessions.c.id)
                                   .where(revoked_sessions.c.session_id == session_id)).first() is not None
        if revoked or (revocations is not None and revocations.is_revoked(session_id)):
            return SessionRevoked("the Clerk session this console session was opened with was revoked or "
                                  "ended (signed out): sign in again")
        return None

    def _unrecorded(self, clerk_id: str | None, session_id: str | None, nonce: str | None) -> TokenError | None:
        """Why an admin's console session is none the console opened: no ``console.login`` audit row of this
        admin, written within ``max_age_s``, names its Clerk session and the digest of the cookie's own secret
        (``n``, drawn when it was minted). Every sign-in writes that row before its cookie is set, so a genuine
        cookie always has one; a cookie signed without a sign-in (a leaked key) does not: the session ids are
        not secret (the audit page shows them), the secret is only in the cookie and its digest cannot be
        turned back into it (review). One opened before sign-ins recorded them signs in again. One indexed
        query on the admin's recent sign-ins, on the store's clock (the one the rows are stamped with)."""
        if not clerk_id or not session_id or not nonce:
            return SessionRevoked("this console session names no Clerk session: sign in again")
        since = self.store.now() - timedelta(seconds=self.max_age_s + _CLOCK_SLACK_S)
        query = sa.select(audit_log.c.details).where(
            audit_log.c.action == SIGN_IN, audit_log.c.actor_clerk_id == clerk_id, audit_log.c.created_at >= since)
        with self.store.connect() as conn:
            signed_in = conn.execute(query).scalars().all()
        digest = _digest(nonce)
        if any(isinstance(details, dict) and details.get("sid") == session_id
               and hmac.compare_digest(str(details.get("session", "")), digest) for details in signed_in):
            return None
        return TokenMissing("no console sign-in on record opened this console session: sign in again")

    def _clerk_admin(self, headers: Mapping[str, str], cookies: Mapping[str, str], *, method: str | None = None,
                     scheme: str | None = None) -> tuple[str, str]:
        """The admin's Clerk id and session id."""
        if self.authenticator is None:
            raise TokenMissing("Clerk sign-in is not configured for the console (set CLERK_SECRET_KEY or "
                               "CLERK_JWT_KEY), and the token is not the operator token")
        auth = self.authenticator.authenticate(headers, cookies, method=method, scheme=scheme)
        if auth.is_impersonated:
            raise AccessDenied("the console is not available while impersonating")
        return self.authenticator.require_role(auth, ADMIN_ROLE).clerk_id, auth.session_id

    # -- sessions --------------------------------------------------------------------------------
    def operator_session(self, token: str) -> Identity:
        """Sign in with the operator token (TokenError when it is wrong or operator sign-in is off)."""
        if not self.operator_token:
            raise TokenMissing("operator sign-in is disabled (CLERK_SYNC_CONSOLE_TOKEN is not set)")
        if not self.is_operator_token(token):
            raise TokenError("that is not the operator token (CLERK_SYNC_CONSOLE_TOKEN)")
        return self._mint(OPERATOR, None, None)

    def clerk_session(self, session_token: str) -> Identity:
        """Sign in with a Clerk session token (a sign-in link from ``clerk-sync dev``, or a front end)."""
        return self.admin_session(*self._clerk_admin({"authorization": f"Bearer {session_token}"}, {}))

    def clerk_admin(self, session_token: str) -> Identity:
        """Who a Clerk session token would sign in (verified, an admin, its Clerk session live), without opening
        a console session: a sign-in link waiting for its confirmation (:meth:`pending_sign_in`)."""
        clerk_id, session_id = self._clerk_admin({"authorization": f"Bearer {session_token}"}, {})
        ended = self._ended(session_id)
        if ended is not None:
            raise ended
        return Identity(ADMIN, clerk_id, None, session_id=session_id)

    def pending_sign_in(self, admin: Identity) -> str:
        """The cookie that holds a sign-in link's sign-in until its confirmation page is answered: the admin and
        their Clerk session (never the token, which stays out of every later request and page) and a CSRF token
        of its own, which the confirmation form repeats. Valid :data:`PENDING_S`."""
        return self._pending.dumps({"sub": admin.clerk_id, "sid": admin.session_id,
                                    "csrf": secrets.token_urlsafe(24)})

    def pending(self, cookie: str | None) -> Identity | None:
        """The sign-in a :meth:`pending_sign_in` cookie waits to confirm (its ``csrf`` the form's token), or None
        (none, forged, or older than :data:`PENDING_S`). Nothing is checked against Clerk or the database here:
        :meth:`admin_session` and :meth:`confirm_admin` do that when it is confirmed."""
        if not cookie:
            return None
        try:
            data: Any = self._pending.loads(cookie, max_age=PENDING_S)
        except BadSignature:  # includes SignatureExpired
            return None
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str) and data[k]
                                                 for k in ("sub", "sid", "csrf")):
            return None
        return Identity(ADMIN, data["sub"], data["csrf"], session_id=data["sid"])

    def admin_session(self, clerk_id: str, session_id: str) -> Identity:
        """A console session for an admin, until the Clerk session ``session_id`` is revoked, ended or
        removed, or ``max_age_s`` has passed."""
        ended = self._ended(session_id)  # the deny list may not have seen a fresh revocation yet
        if ended is not None:
            raise ended
        return self._mint(ADMIN, clerk_id, session_id)

    def _mint(self, kind: str, clerk_id: str | None, session_id: str | None) -> Identity:
        """A console session; the caller records its sign-in (``console.login``, with ``sid=session_id`` for
        an admin: :meth:`_unrecorded`) before it sets the cookie."""
        csrf, nonce = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        cookie = self._sessions.dumps({"k": kind, "sub": clerk_id, "sid": session_id, "csrf": csrf, "n": nonce,
                                       "iat": self.clock()})
        return Identity(kind, clerk_id, csrf, new_cookie=cookie, session_id=session_id,
                        session_digest=_digest(nonce) if kind == ADMIN else None)

    def _session(self, cookie: str | None) -> tuple[str, str | None, str, str | None, float, str | None] | None:
        """kind, Clerk id, CSRF token, Clerk session id, when it was opened (this clock; -inf for
        sessions minted before it was recorded: any sign-out of the identity ends them), its secret (``n``)."""
        if not cookie:
            return None
        try:
            data: Any = self._sessions.loads(cookie, max_age=self.max_age_s)
        except BadSignature:  # includes SignatureExpired
            return None
        if not isinstance(data, dict) or data.get("k") not in (OPERATOR, ADMIN) or not data.get("csrf"):
            return None
        sid, iat, nonce = data.get("sid"), data.get("iat"), data.get("n")
        issued = float(iat) if isinstance(iat, int | float) and not isinstance(iat, bool) else float("-inf")
        return (str(data["k"]), data.get("sub"), str(data["csrf"]), sid if isinstance(sid, str) else None, issued,
                nonce if isinstance(nonce, str) else None)

    # -- the login form's own CSRF token (double submit: cookie + hidden field) --------------------
    def login_token(self) -> str:
        return self._login.dumps(secrets.token_urlsafe(16))

    def check_login_token(self, cookie: str | None, field: str | None) -> bool:
        if not cookie or not field or not hmac.compare_digest(cookie.encode(), field.encode()):
            return False
        try:
            self._login.loads(field, max_age=3600)
        except BadSignature:
            return False
        return True


class _Serializer(URLSafeTimedSerializer):
    """itsdangerous' timed serializer on an injected clock (the tests' own, not the wall's)."""

    def __init__(self, secret: bytes, *, salt: str, clock: Callable[[], float]) -> None:
        class Signer(TimestampSigner):
            def get_timestamp(self) -> int:  # signed into a value, and what loads() measures its age by
                return int(clock())

        super().__init__(secret, salt=salt, signer=Signer)


def check_csrf(identity: Identity, submitted: str | None) -> bool:
    """A cookie session's form must carry its CSRF token; Bearer callers have none to forge."""
    if identity.csrf is None:
        return True
    return submitted is not None and hmac.compare_digest(submitted.encode(), identity.csrf.encode())


def _digest(nonce: str) -> str:
    """What a sign-in's audit row keeps of its cookie's secret (shown on the audit page: a digest, never the
    secret, which alone lets a cookie pass :meth:`ConsoleAccess._unrecorded`)."""
    return hashlib.sha256(b"clerk-sync console session\x00" + nonce.encode()).hexdigest()


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The ``Authorization: Bearer`` value, or None."""
    value = headers.get("authorization", "")
    if value[:7].lower() == "bearer " and value[7:].strip():
        return value[7:].strip()
    return None
