"""The request bodies of the emulated ``/v1/users`` routes: which fields exist, and the rules Clerk checks.

``POST /users`` takes every field of the spec's body (``additionalProperties: false``) and nothing else: each is
honoured, or refused with 422 ``emulator_not_implemented`` (:data:`CREATE_NOT_IMPLEMENTED`), never dropped; a
field the spec does not document answers Clerk's 422 ``form_param_unknown``. The checks here raise Clerk's errors
and change nothing; ``users`` applies the body once they pass.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from .errors import ClerkAPIError
from .state import Store

__all__ = [
    "CREATE_NOT_IMPLEMENTED",
    "METADATA_FIELDS",
    "SIMPLE_FIELDS",
    "check_create_fields",
    "check_emails",
    "check_external_id",
    "check_password",
    "check_phones",
    "check_statuses",
    "check_username",
    "rfc3339_ms",
    "string_list",
]

JSON = dict[str, Any]

_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
# E.164: "+", a country code not starting with 0, at most 15 digits in all (7 at least: the shortest numbers in use)
_E164_RE = re.compile(r"\+[1-9][0-9]{6,14}")  # fullmatch: no trailing newline either
_E164_MESSAGE = "phone_number must be a valid phone number according to E.164 international standard."
_MIN_PASSWORD_LENGTH = 8  # the spec: "Must be at least 8 characters long"
# The spec's ``PasswordHasher`` (its description lists the algorithms Clerk supports) and those Clerk's migration
# guides name besides (awscognito for Cognito, the peppered and salted ones): an unknown name is a typo Clerk
# refuses too. Clerk adds hashers over time: add a name here when its docs do.
_PASSWORD_HASHERS = frozenset({
    "argon2i", "argon2id", "awscognito", "bcrypt", "bcrypt_peppered", "bcrypt_sha256_django",
    "hmac_sha256_utf16_b64", "ldap_ssha", "md5", "md5_phpass", "md5_salted", "pbkdf2_sha1", "pbkdf2_sha256",
    "pbkdf2_sha256_django", "pbkdf2_sha512", "pbkdf2_sha512_hex", "phpass", "scrypt_firebase", "scrypt_werkzeug",
    "sha256", "sha256_salted", "sha512_symfony",
})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
METADATA_FIELDS = ("public_metadata", "private_metadata", "unsafe_metadata")
SIMPLE_FIELDS = (
    "external_id",
    "first_name",
    "last_name",
    "username",
    "locale",
    "delete_self_enabled",
    "create_organization_enabled",
    "create_organizations_limit",
    "bypass_client_trust",
)
#: ``POST /users`` body fields the spec (2026-05-12) documents that the emulator cannot honour, each with why: a
#: request setting one is answered 422 ``emulator_not_implemented``, not served as if the field were not there.
CREATE_NOT_IMPLEMENTED: Mapping[str, str] = MappingProxyType({
    "web3_wallet": "the emulator's users have no web3 wallets",
    "totp_secret": "the emulated instance has no multi-factor authentication (TOTP)",
    "backup_codes": "the emulated instance has no multi-factor authentication (backup codes)",
})
# Every field of the spec's ``POST /users`` body (``additionalProperties: false``: Clerk refuses any other). The
# ``skip_*`` flags are honoured by the emulated instance itself: it requires no password, legal acceptance or
# identifier, and checks passwords for length only (not against lists of hacked passwords).
_CREATE_FIELDS = frozenset({
    *SIMPLE_FIELDS, *METADATA_FIELDS, *CREATE_NOT_IMPLEMENTED, "email_address", "email_address_identification_status",
    "phone_number", "phone_number_identification_status", "password", "password_digest", "password_hasher",
    "skip_password_checks", "skip_password_requirement", "skip_legal_checks", "skip_user_requirement",
    "legal_accepted_at", "created_at", "banned", "locked",
})


def string_list(body: JSON, name: str) -> list[Any]:
    """An array field of a request body (``[]`` when absent or null), or a Clerk 422."""
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ClerkAPIError.invalid(name, f"{name} must be an array of strings", code="form_param_format_invalid")
    return value


def check_emails(store: Store, addresses: Iterable[str], owner: str | None = None) -> list[str]:
    cleaned: list[str] = []
    for raw in addresses:
        address = raw.strip().lower() if isinstance(raw, str) else ""
        if not _EMAIL_RE.match(address):
            raise ClerkAPIError.invalid("email_address", "is invalid", code="form_param_format_invalid")
        if store.email_index.get(address, owner) != owner or address in cleaned:
            raise ClerkAPIError.identifier_exists("email_address")
        cleaned.append(address)
    return cleaned


def check_phones(store: Store, numbers: Iterable[Any]) -> list[str]:
    """E.164 numbers, none another user's (nor twice in ``numbers``), or Clerk's 422."""
    cleaned: list[str] = []
    for number in numbers:
        if not isinstance(number, str) or not _E164_RE.fullmatch(number):
            raise ClerkAPIError(422, "form_param_format_invalid", "is invalid", _E164_MESSAGE,
                                meta={"param_name": "phone_number"})
        if number in store.phone_index or number in cleaned:
            raise ClerkAPIError.identifier_exists("phone_number", "phone number")
        cleaned.append(number)
    return cleaned


def check_statuses(body: JSON, field_name: str, count: int) -> None:
    """``<field>_identification_status``: one of verified/reserved per identifier; "reserved" is refused (the
    emulator creates every identifier verified)."""
    name = f"{field_name}_identification_status"
    statuses = string_list(body, name)
    if not statuses:
        return
    if len(statuses) != count or any(s not in {"verified", "reserved"} for s in statuses):
        raise ClerkAPIError.invalid(name, f"{name} must hold one item per {field_name} ({count}), each verified or "
                                          f"reserved, got {statuses!r}")
    if "reserved" in statuses:
        raise ClerkAPIError.not_implemented(
            name, f"reserved identifiers ({name})",
            "it creates every email address and phone number verified, as Clerk does by default")


def check_external_id(store: Store, external_id: Any, owner: str | None = None) -> None:
    """The spec: external_id "must be unique across your instance"."""
    if external_id is None:
        return
    if any(u.external_id == external_id and u.id != owner for u in store.users.values()):
        raise ClerkAPIError.identifier_exists("external_id", "external ID")


def check_password(body: JSON) -> None:
    """The spec's password rules the emulator can check: at least 8 characters (unless ``skip_password_checks``),
    a known ``password_hasher``. Lists of hacked passwords are not consulted."""
    password = body.get("password")
    if password is not None and not isinstance(password, str):
        raise ClerkAPIError.invalid("password", "password must be a string", code="form_param_format_invalid")
    if password is not None and len(password) < _MIN_PASSWORD_LENGTH and not body.get("skip_password_checks"):
        message = f"Passwords must be {_MIN_PASSWORD_LENGTH} characters or more."
        raise ClerkAPIError(422, "form_password_length_too_short", message, message, meta={"param_name": "password"})
    hasher = body.get("password_hasher")
    if hasher is not None and hasher not in _PASSWORD_HASHERS:
        raise ClerkAPIError.invalid("password_hasher", f"password_hasher {hasher!r} is not supported; one of "
                                                       f"{', '.join(sorted(_PASSWORD_HASHERS))}")


def rfc3339_ms(body: JSON, name: str) -> int | None:
    """An RFC3339 date-time field (``2012-10-20T07:15:20.902Z``) in ms since the epoch, or a Clerk 422."""
    value = body.get(name)
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise ClerkAPIError.invalid(name, f"{name} must be an RFC3339 date-time with an offset, e.g. "
                                          f"2012-10-20T07:15:20.902Z, got {value!r}", code="form_param_format_invalid")
    return (parsed - _EPOCH) // timedelta(milliseconds=1)


def check_create_fields(body: JSON) -> None:
    """Refuse a field the spec does not document (Clerk's ``form_param_unknown``) or that the emulator cannot
    honour (``emulator_not_implemented``, :data:`CREATE_NOT_IMPLEMENTED`)."""
    for name, value in body.items():
        if name not in _CREATE_FIELDS:
            raise ClerkAPIError.invalid(name, f"{name} is not a valid parameter for this request",
                                        "form_param_unknown")
        if name in CREATE_NOT_IMPLEMENTED and value not in (None, []):
            raise ClerkAPIError.not_implemented(name, f"the {name} field of POST /v1/users",
                                                CREATE_NOT_IMPLEMENTED[name])


def check_username(store: Store, username: Any, owner: str | None = None) -> None:
    if username is None:
        return
    if not isinstance(username, str) or not username:
        raise ClerkAPIError.invalid("username", "is invalid", code="form_param_format_invalid")
    for user in store.users.values():
        if user.username == username and user.id != owner:
            raise ClerkAPIError.identifier_exists("username", "username")
