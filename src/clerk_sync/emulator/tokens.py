"""Signing keys, JWKS and Clerk session tokens (v2 claims, or v1's for an instance configured so).

Tokens are RS256 JWTs signed with a 2048-bit RSA key whose ``kid`` is published in the
JWKS.  Rotation adds a new current key and keeps retired keys in the JWKS for a grace
period, so verifiers that cache keys by ``kid`` keep working through a rotation.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

__all__ = [
    "JWT_TEMPLATE_CATEGORY",
    "SESSION_TOKEN_CATEGORY",
    "KeyRing",
    "SessionClaimsInput",
    "org_claims",
    "render_template",
    "session_claims",
    "template_claims",
]

JSON = dict[str, Any]
#: ``cat`` header values Clerk puts on session tokens and on JWT-template tokens.
SESSION_TOKEN_CATEGORY = "cl_B7d4PD111AAA"  # noqa: S105 (a public tag, not a secret)
JWT_TEMPLATE_CATEGORY = "cl_B7d4PD222AAA"
_SHORTCODE = re.compile(r"\{\{\s*([a-zA-Z0-9_.]+)\s*\}\}")


@dataclass
class _Key:
    kid: str
    private_key: rsa.RSAPrivateKey
    retired_at: float | None = None


class KeyRing:
    """The instance's RSA signing keys: one current, retired ones kept for ``grace_s``."""

    def __init__(self, instance_id: str, *, grace_s: float = 3600.0, clock: Callable[[], float] = time.time) -> None:
        self._instance_id = instance_id
        self._grace_s = grace_s
        self._clock = clock
        self._lock = threading.Lock()
        self._generation = 0
        self._keys: list[_Key] = [self._new_key()]

    def _new_key(self) -> _Key:
        # The first key's kid is the instance id, as Clerk's is; rotated keys get a suffix.
        kid = self._instance_id if self._generation == 0 else f"{self._instance_id}_{self._generation}"
        self._generation += 1
        return _Key(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @property
    def current_kid(self) -> str:
        with self._lock:
            return self._keys[-1].kid

    def rotate(self, *, keep_kid: bool = False) -> str:
        """Make a fresh key current; the previous one stays published for the grace period. ``keep_kid``: the
        new key takes the current kid (Clerk's kid is the instance id) and replaces the key published under it
        at once (one key per kid: tokens the old one signed stop verifying)."""
        new_key = self._new_key()
        with self._lock:
            now = self._clock()
            if keep_kid:
                new_key.kid = self._keys[-1].kid
                self._keys = [k for k in self._keys if k.kid != new_key.kid]
            for key in self._keys:
                key.retired_at = key.retired_at or now
            self._keys.append(new_key)
            return new_key.kid

    def _published(self) -> list[_Key]:
        now = self._clock()
        self._keys = [k for k in self._keys if k.retired_at is None or now - k.retired_at < self._grace_s]
        return list(self._keys)

    def jwks(self) -> JSON:
        """The public JWKS document (current key first)."""
        with self._lock:
            keys = self._published()
        return {"keys": [self._public_jwk(k) for k in reversed(keys)]}

    @staticmethod
    def _public_jwk(key: _Key) -> JSON:
        jwk = RSAAlgorithm.to_jwk(key.private_key.public_key(), as_dict=True)
        return {"use": "sig", "kty": "RSA", "kid": key.kid, "alg": "RS256", "n": jwk["n"], "e": jwk["e"]}

    def public_key_pem(self, kid: str | None = None) -> str:
        """PEM of a published key (the current one by default), for networkless verification."""
        with self._lock:
            keys = self._published()
        key = next((k for k in keys if kid is None or k.kid == kid), keys[-1])
        pem = key.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem.decode("ascii")

    def sign(self, claims: JSON, *, category: str = SESSION_TOKEN_CATEGORY) -> str:
        """Sign ``claims`` with the current key (RS256, ``kid`` and ``cat`` in the header)."""
        with self._lock:
            key = self._keys[-1]
        headers = {"kid": key.kid, "typ": "JWT", "cat": category}
        return jwt.encode(claims, key.private_key, algorithm="RS256", headers=headers)


def _lookup(context: Mapping[str, Any], path: str) -> Any:
    value: Any = context
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def render_template(template: Any, context: Mapping[str, Any]) -> Any:
    """Fill Clerk shortcodes: a string that is exactly one shortcode keeps the native JSON type;
    shortcodes inside longer strings interpolate as text; unknown shortcodes give ``null``."""
    if isinstance(template, Mapping):
        return {k: render_template(v, context) for k, v in template.items()}
    if isinstance(template, list):
        return [render_template(v, context) for v in template]
    if not isinstance(template, str):
        return template
    whole = _SHORTCODE.fullmatch(template.strip())
    if whole:
        return _lookup(context, whole.group(1))

    def text(match: re.Match[str]) -> str:
        value = _lookup(context, match.group(1))
        return "" if value is None else str(value)

    return _SHORTCODE.sub(text, template)


def org_claims(org_id: str, slug: str, role: str, permissions: tuple[str, ...]) -> tuple[JSON, str | None]:
    """The v2 ``o`` claim and the ``fea`` claim for an active organization.

    Only custom permissions (``org:<feature>:<permission>``, not ``org:sys_*``) are encoded:
    ``fea`` lists features, ``o.per`` permission names, and ``o.fpm`` one bitmask per feature
    (bit j set = the j-th name in ``per`` is granted for that feature).
    """
    features: list[str] = []
    names: list[str] = []
    grants: list[tuple[str, str]] = []
    for permission in permissions:
        parts = permission.split(":")
        if len(parts) != 3 or parts[1].startswith("sys_"):
            continue
        feature, name = parts[1], parts[2]
        features += [feature] if feature not in features else []
        names += [name] if name not in names else []
        grants.append((feature, name))
    claim: JSON = {"id": org_id, "rol": role.removeprefix("org:"), "slg": slug}
    if not features:
        return claim, None
    masks = [sum(1 << names.index(n) for f, n in grants if f == feature) for feature in features]
    claim["per"] = ",".join(names)
    claim["fpm"] = ",".join(str(m) for m in masks)
    return claim, ",".join(f"o:{f}" for f in features)


@dataclass(frozen=True)
class SessionClaimsInput:
    """What a session token says, gathered by the caller from the store."""

    user: JSON
    session_id: str
    issuer: str
    authorized_party: str | None
    lifetime_s: int
    jti: str
    org: JSON | None = None
    membership_role: str | None = None
    permissions: tuple[str, ...] = ()
    actor: JSON | None = None
    pending: bool = False
    template: Mapping[str, Any] | None = None
    version: int = 2  # the instance's session token claims version (1 or 2)


def template_context(user: JSON, org: JSON | None, role: str | None, actor: JSON | None) -> JSON:
    """Values Clerk shortcodes can reach (``user.*``, ``org.*``, ``session.*``)."""
    emails = {e["id"]: e["email_address"] for e in user.get("email_addresses", [])}
    names = [user.get("first_name"), user.get("last_name")]
    user_ctx = {k: v for k, v in user.items() if k != "private_metadata"}
    user_ctx["primary_email_address"] = emails.get(user.get("primary_email_address_id") or "")
    phones = {p["id"]: p["phone_number"] for p in user.get("phone_numbers", [])}
    user_ctx["primary_phone_address"] = phones.get(user.get("primary_phone_number_id") or "")  # Clerk's name
    user_ctx["full_name"] = " ".join(n for n in names if n) or None
    org_ctx = None
    if org is not None:
        org_ctx = {k: v for k, v in org.items() if k != "private_metadata"} | {"role": role}
    return {"user": user_ctx, "org": org_ctx, "session": {"actor": actor}}


def _v1_org_claims(data: SessionClaimsInput) -> JSON:
    """v1's organization claims (Clerk docs, session tokens, version 1 tab): the role with its ``org:`` prefix,
    and the custom permissions only (system ``org:sys_*`` ones never reach session claims)."""
    if data.org is None or data.membership_role is None:
        return {}
    custom = [p for p in data.permissions if len(p.split(":")) == 3 and not p.split(":")[1].startswith("sys_")]
    return {"org_id": data.org["id"], "org_slug": data.org["slug"], "org_role": data.membership_role,
            "org_permissions": custom}


def session_claims(data: SessionClaimsInput, now: int) -> JSON:
    """Claims of a session token minted at ``now`` (unix seconds): v2's, or v1's when ``data.version`` is 1
    (no ``v``, ``sts``, ``jti``, ``o`` or ``fea``; the organization in top-level ``org_*`` claims)."""
    claims: JSON = {}
    if data.template:
        context = template_context(data.user, data.org, data.membership_role, data.actor)
        claims.update(render_template(dict(data.template), context))
    claims.update(
        {
            "iat": now,
            "nbf": now - 10,
            "exp": now + data.lifetime_s,
            "iss": data.issuer,
            "sub": data.user["id"],
            "sid": data.session_id,
            "jti": data.jti,
            "v": 2,
            "fva": [0, -1],
        }
    )
    if data.authorized_party:
        claims["azp"] = data.authorized_party
    if data.version == 1:
        for v2_only in ("jti", "v"):
            del claims[v2_only]
        claims.update(_v1_org_claims(data))
        if data.actor:
            claims["act"] = dict(data.actor)
        return claims
    if data.org is not None and data.membership_role is not None:
        claims["o"], features = org_claims(data.org["id"], data.org["slug"], data.membership_role, data.permissions)
        if features:
            claims["fea"] = features
    if data.actor:
        claims["act"] = dict(data.actor)
    claims["sts"] = "pending" if data.pending else "active"  # a v2 default claim: present on every session token
    return claims


def template_claims(template: Mapping[str, Any], data: SessionClaimsInput, now: int) -> JSON:
    """Claims of a JWT-template token: the rendered template plus the standard claims."""
    context = template_context(data.user, data.org, data.membership_role, data.actor)
    claims: JSON = render_template(dict(template), context)
    claims.update(
        {
            "iat": now,
            "nbf": now - 5,
            "exp": now + data.lifetime_s,
            "iss": data.issuer,
            "sub": data.user["id"],
            "jti": data.jti,
        }
    )
    if data.authorized_party:
        claims["azp"] = data.authorized_party
    return claims
