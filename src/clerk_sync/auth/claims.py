"""Session-token claims: the :class:`Auth` they describe, and the :class:`ClaimsValidator` that checks them.

Step two of verification (step one, the signature, is :mod:`clerk_sync.auth.sessions`). Kept apart as
in joserfc's claims registry: a validator is one typed object built once from settings, with an
injectable clock, so the policy a deployment runs is visible in one place and table-testable.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from clerk_sync._limits import show
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
        if claims.get("act") is not None and not isinstance(claims["act"], dict):  # else read as "not impersonated"
            raise TokenMalformed("claim 'act' (the impersonating actor) is not an object")

    def validate_live(self, auth: Auth, now: float) -> None:
        """``exp``/``nbf``/``iat`` against ``now`` with the leeway, and a pending ``sts``."""
        leeway = self.leeway_s
        if auth.expires_at <= now - leeway:
            raise TokenExpired("session token expired")
        nbf, iat = auth.claims.get("nbf"), auth.claims.get("iat")
        if isinstance(nbf, int | float) and nbf > now + leeway:
            raise TokenNotYetValid("session token not valid yet (nbf)")
        if isinstance(iat, int | float) and iat > now + leeway:
            raise TokenIssuedInFuture("session token issued in the future (iat)")
        if auth.status == "pending" and self.pending_is_signed_out:
            raise SessionPending("session is pending (sts): treated as signed out")


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
