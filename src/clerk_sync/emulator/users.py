"""User operations of the emulated Backend API (``/v1/users``).

Each mutation bumps ``updated_at`` and emits the matching webhook event while holding the
store lock, so events leave in the order the changes happened.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from . import sessions
from .errors import ClerkAPIError
from .records import EmailRecord, UserRecord, deleted_object, render_user
from .state import Store, merge_metadata_fields, metadata_arg, replace_metadata_fields

__all__ = [
    "REQUEST_PARAMS",
    "UserQuery",
    "bulk_create_users",
    "count_users",
    "create_user",
    "delete_user",
    "get_user",
    "list_users",
    "merge_metadata",
    "replace_metadata",
    "require_user",
    "set_flag",
    "update_user",
]

JSON = dict[str, Any]
#: The query parameters the spec documents for the route being served (set by ``endpoints.bapi_endpoint``,
#: each name with its non-empty values): the filters ``api`` does not parse itself are read from here.
REQUEST_PARAMS: ContextVar[Mapping[str, tuple[str, ...]]] = ContextVar(
    "clerk_emulator_params", default=MappingProxyType({})
)
# Filters that "accept up to 100" values each.
_MAX_FILTER_VALUES = 100
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_METADATA_FIELDS = ("public_metadata", "private_metadata", "unsafe_metadata")
# API version from which PATCH /users/{id} rejects metadata (use the /metadata endpoints).
_METADATA_REMOVED_IN = "2026-05-12"
_SIMPLE_FIELDS = (
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


@dataclass(frozen=True)
class UserQuery:
    """Filters and paging of ``GET /users`` and ``GET /users/count``."""

    email_addresses: tuple[str, ...] = ()
    user_ids: tuple[str, ...] = ()
    external_ids: tuple[str, ...] = ()
    usernames: tuple[str, ...] = ()
    query: str | None = None
    banned: bool | None = None
    order_by: str = "-created_at"
    limit: int = 10
    offset: int = 0
    starting_after: str | None = None
    # Read from :data:`REQUEST_PARAMS` by :func:`with_request_filters`.
    organization_ids: tuple[str, ...] = ()
    email_address_query: str | None = None
    username_query: str | None = None
    name_query: str | None = None
    # Millisecond ranges, exclusive as Clerk's (``*_since`` inclusive); a user without the timestamp never matches.
    created_after: int | None = None
    created_before: int | None = None
    last_active_after: int | None = None
    last_active_before: int | None = None
    last_active_since: int | None = None
    last_sign_in_after: int | None = None
    last_sign_in_before: int | None = None

    def has_filters(self) -> bool:
        return bool(
            self.email_addresses
            or self.user_ids
            or self.external_ids
            or self.usernames
            or self.query
            or self.banned is not None
            or self.organization_ids
            or self.email_address_query
            or self.username_query
            or self.name_query
            or any(v is not None for v in self._ranges())
        )

    def _ranges(self) -> tuple[int | None, ...]:
        return (self.created_after, self.created_before, self.last_active_after, self.last_active_before,
                self.last_active_since, self.last_sign_in_after, self.last_sign_in_before)


def ms_param(params: Mapping[str, tuple[str, ...]], name: str) -> int | None:
    """A millisecond timestamp query parameter (its first value), or a Clerk 422."""
    values = params.get(name)
    if not values:
        return None
    try:
        return int(values[0])
    except ValueError:
        raise ClerkAPIError.invalid(name, f"{name} must be an integer (milliseconds since the epoch)") from None


def text_param(params: Mapping[str, tuple[str, ...]], name: str) -> str | None:
    values = params.get(name)
    return values[0] if values else None


def with_request_filters(q: UserQuery) -> UserQuery:
    """``q`` with the filters of the request being served that ``api`` does not parse (``organization_id``,
    the ``*_query`` ones, the timestamp ranges); ``q`` itself outside a request."""
    params = REQUEST_PARAMS.get()
    if not params:
        return q
    org_ids = params.get("organization_id", ())
    if len(org_ids) > _MAX_FILTER_VALUES:
        raise ClerkAPIError.invalid("organization_id", f"organization_id accepts up to {_MAX_FILTER_VALUES} "
                                                       f"values, got {len(org_ids)}")
    return replace(
        q,
        organization_ids=org_ids,
        email_address_query=text_param(params, "email_address_query"),
        username_query=text_param(params, "username_query"),
        name_query=text_param(params, "name_query"),
        created_after=ms_param(params, "created_at_after"),
        created_before=ms_param(params, "created_at_before"),
        last_active_after=ms_param(params, "last_active_at_after"),
        last_active_before=ms_param(params, "last_active_at_before"),
        last_active_since=ms_param(params, "last_active_at_since"),
        last_sign_in_after=ms_param(params, "last_sign_in_at_after"),
        last_sign_in_before=ms_param(params, "last_sign_in_at_before"),
    )


def split_ids(wanted: Iterable[str]) -> tuple[set[str], set[str]]:
    """Clerk's ``+``/``-`` id filters: (ids to include, ids to exclude); plain ids include."""
    wanted = tuple(wanted)
    include = {w.removeprefix("+") for w in wanted if not w.startswith("-")}
    exclude = {w[1:] for w in wanted if w.startswith("-")}
    return include, exclude


