"""Prototype for bench/auth.py: the fix suggested for ``src/clerk_sync/sessions.py``, shown as a subclass.

Two changes, nothing else (same claim checks, same ``Auth``, same cache semantics):

1. **Parse the token once.** ``SessionVerifier`` calls ``jwt.get_unverified_header`` and then
   ``jwt.decode``; in PyJWT 2.14+ each runs ``PyJWS._load``, which base64url-decodes *all three*
   segments, each with a per-character Python generator (the GHSA-hxm8-2xgr-2p9m alphabet check) and
   a decode/re-encode round trip. Here the segments are split once, checked against the same alphabet
   with one compiled regex (C speed), decoded once, and the RS256 signature goes to PyJWT's own
   ``RSAAlgorithm(SHA256).verify`` (a thin wrapper over ``cryptography``), so the crypto still comes
   from the library.
2. **O(1) cache eviction.** ``SessionVerifier._evict`` scans the whole cache for expired entries on
   every insert once it is full: with ``cache_size`` live tokens, each first-seen token pays a
   10k-entry scan. Here expired entries are dropped from the oldest end and the rest is FIFO
   (Clerk tokens share one lifetime, so insertion order is close to expiry order).
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from jwt.algorithms import RSAAlgorithm

from clerk_sync.errors import TokenAlgorithmNotAllowed, TokenMalformed, TokenSignatureInvalid
from clerk_sync.sessions import ALLOWED_ALGORITHMS, Auth, SessionVerifier, auth_from_claims

__all__ = ["OnePassVerifier"]

_SEGMENT = re.compile(rb"[A-Za-z0-9_-]*")  # RFC 7515 base64url, no padding
_RS256 = RSAAlgorithm(RSAAlgorithm.SHA256)


def _b64url(segment: bytes, name: str) -> bytes:
    if len(segment) % 4 == 1 or _SEGMENT.fullmatch(segment) is None:
        raise TokenMalformed(f"invalid base64url in the {name}")
    raw = base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != segment:  # non-canonical trailing bits (as PyJWT)
        raise TokenMalformed(f"non-canonical base64url in the {name}")
    return raw


def _json_object(raw: bytes, name: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise TokenMalformed(f"invalid {name}: {exc}") from None
    if not isinstance(value, dict):
        raise TokenMalformed(f"invalid {name}: not a JSON object")
    return value


class OnePassVerifier(SessionVerifier):
    """``SessionVerifier`` with a single parse per token and O(1) eviction (see the module docstring)."""

    def _verify_signature_and_static_claims(self, token: str, allow_fetch: bool) -> Auth:
        try:
            raw = token.encode("ascii")
        except UnicodeEncodeError:
            raise TokenMalformed("not a JWT: non-ASCII characters") from None
        signing_input, _, crypto = raw.rpartition(b".")
        head, dot, payload = signing_input.partition(b".")
        if not dot or b"." in payload:
            raise TokenMalformed("not a JWT: expected three segments")
        header = _json_object(_b64url(head, "header"), "header")
        if header.get("alg") not in ALLOWED_ALGORITHMS:
            raise TokenAlgorithmNotAllowed(f"alg {header.get('alg')!r} is not allowed (RS256 only)")
        if "crit" in header or "b64" in header:  # no JWS extensions in Clerk session tokens
            raise TokenMalformed("unsupported critical header parameters")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenMalformed("kid must be a string")
        key = self.keys.get(kid, allow_fetch=allow_fetch)
        if not _RS256.verify(signing_input, key, _b64url(crypto, "signature")):
            raise TokenSignatureInvalid("signature does not verify")
        claims = _json_object(_b64url(payload, "payload"), "payload")
        self._check_static(claims)
        return auth_from_claims(claims)

    def _evict(self) -> None:
        now, cache = self._now(), self._cache
        while cache:
            token, auth = next(iter(cache.items()))
            if len(cache) <= self._cache_size and auth.expires_at > now:
                break
            del cache[token]
