"""Clerk session tokens, verified locally: no network call per request.

Two explicit steps (see joserfc/PyJWT): (1) the signature, with the algorithm allow-listed to RS256
and the key chosen by ``kid`` (so ``alg: none`` and HS256-signed-with-the-public-key are refused
before any key is touched); (2) the claims, by a :class:`SessionPolicy` with an injectable clock.
A token whose signature already verified is remembered until its ``exp``; expiry, revocation and
``sts`` are still checked on every call.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import jwt
from anyio import to_thread

from clerk_sync.errors import (
    ConfigError,
    SessionPending,
    SessionRevoked,
    TokenAlgorithmNotAllowed,
    TokenAuthorizedPartyInvalid,
    TokenClaimMissing,
    TokenExpired,
    TokenIssuedInFuture,
    TokenIssuerInvalid,
    TokenMalformed,
    TokenMissing,
    TokenNotYetValid,
    TokenSignatureInvalid,
)
from clerk_sync.config import Settings
from clerk_sync.jwks import JWKSKeySource, KeySource, NeedsFetch, StaticKeySource

__all__ = [
    "ALLOWED_ALGORITHMS",
    "Auth",
    "RevocationCheck",
    "SessionPolicy",
    "SessionVerifier",
    "auth_from_claims",
    "token_from_request",
    "verifier_from_settings",
]

ALLOWED_ALGORITHMS = ("RS256",)
_DECODE_OPTIONS: Any = {
    "verify_signature": True,
    "verify_exp": False,  # time claims are checked by SessionPolicy with its own clock
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "require": [],
}


@dataclass(frozen=True, slots=True)
class Auth:
    """Who is calling: v1 and v2 session claims normalised into one shape."""

    user_id: str
    session_id: str
    expires_at: int
    version: int = 1
    status: str = "active"
    org_id: str | None = None
    org_role: str | None = None
    org_slug: str | None = None
    org_permissions: tuple[str, ...] = ()
    actor: Mapping[str, Any] | None = None
    claims: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_impersonated(self) -> bool:
        return self.actor is not None

    @property
    def actor_id(self) -> str | None:
        """The impersonating admin's user id (``act.sub``)."""
        sub = self.actor.get("sub") if self.actor else None
        return sub if isinstance(sub, str) else None

    @property
    def role(self) -> str | None:
        """The app role from the ``metadata`` custom claim (``{{user.public_metadata}}``), if configured."""
        metadata = self.claims.get("metadata")
        role = metadata.get("role") if isinstance(metadata, dict) else None
        return role if isinstance(role, str) else None


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """The claim checks; build once from settings."""

    issuer: str | None = None
    authorized_parties: frozenset[str] | None = None
    leeway_s: float = 5.0
    pending_is_signed_out: bool = True


class RevocationCheck(Protocol):
    """A deny list of session ids (fed by session.revoked/ended/removed webhooks)."""

    def is_revoked(self, session_id: str) -> bool: ...


def token_from_request(headers: Mapping[str, str], cookies: Mapping[str, str]) -> str:
    """``Authorization: Bearer`` first (cross-origin), else the ``__session`` cookie (same-origin)."""
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer " and auth[7:].strip():
        return auth[7:].strip()
    for name, value in cookies.items():
        if (name == "__session" or name.startswith("__session_")) and value:
            return value
    raise TokenMissing("no session token (Authorization: Bearer or __session cookie)")