def in_range(value: int | None, after: int | None, before: int | None, since: int | None = None) -> bool:
    """Clerk's exclusive ``*_after``/``*_before`` (and inclusive ``*_since``); no timestamp matches no range."""
    if after is None and before is None and since is None:
        return True
    if value is None:
        return False
    return ((after is None or value > after) and (before is None or value < before)
            and (since is None or value >= since))


def text_matches(needle: str | None, *values: str | None) -> bool:
    """Case-insensitive partial match of ``needle`` in any of ``values`` (True without a needle)."""
    if not needle:
        return True
    lowered = needle.lower()
    return any(lowered in value.lower() for value in values if value)


def full_name(first: str | None, last: str | None) -> str:
    return " ".join(part for part in (first, last) if part)


def require_user(store: Store, user_id: str) -> UserRecord:
    """The user, or a Clerk 404."""
    user = store.users.get(user_id)
    if user is None:
        raise ClerkAPIError.not_found()
    return user


def _check_emails(store: Store, addresses: Iterable[str], owner: str | None = None) -> list[str]:
    cleaned = []
    for raw in addresses:
        address = raw.strip().lower() if isinstance(raw, str) else ""
        if not _EMAIL_RE.match(address):
            raise ClerkAPIError.invalid("email_address", "is invalid", code="form_param_format_invalid")
        if store.email_index.get(address, owner) != owner or address in cleaned:
            raise ClerkAPIError.identifier_exists("email_address")
        cleaned.append(address)
    return cleaned


def _check_username(store: Store, username: Any, owner: str | None = None) -> None:
    if username is None:
        return
    if not isinstance(username, str) or not username:
        raise ClerkAPIError.invalid("username", "is invalid", code="form_param_format_invalid")
    for user in store.users.values():
        if user.username == username and user.id != owner:
            raise ClerkAPIError(
                422,
                "form_identifier_exists",
                "That username is taken. Please try another.",
                meta={"param_name": "username"},
            )


def _new_user(store: Store, user_id: str, addresses: list[str], now: int) -> UserRecord:
    emails = [EmailRecord(store.new_id("idn"), address, now, now) for address in addresses]
    user = UserRecord(id=user_id, created_at=now, updated_at=now, emails=emails)
    user.primary_email_address_id = emails[0].id if emails else None
    return user


def _insert(store: Store, user: UserRecord) -> None:
    store.users[user.id] = user
    store.user_order.append(user.id)
    for email in user.emails:
        store.email_index[email.email_address] = user.id


def create_user(store: Store, body: JSON) -> JSON:
    """``POST /users``: create a user with admin-verified email addresses; emits ``user.created``."""
    with store.lock:
        addresses = _check_emails(store, body.get("email_address") or [])
        _check_username(store, body.get("username"))
        now = store.now_ms()
        user = _new_user(store, store.new_id("user"), addresses, now)
        for name in _SIMPLE_FIELDS:
            if body.get(name) is not None:
                setattr(user, name, body[name])
        for name in _METADATA_FIELDS:
            setattr(user, name, metadata_arg(body, name) or {})
        user.password_enabled = bool(body.get("password") or body.get("password_digest"))
        user.banned = bool(body.get("banned"))
        user.locked = bool(body.get("locked"))
        _insert(store, user)
        data = render_user(user)
        store.emit("user.created", data)
        return data


def bulk_create_users(store: Store, count: int, *, domain: str = "bulk.example.com") -> int:
    """Insert ``count`` users at once, emitting no webhooks (for reconcile benchmarks)."""
    with store.lock:
        start = len(store.user_order)
        for n in range(start, start + count):
            now = store.now_ms()
            user = _new_user(store, store.new_id("user"), [f"user{n}@{domain}"], now)
            user.first_name = "User"
            user.last_name = str(n)
            _insert(store, user)
        return count


def get_user(store: Store, user_id: str) -> JSON:
    with store.lock:
        return render_user(require_user(store, user_id))


