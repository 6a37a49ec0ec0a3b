"""Prototype for bench/auth.py: the fix suggested for ``src/clerk_sync/sessions.py``, shown as a subclass.

Two changes, nothing else (same claim checks, same ``Auth``, same cache semantics):

1. **Parse the token once, and only as much as needed.** ``SessionVerifier`` calls ``jwt.get_unverified_header`` and then
   ``jwt.decode``; in PyJWT 2.14+ each runs ``PyJWS._load``, which base64url-decodes *all three*
   segments, each with a per-character Python generator (the GHSA-hxm8-2xgr-2p9m alphabet check) and
   a decode/re-encode round trip. Here the segments are split once, checked against the same alphabet
   with one compiled regex (C speed), decoded once, and the RS256 signature goes to PyJWT's own
   ``RSAAlgorithm(SHA256).verify`` (a thin wrapper over ``cryptography``), so the crypto still comes
   from the library. The header check is memoised per header segment (Clerk signs every token of an
   instance with the same header), and the payload, being signed bytes, is decoded after the
   signature holds without re-running the strict checks. The strict checks themselves are a compiled
   regex plus a last-character test instead of a decode/re-encode round trip. v2 org permissions
   (``fpm`` bitmaps over ``per``) are decoded once per distinct (per, fpm, fea) strings.
2. **O(1) cache eviction.** ``SessionVerifier._evict`` scans the whole cache for expired entries on
   every insert once it is full: with ``cache_size`` live tokens, each first-seen token pays a
   10k-entry scan. Here expired entries are dropped from the oldest end and the rest is FIFO
   (Clerk tokens share one lifetime, so insertion order is close to expiry order).
"""

from __future__ import annotations

import base64
import functools
import json
import re
from typing import Any

from jwt.algorithms import RSAAlgorithm

from clerk_sync.errors import TokenAlgorithmNotAllowed, TokenMalformed, TokenSignatureInvalid
from clerk_sync.sessions import ALLOWED_ALGORITHMS, Auth, SessionVerifier, _str, _v2_permissions

__all__ = ["OnePassVerifier"]

_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_SEGMENT = re.compile(rb"[A-Za-z0-9_-]*")  # RFC 7515 base64url, no padding
# Canonical form: the unused low bits of the last character are zero (what PyJWT's re-encode checks).
_LAST_CHAR = {2: frozenset(_ALPHABET[::16]), 3: frozenset(_ALPHABET[::4])}
_RS256 = RSAAlgorithm(RSAAlgorithm.SHA256)


def _b64url(segment: bytes, name: str) -> bytes:
    if segment.endswith(b"="):  # trailing padding is tolerated, as PyJWT 2.15 does (AWS ALB tokens)
        stripped = segment.rstrip(b"=")
        if len(segment) - len(stripped) > 2 or len(segment) % 4:
            raise TokenMalformed(f"invalid padding in the {name}")
        segment = stripped
    if len(segment) % 4 == 1 or _SEGMENT.fullmatch(segment) is None:
        raise TokenMalformed(f"invalid base64url in the {name}")
    last = _LAST_CHAR.get(len(segment) % 4)
    if last is not None and segment[-1] not in last:
        raise TokenMalformed(f"non-canonical base64url in the {name}")
    return base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))


def _json_object(raw: bytes, name: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise TokenMalformed(f"invalid {name}: {exc}") from None
    if not isinstance(value, dict):
        raise TokenMalformed(f"invalid {name}: not a JSON object")
    return value


@functools.lru_cache(maxsize=1024)
def _org_permissions(per: object, fpm: object, features: object) -> tuple[str, ...]:
    """``_v2_permissions`` memoised: every member of an org with the same role carries the same strings."""
    return _v2_permissions({"per": per, "fpm": fpm}, features)


def auth_from_claims(claims: dict[str, Any]) -> Auth:
    """``clerk_sync.sessions.auth_from_claims`` with the v2 permission decoding memoised (and the
    freshly parsed claims dict owned, not copied)."""
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
        "claims": claims,
    }
    if isinstance(org, dict):
        role = org.get("rol")
        return Auth(
            **common,
            org_id=_str(org.get("id")),
            org_slug=_str(org.get("slg")),
            org_role=f"org:{role}" if isinstance(role, str) and not role.startswith("org:") else _str(role),
            org_permissions=_org_permissions(org.get("per"), org.get("fpm"), claims.get("fea")),
        )
    perms = claims.get("org_permissions")
    return Auth(
        **common,
        org_id=_str(claims.get("org_id")),
        org_slug=_str(claims.get("org_slug")),
        org_role=_str(claims.get("org_role")),
        org_permissions=tuple(p for p in perms if isinstance(p, str)) if isinstance(perms, list) else (),
    )


class OnePassVerifier(SessionVerifier):
    """``SessionVerifier`` with a single parse per token and O(1) eviction (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kids: dict[bytes, str | None] = {}  # header segment -> kid, for headers that passed the checks

    def _verify_signature_and_static_claims(self, token: str, allow_fetch: bool) -> Auth:
        try:
            raw = token.encode("ascii")
        except UnicodeEncodeError:
            raise TokenMalformed("not a JWT: non-ASCII characters") from None
        signing_input, _, crypto = raw.rpartition(b".")
        head, dot, payload = signing_input.partition(b".")
        if not dot or b"." in payload:
            raise TokenMalformed("not a JWT: expected three segments")
        key = self.keys.get(self._kid(head), allow_fetch=allow_fetch)
        if not _RS256.verify(signing_input, key, _b64url(crypto, "signature")):
            raise TokenSignatureInvalid("signature does not verify")
        # The payload segment is part of the signed bytes, so once the signature holds it is exactly what
        # the issuer wrote: the strict alphabet/canonical checks would be redundant here.
        try:
            claims_raw = base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4))
        except ValueError:
            raise TokenMalformed("invalid base64url in the payload") from None
        claims = _json_object(claims_raw, "payload")
        self._check_static(claims)
        return auth_from_claims(claims)

    def _kid(self, head: bytes) -> str | None:
        """alg allow-list and header checks; an instance signs every token with the same few headers,
        so the result is memoised per header segment (bounded; only headers that passed are kept)."""
        try:
            return self._kids[head]
        except KeyError:
            pass
        header = _json_object(_b64url(head, "header"), "header")
        if header.get("alg") not in ALLOWED_ALGORITHMS:
            raise TokenAlgorithmNotAllowed(f"alg {header.get('alg')!r} is not allowed (RS256 only)")
        if "crit" in header or "b64" in header:  # no JWS extensions in Clerk session tokens
            raise TokenMalformed("unsupported critical header parameters")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenMalformed("kid must be a string")
        if len(self._kids) >= 32:
            self._kids.clear()
        self._kids[head] = kid
        return kid

    def _evict(self) -> None:
        now, cache = self._now(), self._cache
        while cache:
            token, auth = next(iter(cache.items()))
            if len(cache) <= self._cache_size and auth.expires_at > now:
                break
            del cache[token]