class SessionVerifier:
    """Verifies Clerk session JWTs against a key source and a policy."""

    def __init__(
        self,
        keys: KeySource,
        policy: SessionPolicy,
        *,
        revocations: RevocationCheck | None = None,
        now: Callable[[], float] = time.time,
        cache_size: int = 10_000,
    ) -> None:
        self.keys = keys
        self.policy = policy
        self.revocations = revocations
        self._now = now
        self._cache: OrderedDict[str, Auth] = OrderedDict()
        self._cache_size = cache_size

    def verify(self, token: str, *, allow_fetch: bool = True) -> Auth:
        """Return the :class:`Auth` of a valid token; raise a :class:`TokenError` leaf otherwise."""
        auth = self._cache.get(token)
        if auth is None:
            auth = self._verify_signature_and_static_claims(token, allow_fetch)
            self._remember(token, auth)
        self._check_dynamic(auth)
        return auth

    async def averify(self, token: str) -> Auth:
        """Async face: verifies on the loop; only a needed JWKS fetch runs in a worker thread."""
        try:
            return self.verify(token, allow_fetch=False)
        except NeedsFetch:
            return await to_thread.run_sync(self.verify, token)

    def _verify_signature_and_static_claims(self, token: str, allow_fetch: bool) -> Auth:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise TokenMalformed(f"not a JWT: {exc}") from None
        if header.get("alg") not in ALLOWED_ALGORITHMS:
            raise TokenAlgorithmNotAllowed(f"alg {header.get('alg')!r} is not allowed (RS256 only)")
        key = self.keys.get(header.get("kid"), allow_fetch=allow_fetch)
        try:
            claims = jwt.decode(token, key, algorithms=list(ALLOWED_ALGORITHMS), options=_DECODE_OPTIONS)
        except jwt.InvalidSignatureError:
            raise TokenSignatureInvalid("signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise TokenMalformed(f"cannot decode token: {exc}") from None
        self._check_static(claims)
        return auth_from_claims(claims)

    def _check_static(self, claims: Mapping[str, Any]) -> None:
        for name in ("sub", "sid", "exp"):
            if not claims.get(name):
                raise TokenClaimMissing(f"claim {name!r} is missing")
        policy = self.policy
        if policy.issuer is not None and claims.get("iss") != policy.issuer:
            raise TokenIssuerInvalid(f"iss {claims.get('iss')!r} is not {policy.issuer!r}")
        azp = claims.get("azp")
        if policy.authorized_parties is not None and azp not in policy.authorized_parties:
            raise TokenAuthorizedPartyInvalid(f"azp {azp!r} is not an authorized party (CLERK_AUTHORIZED_PARTIES)")
        for name in ("exp", "nbf", "iat"):
            if name in claims and not isinstance(claims[name], int | float):
                raise TokenMalformed(f"claim {name!r} is not a number")

    def _check_dynamic(self, auth: Auth) -> None:
        now, leeway = self._now(), self.policy.leeway_s
        if auth.expires_at <= now - leeway:
            raise TokenExpired("session token expired")
        nbf, iat = auth.claims.get("nbf"), auth.claims.get("iat")
        if isinstance(nbf, int | float) and nbf > now + leeway:
            raise TokenNotYetValid("session token not valid yet (nbf)")
        if isinstance(iat, int | float) and iat > now + leeway:
            raise TokenIssuedInFuture("session token issued in the future (iat)")
        if auth.status == "pending" and self.policy.pending_is_signed_out:
            raise SessionPending("session is pending (sts): treated as signed out")
        if self.revocations is not None and self.revocations.is_revoked(auth.session_id):
            raise SessionRevoked("session was revoked")

    def _remember(self, token: str, auth: Auth) -> None:
        self._cache[token] = auth
        if len(self._cache) > self._cache_size:
            self._evict()

    def _evict(self) -> None:
        now = self._now()
        for token in [t for t, a in self._cache.items() if a.expires_at <= now]:
            del self._cache[token]
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


def verifier_from_settings(settings: Settings, *, http: httpx.Client | None = None,
                           revocations: RevocationCheck | None = None) -> SessionVerifier:
    """``CLERK_JWT_KEY`` (networkless) if set, else JWKS from ``CLERK_JWKS_URL`` or ``CLERK_API_URL``/v1/jwks."""
    policy = SessionPolicy(issuer=settings.clerk_issuer, authorized_parties=settings.authorized_parties(),
                           leeway_s=settings.session_leeway_s)
    if settings.clerk_jwt_key is not None:
        keys: KeySource = StaticKeySource(settings.clerk_jwt_key.get_secret_value())
    else:
        headers = {}
        url = settings.clerk_jwks_url
        if url is None:
            if settings.clerk_secret_key is None:
                raise ConfigError(
                    "set CLERK_JWT_KEY (Dashboard -> API keys -> JWKS Public Key) or CLERK_SECRET_KEY "
                    "(to fetch the JWKS from the Backend API) to verify session tokens"
                )
            url = settings.clerk_api_url.rstrip("/") + "/v1/jwks"
            headers["Authorization"] = f"Bearer {settings.clerk_secret_key.get_secret_value()}"
        keys = JWKSKeySource(url, client=http or httpx.Client(), headers=headers)
    return SessionVerifier(keys, policy, revocations=revocations)


def auth_from_claims(claims: Mapping[str, Any]) -> Auth:
    """Normalise v1 (``org_id``/``org_role``...) and v2 (``o`` + ``fea``/``fpm``) claims."""
    version = int(claims.get("v", 1)) if isinstance(claims.get("v", 1), int) else 1
    org = claims.get("o") if version >= 2 else None
    actor = claims.get("act")
    common: dict[str, Any] = {
        "user_id": str(claims["sub"]),
        "session_id": str(claims["sid"]),
        "expires_at": int(claims["exp"]),
        "version": version,
        "status": str(claims.get("sts") or "active"),
        "actor": actor if isinstance(actor, dict) else None,
        "claims": dict(claims),
    }
    if isinstance(org, dict):
        role = org.get("rol")
        return Auth(
            **common,
            org_id=_str(org.get("id")),
            org_slug=_str(org.get("slg")),
            org_role=f"org:{role}" if isinstance(role, str) and not role.startswith("org:") else _str(role),
            org_permissions=_v2_permissions(org, claims.get("fea")),
        )
    perms = claims.get("org_permissions")
    return Auth(
        **common,
        org_id=_str(claims.get("org_id")),
        org_slug=_str(claims.get("org_slug")),
        org_role=_str(claims.get("org_role")),
        org_permissions=tuple(p for p in perms if isinstance(p, str)) if isinstance(perms, list) else (),
    )


def _v2_permissions(org: Mapping[str, Any], features: object) -> tuple[str, ...]:
    """``fpm`` i-th int is a bitmap (LSB first) over ``per`` for the i-th org-scoped feature in ``fea``."""
    per = [p for p in str(org.get("per") or "").split(",") if p]
    fpm = [int(x) for x in str(org.get("fpm") or "").split(",") if x.strip().isdigit()]
    org_features = [f[2:] for f in str(features or "").split(",") if f.startswith("o:")]
    out = []
    for feature, bitmap in zip(org_features, fpm, strict=False):
        out.extend(f"org:{feature}:{p}" for bit, p in enumerate(per) if bitmap >> bit & 1)
    return tuple(out)


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
