"""User operations of the emulated Backend API (``/v1/users``).

Each mutation bumps ``updated_at`` and emits the matching webhook event while holding the
store lock, so events leave in the order the changes happened.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from . import sessions
from .errors import ClerkAPIError
from .records import EmailRecord, PhoneRecord, UserRecord, deleted_object, render_user
from .state import Store, merge_metadata_fields, metadata_arg, replace_metadata_fields
from .user_body import (
    METADATA_FIELDS,
    SIMPLE_FIELDS,
    check_create_fields,
    check_emails,
    check_external_id,
    check_password,
    check_phones,
    check_statuses,
    check_username,
    rfc3339_ms,
    string_list,
)

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
# API version from which PATCH /users/{id} rejects metadata (use the /metadata endpoints).
_METADATA_REMOVED_IN = "2026-05-12"


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
    phone_numbers: tuple[str, ...] = ()
    phone_number_query: str | None = None
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
            or self.phone_numbers
            or self.phone_number_query
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
    for name in ("organization_id", "phone_number"):
        if len(params.get(name, ())) > _MAX_FILTER_VALUES:
            raise ClerkAPIError.invalid(name, f"{name} accepts up to {_MAX_FILTER_VALUES} values, "
                                              f"got {len(params[name])}")
    return replace(
        q,
        organization_ids=params.get("organization_id", ()),
        phone_numbers=params.get("phone_number", ()),
        phone_number_query=text_param(params, "phone_number_query"),
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


def _new_user(store: Store, user_id: str, addresses: list[str], now: int, numbers: Iterable[str] = ()) -> UserRecord:
    emails = [EmailRecord(store.new_id("idn"), address, now, now) for address in addresses]
    phones = [PhoneRecord(store.new_id("idn"), number, now, now) for number in numbers]
    user = UserRecord(id=user_id, created_at=now, updated_at=now, emails=emails, phones=phones)
    user.primary_email_address_id = emails[0].id if emails else None
    user.primary_phone_number_id = phones[0].id if phones else None
    return user


def _insert(store: Store, user: UserRecord) -> None:
    """Add ``user``, keeping ``user_order`` in ``created_at`` order (a ``created_at`` given at creation may be
    earlier than existing users')."""
    store.users[user.id] = user
    order = store.user_order
    if order and store.users[order[-1]].created_at > user.created_at:
        bisect.insort_right(order, user.id, key=lambda i: store.users[i].created_at)
    else:
        order.append(user.id)
    for email in user.emails:
        store.email_index[email.email_address] = user.id
    for phone in user.phones:
        store.phone_index[phone.phone_number] = user.id


def create_user(store: Store, body: JSON) -> JSON:
    """``POST /users``: create a user with admin-verified email addresses and phone numbers (the first of each
    primary); emits ``user.created``. Every field of the spec's body is honoured or refused with a 422."""
    with store.lock:
        check_create_fields(body)
        addresses = check_emails(store, string_list(body, "email_address"))
        numbers = check_phones(store, string_list(body, "phone_number"))
        check_statuses(body, "email_address", len(addresses))
        check_statuses(body, "phone_number", len(numbers))
        check_username(store, body.get("username"))
        check_external_id(store, body.get("external_id"))
        check_password(body)
        created_at = rfc3339_ms(body, "created_at")
        legal_accepted_at = rfc3339_ms(body, "legal_accepted_at")
        now = store.now_ms()
        user = _new_user(store, store.new_id("user"), addresses, now, numbers)
        if created_at is not None:
            user.created_at = created_at
        user.legal_accepted_at = legal_accepted_at
        for name in SIMPLE_FIELDS:
            if body.get(name) is not None:
                setattr(user, name, body[name])
        for name in METADATA_FIELDS:
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
    if q.phone_numbers and not any(p.phone_number in q.phone_numbers for p in user.phones):
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
    if not text_matches(q.phone_number_query, *(p.phone_number for p in user.phones)):
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
    last names" (not ``external_id``); the emulator's users have no web3 wallets."""
    haystack = [user.id, user.username, user.first_name, user.last_name,
                full_name(user.first_name, user.last_name)]
    return text_matches(needle, *haystack, *(e.email_address for e in user.emails),
                        *(p.phone_number for p in user.phones))


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
    if field_name == "phone_number":
        return lambda u: u.primary_phone()
    if field_name in {"updated_at", "first_name", "last_name", "username", "last_sign_in_at", "last_active_at"}:
        return lambda u: getattr(u, field_name)
    if field_name == "web3wallet":  # the emulator's users have none: all last, in creation order
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
        has_metadata = any(name in body for name in METADATA_FIELDS)
        if has_metadata and api_version is not None and api_version >= _METADATA_REMOVED_IN:
            name = next(n for n in METADATA_FIELDS if n in body)
            raise ClerkAPIError.invalid(name, f"{name} is not a valid parameter", "form_param_unknown")
        check_username(store, body.get("username"), owner=user.id)
        check_external_id(store, body.get("external_id"), owner=user.id)
        check_password(body)
        primary = body.get("primary_email_address_id")
        if primary is not None and primary not in {e.id for e in user.emails}:
            raise ClerkAPIError.invalid("primary_email_address_id", "is invalid")
        primary_phone = body.get("primary_phone_number_id")
        if primary_phone is not None and primary_phone not in {p.id for p in user.phones}:
            raise ClerkAPIError.invalid("primary_phone_number_id", "is invalid")
        for name in SIMPLE_FIELDS:
            if name in body:
                setattr(user, name, body[name])
        replace_metadata_fields(user, METADATA_FIELDS, body)
        if primary is not None:
            user.primary_email_address_id = primary
        if primary_phone is not None:
            user.primary_phone_number_id = primary_phone
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
        merge_metadata_fields(user, METADATA_FIELDS, body)
        return _touch(store, user)


def replace_metadata(store: Store, user_id: str, body: JSON) -> JSON:
    """``PUT /users/{id}/metadata``: each supplied field replaced wholesale."""
    with store.lock:
        user = require_user(store, user_id)
        replace_metadata_fields(user, METADATA_FIELDS, body)
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
        for phone in user.phones:
            store.phone_index.pop(phone.phone_number, None)
        for members in store.memberships.values():
            members.pop(user_id, None)
        sessions.remove_all_for_user(store, user_id)
        data = deleted_object("user", user_id, external_id=user.external_id)
        store.emit("user.deleted", data)
        return data
