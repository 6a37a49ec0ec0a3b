"""Organizations and memberships (``/v1/organizations``, ``/v1/organization_memberships``).

Membership events carry the full membership with its nested organization and
``public_user_data``, on delete too, as Clerk's do.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .errors import ClerkAPIError
from .records import MembershipRecord, OrgRecord, UserRecord, deleted_object, render_membership, render_org
from .state import Store, merge_metadata_fields, metadata_arg, replace_metadata_fields
from .users import REQUEST_PARAMS, full_name, in_range, ms_param, split_ids, text_matches, text_param

__all__ = [
    "create_membership",
    "create_org",
    "delete_membership",
    "delete_org",
    "get_org",
    "list_memberships",
    "list_orgs",
    "membership_json",
    "merge_membership_metadata",
    "merge_org_metadata",
    "org_json",
    "replace_org_metadata",
    "require_org",
    "update_membership",
    "update_org",
]

JSON = dict[str, Any]
_METADATA_FIELDS = ("public_metadata", "private_metadata")
# API version from which PATCH /organizations/{id} rejects metadata (use the /metadata endpoints).
_METADATA_REMOVED_IN = "2026-05-12"


def require_org(store: Store, id_or_slug: str) -> OrgRecord:
    """The organization by id or slug, or a Clerk 404."""
    org = store.orgs.get(id_or_slug) or store.orgs.get(store.slug_index.get(id_or_slug, ""))
    if org is None:
        raise ClerkAPIError.not_found()
    return org


def org_json(store: Store, org: OrgRecord) -> JSON:
    return render_org(org, store.members_count(org.id))


def _slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "org"


def _claim_slug(store: Store, wanted: str | None, name: str, owner: str | None) -> str:
    if wanted is not None:
        if store.slug_index.get(wanted, owner) != owner:
            raise ClerkAPIError(
                422,
                "form_identifier_exists",
                "This slug is already taken",
                "This organization slug is already taken. Please choose another one.",
                meta={"param_name": "slug"},
            )
        return wanted
    base = slug = _slugify(name)
    n = 1
    while slug in store.slug_index:
        n += 1
        slug = f"{base}-{n}"
    return slug


def _int_arg(body: JSON, name: str) -> int | None:
    """An integer field of a request body, None when absent (Clerk's 422 otherwise)."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ClerkAPIError.invalid(name, f"{name} must be an integer of at least 0", "form_param_format_invalid")
    return value


def create_org(store: Store, body: JSON) -> JSON:
    """``POST /organizations``; ``created_by`` becomes an ``org:admin`` member."""
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ClerkAPIError.missing("name")
    with store.lock:
        created_by = body.get("created_by")
        if created_by is not None and created_by not in store.users:
            raise ClerkAPIError.invalid("created_by", "created_by is not a valid user")
        now = store.now_ms()
        org = OrgRecord(
            id=store.new_id("org"),
            name=name,
            slug=_claim_slug(store, body.get("slug"), name, None),
            created_at=now,
            updated_at=now,
            created_by=created_by,
            public_metadata=metadata_arg(body, "public_metadata") or {},
            private_metadata=metadata_arg(body, "private_metadata") or {},
            max_allowed_memberships=_int_arg(body, "max_allowed_memberships") or 0,
        )
        store.orgs[org.id] = org
        store.slug_index[org.slug] = org.id
        store.memberships[org.id] = {}
        store.emit("organization.created", org_json(store, org))
        if created_by is not None:
            _add_member(store, org, created_by, "org:admin", {})
        return org_json(store, org)


def get_org(store: Store, id_or_slug: str) -> JSON:
    with store.lock:
        return org_json(store, require_org(store, id_or_slug))


def list_orgs(
    store: Store,
    *,
    query: str | None,
    user_ids: tuple[str, ...],
    org_ids: tuple[str, ...],
    order_by: str,
    limit: int,
    offset: int,
) -> JSON:
    """``GET /organizations``: ``{data, total_count}``, newest first by default."""
    with store.lock:
        orgs = list(store.orgs.values())
        if query:  # the spec: "exact match for organization ID and partial match for name and slug"
            needle = query.lower()
            orgs = [o for o in orgs if needle in o.name.lower() or needle in o.slug.lower() or query == o.id]
        if user_ids:  # plain/``+`` ids: orgs with any of them as member; ``-`` ids: orgs with none of them
            include, exclude = split_ids(user_ids)
            orgs = [o for o in orgs if not any(u in store.memberships[o.id] for u in exclude)
                    and (not include or any(u in store.memberships[o.id] for u in include))]
        if org_ids:
            include, exclude = split_ids(org_ids)
            orgs = [o for o in orgs if o.id not in exclude and (not include or o.id in include)]
        field_name = order_by.lstrip("+-")
        if field_name not in {"created_at", "name", "members_count"}:
            raise ClerkAPIError.invalid("order_by", f"order_by {field_name!r} is not supported")
        # Creation order breaks ties (several orgs in one millisecond), in the requested direction.
        position = {o.id: i for i, o in enumerate(store.orgs.values())}
        orgs.sort(key=lambda o: (_org_sort_key(store, o, field_name), position[o.id]),
                  reverse=order_by.startswith("-"))
        page = orgs[offset : offset + limit]
        return {"data": [org_json(store, o) for o in page], "total_count": len(orgs)}


def _org_sort_key(store: Store, org: OrgRecord, field_name: str) -> Any:
    if field_name == "members_count":
        return store.members_count(org.id)
    return getattr(org, field_name)


def _touch_org(store: Store, org: OrgRecord) -> JSON:
    org.updated_at = store.bump_ms(org.updated_at)
    data = org_json(store, org)
    store.emit("organization.updated", data)
    return data


def update_org(store: Store, id_or_slug: str, body: JSON, api_version: str | None) -> JSON:
    """``PATCH /organizations/{id}``: name, slug, limits; metadata replaced wholesale before API 2026-05-12."""
    with store.lock:
        org = require_org(store, id_or_slug)
        has_metadata = any(name in body for name in _METADATA_FIELDS)
        if has_metadata and api_version is not None and api_version >= _METADATA_REMOVED_IN:
            name = next(n for n in _METADATA_FIELDS if n in body)
            raise ClerkAPIError.invalid(name, f"{name} is not a valid parameter", "form_param_unknown")
        for name in _METADATA_FIELDS:  # checked before anything changes: a 422 must change nothing
            metadata_arg(body, name)
        max_allowed = _int_arg(body, "max_allowed_memberships")
        if body.get("slug") is not None and body["slug"] != org.slug:
            slug = _claim_slug(store, body["slug"], org.name, org.id)
            del store.slug_index[org.slug]
            org.slug = slug
            store.slug_index[slug] = org.id
        if body.get("name") is not None:
            org.name = body["name"]
        if max_allowed is not None:
            org.max_allowed_memberships = max_allowed
        if body.get("admin_delete_enabled") is not None:
            org.admin_delete_enabled = bool(body["admin_delete_enabled"])
        replace_metadata_fields(org, _METADATA_FIELDS, body)
        return _touch_org(store, org)


def merge_org_metadata(store: Store, id_or_slug: str, body: JSON) -> JSON:
    """``PATCH /organizations/{id}/metadata``: deep merge, ``null`` removes."""
    with store.lock:
        org = require_org(store, id_or_slug)
        merge_metadata_fields(org, _METADATA_FIELDS, body)
        return _touch_org(store, org)


def replace_org_metadata(store: Store, id_or_slug: str, body: JSON) -> JSON:
    """``PUT /organizations/{id}/metadata``: supplied fields replaced wholesale."""
    with store.lock:
        org = require_org(store, id_or_slug)
        replace_metadata_fields(org, _METADATA_FIELDS, body)
        return _touch_org(store, org)


def delete_org(store: Store, id_or_slug: str) -> JSON:
    """``DELETE /organizations/{id}``: emits ``organization.deleted`` (DeletedObject with slug).

    Memberships vanish with the organization without events of their own.
    """
    with store.lock:
        org = require_org(store, id_or_slug)
        del store.orgs[org.id]
        del store.slug_index[org.slug]
        store.memberships.pop(org.id, None)
        for session in store.sessions.values():
            if session.last_active_organization_id == org.id:
                session.last_active_organization_id = None
        data = deleted_object("organization", org.id, slug=org.slug)
        store.emit("organization.deleted", data)
        return data


def membership_json(store: Store, membership: MembershipRecord) -> JSON:
    org = store.orgs[membership.organization_id]
    return render_membership(
        membership,
        org_json(store, org),
        store.users.get(membership.user_id),
        store.permissions_for(membership.role),
    )


def _check_role(role: Any) -> str:
    if not isinstance(role, str) or not role:
        raise ClerkAPIError.missing("role")
    if not role.startswith("org:"):
        raise ClerkAPIError.invalid("role", f"{role!r} is not a valid role key")
    return role


def _add_member(store: Store, org: OrgRecord, user_id: str, role: str, body: JSON) -> JSON:
    now = store.now_ms()
    membership = MembershipRecord(
        id=store.new_id("orgmem"),
        organization_id=org.id,
        user_id=user_id,
        role=role,
        created_at=now,
        updated_at=now,
        public_metadata=metadata_arg(body, "public_metadata") or {},
        private_metadata=metadata_arg(body, "private_metadata") or {},
    )
    store.memberships[org.id][user_id] = membership
    data = membership_json(store, membership)
    store.emit("organizationMembership.created", data)
    return data


def create_membership(store: Store, id_or_slug: str, body: JSON) -> JSON:
    """``POST /organizations/{id}/memberships``: emits ``organizationMembership.created``."""
    role = _check_role(body.get("role"))
    user_id = body.get("user_id")
    if not isinstance(user_id, str):
        raise ClerkAPIError.missing("user_id")
    with store.lock:
        org = require_org(store, id_or_slug)
        if user_id not in store.users:
            raise ClerkAPIError.not_found()
        if user_id in store.memberships[org.id]:
            raise ClerkAPIError(
                422,
                "already_a_member_in_organization",
                "Already a member",
                "The user is already a member of this organization.",
                meta={"param_name": "user_id"},
            )
        limit = org.max_allowed_memberships
        if limit and store.members_count(org.id) >= limit:
            raise ClerkAPIError(
                403,
                "organization_membership_quota_exceeded",
                "Membership quota exceeded",
                "The organization has reached its maximum number of memberships.",
            )
        return _add_member(store, org, user_id, role, body)


def _require_membership(store: Store, id_or_slug: str, user_id: str) -> MembershipRecord:
    org = require_org(store, id_or_slug)
    membership = store.memberships[org.id].get(user_id)
    if membership is None:
        raise ClerkAPIError.not_found()
    return membership


def _touch_membership(store: Store, membership: MembershipRecord) -> JSON:
    membership.updated_at = store.bump_ms(membership.updated_at)
    data = membership_json(store, membership)
    store.emit("organizationMembership.updated", data)
    return data


def update_membership(store: Store, id_or_slug: str, user_id: str, body: JSON) -> JSON:
    """``PATCH .../memberships/{user_id}``: change the role."""
    role = _check_role(body.get("role"))
    with store.lock:
        membership = _require_membership(store, id_or_slug, user_id)
        membership.role = role
        return _touch_membership(store, membership)


def merge_membership_metadata(store: Store, id_or_slug: str, user_id: str, body: JSON) -> JSON:
    """``PATCH .../memberships/{user_id}/metadata``: deep merge."""
    with store.lock:
        membership = _require_membership(store, id_or_slug, user_id)
        merge_metadata_fields(membership, _METADATA_FIELDS, body)
        return _touch_membership(store, membership)


def delete_membership(store: Store, id_or_slug: str, user_id: str) -> JSON:
    """``DELETE .../memberships/{user_id}``: returns and emits the full membership."""
    with store.lock:
        membership = _require_membership(store, id_or_slug, user_id)
        del store.memberships[membership.organization_id][user_id]
        data = membership_json(store, membership)
        store.emit("organizationMembership.deleted", data)
        return data


def list_memberships(
    store: Store,
    *,
    org: str | None = None,
    user_id: str | None = None,
    user_ids: tuple[str, ...] = (),
    roles: tuple[str, ...] = (),
    order_by: str = "created_at",
    limit: int = 10,
    offset: int = 0,
) -> JSON:
    """Memberships of one organization, one user, or the whole instance: ``{data, total_count}``."""
    with store.lock:
        if org is not None:
            found = list(store.memberships[require_org(store, org).id].values())
        else:
            found = store.all_memberships()
        if user_id is not None:
            found = [m for m in found if m.user_id == user_id]
        if user_ids:  # Clerk's ``user_id`` filter: plain/``+`` ids include, ``-`` ids exclude
            include = {u.lstrip("+") for u in user_ids if not u.startswith("-")}
            exclude = {u[1:] for u in user_ids if u.startswith("-")}
            found = [m for m in found if m.user_id not in exclude and (not include or m.user_id in include)]
        if roles:
            found = [m for m in found if m.role in roles]
        params = REQUEST_PARAMS.get()
        if params:
            found = [m for m in found if _member_matches(store.users.get(m.user_id), params)]
        found = _sorted_memberships(store, found, order_by)
        page = found[offset : offset + limit]
        return {"data": [membership_json(store, m) for m in page], "total_count": len(found)}


# ``order_by`` of the membership lists (the spec's).
_MEMBERSHIP_ORDERINGS = frozenset({"created_at", "email_address", "first_name", "last_name", "username",
                                   "phone_number"})


def _sorted_memberships(store: Store, found: list[MembershipRecord], order_by: str) -> list[MembershipRecord]:
    """Creation order, or by a field of the member (members without it last, in creation order)."""
    field_name = order_by.lstrip("+-") or "created_at"
    if field_name not in _MEMBERSHIP_ORDERINGS:
        raise ClerkAPIError.invalid("order_by", f"order_by {order_by!r} is not supported")
    descending = order_by.startswith("-")
    if field_name == "created_at":
        return found[::-1] if descending else found

    def key(m: MembershipRecord) -> str | None:
        user = store.users.get(m.user_id)
        if user is None:
            return None
        if field_name == "phone_number":
            return user.primary_phone()
        value: str | None = user.primary_email() if field_name == "email_address" else getattr(user, field_name)
        return value

    present = sorted((m for m in found if key(m) is not None), key=lambda m: key(m) or "", reverse=descending)
    return present + [m for m in found if key(m) is None]


def _member_matches(user: UserRecord | None, params: Mapping[str, tuple[str, ...]]) -> bool:
    """The user filters of ``GET /organizations/{id}/memberships`` the emulator has the data for."""
    if user is None:
        return False
    emails = [e.email_address for e in user.emails]
    wanted_emails = {e.lower() for e in params.get("email_address", ())}
    if wanted_emails and not wanted_emails.intersection(emails):
        return False
    phones = [p.phone_number for p in user.phones]
    wanted_phones = set(params.get("phone_number", ()))
    if wanted_phones and not wanted_phones.intersection(phones):
        return False
    usernames = params.get("username", ())
    if usernames and user.username not in usernames:
        return False
    name = full_name(user.first_name, user.last_name)
    query = text_param(params, "query")
    if query and not text_matches(query, user.id, user.username, user.first_name, user.last_name, name, *emails,
                                  *phones):
        return False
    if not (text_matches(text_param(params, "email_address_query"), *emails)
            and text_matches(text_param(params, "phone_number_query"), *phones)
            and text_matches(text_param(params, "username_query"), user.username)
            and text_matches(text_param(params, "name_query"), user.first_name, user.last_name, name)):
        return False
    return in_range(user.last_active_at, ms_param(params, "last_active_at_after"),
                    ms_param(params, "last_active_at_before"))