def _matcher(store: Store, q: UserQuery) -> Callable[[UserRecord], bool]:
    """The filters of ``q`` as one predicate (organization memberships looked up once, not per user)."""
    in_orgs: set[str] | None = None
    out_orgs: set[str] = set()
    if q.organization_ids:
        include, exclude = split_ids(q.organization_ids)
        if include:
            in_orgs = {u for o in include for u in store.memberships.get(o, {})}
        out_orgs = {u for o in exclude for u in store.memberships.get(o, {})}

    def matches(user: UserRecord) -> bool:
        if in_orgs is not None and user.id not in in_orgs:
            return False
        if user.id in out_orgs:
            return False
        return _matches(user, q)

    return matches


def _matches(user: UserRecord, q: UserQuery) -> bool:
    if q.email_addresses and not any(e.email_address in q.email_addresses for e in user.emails):
        return False
    if q.external_ids and not _id_filter(user.external_id, q.external_ids):
        return False
    if q.usernames and user.username not in q.usernames:
        return False
    if q.banned is not None and user.banned != q.banned:
        return False
    if q.user_ids and not _id_filter(user.id, q.user_ids):
        return False
    if not (in_range(user.created_at, q.created_after, q.created_before)
            and in_range(user.last_active_at, q.last_active_after, q.last_active_before, q.last_active_since)
            and in_range(user.last_sign_in_at, q.last_sign_in_after, q.last_sign_in_before)):
        return False
    if not text_matches(q.email_address_query, *(e.email_address for e in user.emails)):
        return False
    if not text_matches(q.username_query, user.username):
        return False
    if not text_matches(q.name_query, user.first_name, user.last_name, full_name(user.first_name, user.last_name)):
        return False
    return not q.query or _text_match(user, q.query)


def _id_filter(value: str | None, wanted: tuple[str, ...]) -> bool:
    """Clerk's ``user_id``/``external_id`` filters: plain/``+`` ids include, ``-`` ids exclude."""
    include, exclude = split_ids(wanted)
    return value not in exclude and (not include or value in include)


def _text_match(user: UserRecord, needle: str) -> bool:
    """``query``: the spec searches "email addresses, phone numbers, usernames, web3 wallets, user IDs, first and
    last names" (not ``external_id``); the emulator's users have no phone numbers or web3 wallets."""
    haystack = [user.id, user.username, user.first_name, user.last_name,
                full_name(user.first_name, user.last_name)]
    return text_matches(needle, *haystack, *(e.email_address for e in user.emails))


def _ordered(store: Store, q: UserQuery) -> list[UserRecord]:
    field_name = q.order_by.lstrip("+-") or "created_at"
    descending = q.order_by.startswith("-")
    matches = _matcher(store, q)
    if field_name == "created_at":
        ids = reversed(store.user_order) if descending else iter(store.user_order)
        return [store.users[i] for i in ids if matches(store.users[i])]
    users = [u for u in store.users.values() if matches(u)]
    key = _sort_key(field_name)
    present = [u for u in users if key(u) is not None]
    missing = [u for u in users if key(u) is None]
    present.sort(key=key, reverse=descending)
    return present + missing


def _sort_key(field_name: str) -> Callable[[UserRecord], Any]:
    if field_name == "email_address":
        return lambda u: u.primary_email()
    if field_name in {"updated_at", "first_name", "last_name", "username", "last_sign_in_at", "last_active_at"}:
        return lambda u: getattr(u, field_name)
    if field_name in {"phone_number", "web3wallet"}:  # the emulator's users have none: all last, in creation order
        return lambda u: None
    raise ClerkAPIError.invalid("order_by", f"order_by {field_name!r} is not supported")


def _page_fast(store: Store, q: UserQuery) -> list[UserRecord]:
    """Unfiltered ``created_at`` paging: slice the creation-ordered id list directly."""
    order = store.user_order
    if q.order_by.startswith("-"):
        end = len(order) - q.offset
        ids = order[max(end - q.limit, 0) : max(end, 0)][::-1]
    else:
        ids = order[q.offset : q.offset + q.limit]
    return [store.users[i] for i in ids]


def list_users(store: Store, q: UserQuery) -> list[JSON]:
    """``GET /users``: a bare array of users, newest first by default."""
    q = with_request_filters(q)
    with store.lock:
        fast = q.order_by.lstrip("+-") == "created_at" and not q.has_filters()
        if fast and q.starting_after is not None:  # a cursor: the anchor's position is an offset (no filtering)
            try:
                at = store.user_order.index(q.starting_after)
            except ValueError:
                return []
            offset = len(store.user_order) - at if q.order_by.startswith("-") else at + 1
            q = replace(q, offset=offset, starting_after=None)
        if fast:
            return [render_user(u) for u in _page_fast(store, q)]
        users = _ordered(store, q)
        start = q.offset
        if q.starting_after is not None:
            ids = [u.id for u in users]
            start = ids.index(q.starting_after) + 1 if q.starting_after in ids else len(ids)
        return [render_user(u) for u in users[start : start + q.limit]]


