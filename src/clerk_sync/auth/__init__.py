"""Request-time auth, framework-free: who is calling, may they, and what admins did.

- :mod:`.sessions` verifies the token's signature (RS256, key by ``kid`` from :mod:`.jwks`);
- :mod:`.claims` validates its claims (:class:`ClaimsValidator`) into an :class:`Auth`;
- :mod:`.authenticator` turns a request into an :class:`Auth` and confirms roles against the DB;
- :mod:`.users` reads the caller's row (:class:`AuthUser`), fetched just in time by :class:`JitUsers`;
- :mod:`.admin` promotes, demotes and impersonates through Clerk; :mod:`.audit` records it.

The names below are the everyday ones, re-exported for ``from clerk_sync.auth import ...``.
"""

from __future__ import annotations

from clerk_sync.auth.audit import AuditEntry, record_audit
from clerk_sync.auth.authenticator import Authenticator, DenyList
from clerk_sync.auth.claims import Auth, ClaimsValidator
from clerk_sync.auth.sessions import SessionVerifier, verifier_from_settings
from clerk_sync.auth.users import AuthUser, JitUsers, read_user

__all__ = [
    "AuditEntry",
    "Auth",
    "AuthUser",
    "Authenticator",
    "ClaimsValidator",
    "DenyList",
    "JitUsers",
    "SessionVerifier",
    "read_user",
    "record_audit",
    "verifier_from_settings",
]
