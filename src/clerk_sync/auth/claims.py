"""Session-token claims: the :class:`Auth` they describe, and the :class:`ClaimsValidator` that checks them.

Step two of verification (step one, the signature, is :mod:`clerk_sync.auth.sessions`). Kept apart as
in joserfc's claims registry: a validator is one typed object built once from settings, with an
injectable clock, so the policy a deployment runs is visible in one place and table-testable.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import structlog

from clerk_sync._limits import CLERK_ID_CHARS, show
from clerk_sync.errors import (
    SessionPending,
    TokenAuthorizedPartyInvalid,
    TokenClaimMissing,
    TokenExpired,
    TokenIssuedInFuture,
    TokenIssuerInvalid,
    TokenMalformed,
    TokenNotYetValid,
)

__all__ = ["Auth", "ClaimsValidator", "auth_from_claims", "normalize_claims"]

_REQUIRED = ("sub", "sid", "exp")

log = structlog.get_logger("clerk_sync.auth")


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
class ClaimsValidator:
    """The claim checks of a deployment; build once from settings.

    ``validate_static`` runs once per token (its result is cached with the signature);
    ``validate_live`` runs on every request, since time passes and ``sts`` decides access.
    """

    issuer: str | None = None
    authorized_parties: frozenset[str] | None = None
    leeway_s: float = 5.0
    pending_is_signed_out: bool = True

    def validate_static(self, claims: Mapping[str, Any]) -> None:
        """Required claims, their types, ``iss`` and ``azp``: what cannot change while the token lives."""
        for name in _REQUIRED:
            if not claims.get(name):
                raise TokenClaimMissing(f"claim {name!r} is missing")
        # sub/jti as PyJWT's decode checked them; sid too: a number or list would be str()-ed into a session id
        # no deny list holds, so the revocation check could never match it
        for name in ("sub", "sid", "jti"):
            if name in claims and not isinstance(claims[name], str):
                raise TokenMalformed(f"claim {name!r} is not a string")
        if claims.get("azp") is not None and not isinstance(claims["azp"], str):  # a set lookup below
            raise TokenMalformed("claim 'azp' is not a string")
        if self.issuer is not None and claims.get("iss") != self.issuer:
            raise TokenIssuerInvalid(f"iss {show(claims.get('iss'))} is not {self.issuer!r}")
        azp = claims.get("azp")
        if self.authorized_parties is not None and azp not in self.authorized_parties:
            raise TokenAuthorizedPartyInvalid(f"azp {show(azp)} is not an authorized party (CLERK_AUTHORIZED_PARTIES)")
        for name in ("exp", "nbf", "iat"):  # finite: NaN passes every comparison (nbf) or fails int() (exp)
            value = claims.get(name)
            if name in claims and (not isinstance(value, int | float) or isinstance(value, bool)
                                   or (isinstance(value, float) and not math.isfinite(value))):
                raise TokenMalformed(f"claim {name!r} is not a number")
        act = claims.get("act")
        if act is not None and not isinstance(act, dict):  # else read as "not impersonated"
            raise TokenMalformed("claim 'act' (the impersonating actor) is not an object")
        # An actor with no user id would pass as impersonated with no one to check or audit (Clerk's always names
        # the impersonator in ``act.sub``)
        if isinstance(act, dict) and (not isinstance(act.get("sub"), str) or not act["sub"]):
            raise TokenMalformed("claim 'act' (the impersonating actor) names no user id in 'sub'")
        # Clerk ids have at most CLERK_ID_CHARS, as every id column: an impersonator's longer id failed each of
        # its requests' audit rows on PostgreSQL and MariaDB (503, retried in vain), a longer session id could
        # never be on the deny list
        for name, value in (("sub", claims["sub"]), ("sid", claims["sid"]), ("act.sub", act and act["sub"])):
            if isinstance(value, str) and len(value) > CLERK_ID_CHARS:
                raise TokenMalformed(f"claim {name!r} is {len(value)} characters; Clerk ids have at most "
                                     f"{CLERK_ID_CHARS}")

    def validate_live(self, auth: Auth, now: float) -> None:
        """``exp``/``nbf``/``iat`` against ``now`` with the leeway, and a pending ``sts``.

        The refusals say by how many seconds, and point to this host's clock: a host whose clock is ahead
        of Clerk's by more than a token's lifetime (60 s by default) plus the leeway refuses every fresh
        token as expired; one behind by more than the leeway refuses them as not valid yet (``nbf``,
        ``iat``), which is also logged (``session_token_from_the_future``, at most once a minute)."""
        leeway = self.leeway_s
        if auth.expires_at <= now - leeway:
            iat = auth.claims.get("iat")
            lifetime = f" (it was valid for {_secs(_gap(auth.expires_at, iat))})" if _number(iat) else ""
            raise TokenExpired(f"session token expired {_secs(_gap(now, auth.expires_at))} ago{lifetime}, beyond the "
                               f"{_secs(leeway)} leeway: send a fresh one (Clerk's front end refreshes it). If "
                               f"freshly issued tokens are refused so too, this host's clock is ahead: sync it "
                               f"(NTP); CLERK_SYNC_SESSION_LEEWAY_S (at most 300) widens the tolerance meanwhile")
        nbf, iat = auth.claims.get("nbf"), auth.claims.get("iat")
        for name, value, error in (("nbf", nbf, TokenNotYetValid), ("iat", iat, TokenIssuedInFuture)):
            if _number(value) and value > now + leeway:
                ahead = _secs(_gap(value, now))
                _warn_skew(name, _gap(value, now), leeway)
                what = "not valid yet" if name == "nbf" else "issued in the future"
                raise error(f"session token {what}: its {name} is {ahead} ahead of this host's clock, beyond the "
                            f"{_secs(leeway)} leeway: this host's clock is likely behind Clerk's: sync it (NTP); "
                            f"CLERK_SYNC_SESSION_LEEWAY_S (at most 300) widens the tolerance meanwhile")
        if auth.status == "pending" and self.pending_is_signed_out:
            raise SessionPending("session is pending (sts): treated as signed out")


def _number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _gap(later: float, earlier: float) -> float:
    """``later - earlier`` in seconds; a claim too large for a float (a forged ``10**400``) is infinitely far."""
    try:
        return float(later) - float(earlier)
    except OverflowError:
        return math.inf if later > earlier else -math.inf


def _secs(seconds: float) -> str:
    if math.isinf(seconds):
        return "more than a lifetime"
    return f"{seconds:.0f} s" if abs(seconds) >= 10 else f"{seconds:.1f} s".replace(".0 s", " s")


_skew_warned: list[float] = []  # when this process last logged session_token_from_the_future (monotonic)
_skew_lock = threading.Lock()
_SKEW_WARN_EVERY_S = 60.0


def _warn_skew(claim: str, ahead_s: float, leeway_s: float) -> None:
    """One WARNING a minute at most: a token stamped in this host's future says its clock is behind
    (the 401s alone tell an operator nothing: the clients see them)."""
    at = time.monotonic()
    with _skew_lock:
        if _skew_warned and at - _skew_warned[0] < _SKEW_WARN_EVERY_S:
            return
        _skew_warned[:] = [at]
    log.warning("session_token_from_the_future", claim=claim, ahead_s=round(ahead_s, 1), leeway_s=leeway_s,
                problem="a session token is stamped in this host's future: its clock is likely behind Clerk's, "
                        "and every fresh token is refused (401) while it is",
                fix="sync this host's clock (NTP); CLERK_SYNC_SESSION_LEEWAY_S (at most 300) widens the "
                    "tolerance meanwhile")


def auth_from_claims(claims: Mapping[str, Any]) -> Auth:
    """Normalise v1 (``org_id``/``org_role``...) and v2 (``o`` + ``fea``/``fpm``) claims.

    A v2 token (``v`` >= 2) has its active organization in ``o`` only, as Clerk's own parsers read it
    (``@clerk/shared`` jwtPayloadParser, the Python SDK): a v2 token without ``o`` has no active organization,
    whatever top-level ``org_id``/``org_role``/``org_permissions`` it carries. Those names are v1's default
    claims but not v2's, so in a v2 token they can only be custom session claims, perhaps built from data the
    user writes (``unsafe_metadata``): never an organization role or permissions."""
    return normalize_claims(dict(claims))


def normalize_claims(claims: dict[str, Any]) -> Auth:
    """:func:`auth_from_claims` for a dict the caller hands over (a freshly parsed payload: no copy)."""
    v = claims.get("v", 1)
    version = int(v) if isinstance(v, int) else 1
    if version >= 2:  # ``o`` only (see auth_from_claims): no fallback to v1's top-level claims
        org = claims.get("o")
        org_id: str | None = None
        org_slug: str | None = None
        org_role: str | None = None
        permissions: tuple[str, ...] = ()
        if isinstance(org, dict):
            role = org.get("rol")
            org_id, org_slug = _str(org.get("id")), _str(org.get("slg"))
            org_role = f"org:{role}" if isinstance(role, str) and not role.startswith("org:") else _str(role)
            permissions = _v2_permissions(
                str(org.get("per") or ""), str(org.get("fpm") or ""), str(claims.get("fea") or "")
            )
    else:
        org_id, org_slug = _str(claims.get("org_id")), _str(claims.get("org_slug"))
        org_role = _str(claims.get("org_role"))
        perms = claims.get("org_permissions")
        permissions = tuple(p for p in perms if isinstance(p, str)) if isinstance(perms, list) else ()
    actor = claims.get("act")
    return Auth(
        user_id=str(claims["sub"]),
        session_id=str(claims["sid"]),
        expires_at=int(claims["exp"]),
        version=version,
        status=str(claims.get("sts") or "active"),
        org_id=org_id,
        org_role=org_role,
        org_slug=org_slug,
        org_permissions=permissions,
        actor=actor if isinstance(actor, dict) else None,
        claims=claims,
    )


@functools.lru_cache(maxsize=1024)
def _v2_permissions(per: str, fpm: str, features: str) -> tuple[str, ...]:
    """``fpm`` i-th int is a bitmap (LSB first) over ``per`` for the i-th org-scoped feature in ``fea``.

    As Clerk's own parser (``@clerk/shared`` jwtPayloadParser, splitByScope): an org-scoped feature is
    ``o:``, or ``ou:``/``uo:`` (user and org); every ``fpm`` entry keeps its place, one that is not a
    decimal grants nothing (skipping it would hand the next feature's permissions to this one), and a
    ``fea`` element without a scope (which Clerk's parser refuses) grants no permission at all.
    Memoised on the three strings: every member of an org with the same role carries the same ones.
    """
    elements = [e.strip() for e in features.split(",") if e.strip()]
    if any(":" not in e for e in elements):
        return ()
    org_features = [e.partition(":")[2] for e in elements if e.partition(":")[0] in _ORG_SCOPES]
    names = [p.strip() for p in per.split(",")] if per else []
    bitmaps = [int(x) if (x := entry.strip()).isdecimal() and x.isascii() else 0 for entry in fpm.split(",")] \
        if fpm else []
    out: list[str] = []
    for feature, bitmap in zip(org_features, bitmaps, strict=False):
        out.extend(f"org:{feature}:{p}" for bit, p in enumerate(names) if bitmap >> bit & 1)
    return tuple(out)


_ORG_SCOPES = frozenset({"o", "ou", "uo"})  # Clerk's splitByScope: "ou"/"uo" are both user and org


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