def count_users(store: Store, q: UserQuery) -> int:
    """``GET /users/count``: how many users match the filters (paging ignored)."""
    q = with_request_filters(q)
    with store.lock:
        if not q.has_filters():
            return len(store.users)
        matches = _matcher(store, q)
        return sum(1 for u in store.users.values() if matches(u))


def _touch(store: Store, user: UserRecord) -> JSON:
    user.updated_at = store.bump_ms(user.updated_at)
    data = render_user(user)
    store.emit("user.updated", data)
    return data


def update_user(store: Store, user_id: str, body: JSON, api_version: str | None) -> JSON:
    """``PATCH /users/{id}``; metadata is replaced wholesale here before API 2026-05-12."""
    with store.lock:
        user = require_user(store, user_id)
        has_metadata = any(name in body for name in _METADATA_FIELDS)
        if has_metadata and api_version is not None and api_version >= _METADATA_REMOVED_IN:
            name = next(n for n in _METADATA_FIELDS if n in body)
            raise ClerkAPIError.invalid(name, f"{name} is not a valid parameter", "form_param_unknown")
        _check_username(store, body.get("username"), owner=user.id)
        primary = body.get("primary_email_address_id")
        if primary is not None and primary not in {e.id for e in user.emails}:
            raise ClerkAPIError.invalid("primary_email_address_id", "is invalid")
        for name in _SIMPLE_FIELDS:
            if name in body:
                setattr(user, name, body[name])
        replace_metadata_fields(user, _METADATA_FIELDS, body)
        if primary is not None:
            user.primary_email_address_id = primary
        if body.get("password"):
            user.password_enabled = True
        data = _touch(store, user)
        _notify_emails(store, user, body)
        return data


def _notify_emails(store: Store, user: UserRecord, body: JSON) -> None:
    """Clerk emails the user about password and primary-address changes: ``email.created``."""
    if body.get("password"):
        _emit_email(store, user, "password_changed", "Your password has been changed")
    if body.get("primary_email_address_id") and body.get("notify_primary_email_address_changed"):
        _emit_email(store, user, "primary_email_address_changed", "Your primary email changed")


def _emit_email(store: Store, user: UserRecord, slug: str, subject: str) -> None:
    address = user.primary_email()
    if address is None:
        return
    store.emit(
        "email.created",
        {
            "object": "email",
            "id": store.new_id("ema"),
            "slug": slug,
            "from_email_name": "notifications",
            "reply_to_email_name": None,
            "to_email_address": address,
            "email_address_id": user.primary_email_address_id,
            "user_id": user.id,
            "subject": subject,
            "body": f"<p>{subject}.</p>",
            "body_plain": f"{subject}.",
            "status": "queued",
            "data": {"user": {"public_metadata": dict(user.public_metadata)}},
            "delivered_by_clerk": True,
        },
    )


def merge_metadata(store: Store, user_id: str, body: JSON) -> JSON:
    """``PATCH /users/{id}/metadata``: deep merge; a ``null`` value removes the key."""
    with store.lock:
        user = require_user(store, user_id)
        merge_metadata_fields(user, _METADATA_FIELDS, body)
        return _touch(store, user)


def replace_metadata(store: Store, user_id: str, body: JSON) -> JSON:
    """``PUT /users/{id}/metadata``: each supplied field replaced wholesale."""
    with store.lock:
        user = require_user(store, user_id)
        replace_metadata_fields(user, _METADATA_FIELDS, body)
        return _touch(store, user)


def set_flag(store: Store, user_id: str, flag: str, value: bool) -> JSON:
    """Ban/unban/lock/unlock; banning also revokes every active session of the user."""
    with store.lock:
        user = require_user(store, user_id)
        setattr(user, flag, value)
        data = _touch(store, user)
        if flag == "banned" and value:
            sessions.revoke_all_for_user(store, user_id)
        return data


def delete_user(store: Store, user_id: str) -> JSON:
    """``DELETE /users/{id}``: emits ``user.deleted`` with a DeletedObject.

    Like Clerk (as far as documented), no ``organizationMembership.deleted`` events are sent
    for the user's memberships; they disappear with the user.
    """
    with store.lock:
        user = require_user(store, user_id)
        del store.users[user_id]
        store.user_order.remove(user_id)
        for email in user.emails:
            store.email_index.pop(email.email_address, None)
        for members in store.memberships.values():
            members.pop(user_id, None)
        sessions.remove_all_for_user(store, user_id)
        data = deleted_object("user", user_id, external_id=user.external_id)
        store.emit("user.deleted", data)
        return data
