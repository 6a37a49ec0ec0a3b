"""Backend API routes (``/v1``): the subset of Clerk's BAPI that clerk-sync relies on.

Paths, parameters and response shapes follow ``bapi/2026-05-12.yml``; handlers are thin:
parse the request, call the operation in ``users``/``orgs``/``sessions``, return JSON.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from . import orgs, sessions, users
from .endpoints import (
    api_version,
    bapi_endpoint,
    base_url,
    bool_param,
    emulator_of,
    first_param,
    int_param,
    json_body,
    list_param,
)
from .errors import ClerkAPIError

__all__ = ["bapi_routes"]

JSON = dict[str, Any]
# The orderings a ``starting_after`` cursor works with: unique and immutable (no prefix means "+").
_CURSOR_ORDERINGS = frozenset({"created_at", "+created_at", "-created_at"})
# ``GET /users`` id filters "accept up to 100" values each.
_MAX_FILTER_VALUES = 100
# ``GET /sessions?status=``: the spec's enum.
_SESSION_STATUSES = frozenset({"abandoned", "active", "ended", "expired", "removed", "replaced", "revoked"})


def _paging(request: Request) -> tuple[int, int]:
    return (
        int_param(request, "limit", 10, minimum=1, maximum=500),
        int_param(request, "offset", 0),
    )


def _user_query(request: Request) -> users.UserQuery:
    limit, offset = _paging(request)
    order_by = first_param(request, "order_by") or "-created_at"
    starting_after = request.query_params.get("starting_after") or None
    if starting_after and offset:
        raise ClerkAPIError.invalid("starting_after", "starting_after cannot be used with offset")
    if starting_after and order_by not in _CURSOR_ORDERINGS:
        raise ClerkAPIError.invalid(
            "order_by",
            f"starting_after requires ordering by created_at (order_by omitted, created_at, +created_at "
            f"or -created_at), not order_by={order_by}",
        )
    return users.UserQuery(
        email_addresses=tuple(e.lower() for e in _id_filter(request, "email_address")),
        user_ids=_id_filter(request, "user_id"),
        external_ids=_id_filter(request, "external_id"),
        usernames=_id_filter(request, "username"),
        query=request.query_params.get("query") or None,
        banned=bool_param(request, "banned"),
        order_by=order_by,
        limit=limit,
        offset=offset,
        starting_after=starting_after,
    )


def _id_filter(request: Request, name: str) -> tuple[str, ...]:
    values = list_param(request, name)
    if len(values) > _MAX_FILTER_VALUES:
        raise ClerkAPIError.invalid(name, f"{name} accepts up to {_MAX_FILTER_VALUES} values, got {len(values)}")
    return values


# -- users -------------------------------------------------------------------------------


async def list_users(request: Request) -> Any:
    emulator, query = emulator_of(request), _user_query(request)
    deepest = emulator.config.max_user_offset
    if deepest is not None and query.offset > deepest:
        raise ClerkAPIError(504, "request_timeout", "Request timed out",
                            f"Listing users at offset {query.offset} timed out: page with starting_after instead.")
    return users.list_users(emulator.store, query)


async def count_users(request: Request) -> Any:
    total = users.count_users(emulator_of(request).store, _user_query(request))
    return {"object": "total_count", "total_count": total}


async def create_user(request: Request) -> Any:
    return users.create_user(emulator_of(request).store, await json_body(request))


async def get_user(request: Request) -> Any:
    return users.get_user(emulator_of(request).store, request.path_params["user_id"])


async def update_user(request: Request) -> Any:
    version = api_version(request)
    return users.update_user(
        emulator_of(request).store, request.path_params["user_id"], await json_body(request), version
    )


async def delete_user(request: Request) -> Any:
    return users.delete_user(emulator_of(request).store, request.path_params["user_id"])


async def merge_user_metadata(request: Request) -> Any:
    body = await json_body(request)
    return users.merge_metadata(emulator_of(request).store, request.path_params["user_id"], body)


async def replace_user_metadata(request: Request) -> Any:
    body = await json_body(request)
    return users.replace_metadata(emulator_of(request).store, request.path_params["user_id"], body)


async def lock_user(request: Request) -> Any:
    """``POST /users/{id}/lock``: locked for the instance's lockout duration (the spec's request has no body;
    the duration is an instance setting, ``Store.lockout_duration_s``), from the emulator's clock. The lock
    then ends by itself: rendered unlocked once the end passes, with no event and no updated_at bump."""
    store = emulator_of(request).store
    user_id = request.path_params["user_id"]
    with store.lock:
        user = users.require_user(store, user_id)
        duration = store.lockout_duration_s
        user.lock_clock = store.clock
        user.lock_ends_at = None if duration is None else int(store.clock() * 1000) + round(duration * 1000)
        return users.set_flag(store, user_id, "locked", True)


def _flag(flag: str, value: bool) -> Any:
    async def handler(request: Request) -> Any:
        return users.set_flag(emulator_of(request).store, request.path_params["user_id"], flag, value)

    return handler


async def user_memberships(request: Request) -> Any:
    store = emulator_of(request).store
    user_id = request.path_params["user_id"]
    users.require_user(store, user_id)
    limit, offset = _paging(request)
    return orgs.list_memberships(store, user_id=user_id, limit=limit, offset=offset)


# -- organizations -----------------------------------------------------------------------


async def list_orgs(request: Request) -> Any:
    limit, offset = _paging(request)
    return orgs.list_orgs(
        emulator_of(request).store,
        query=request.query_params.get("query") or None,
        user_ids=list_param(request, "user_id"),
        org_ids=list_param(request, "organization_id"),
        order_by=first_param(request, "order_by") or "-created_at",
        limit=limit,
        offset=offset,
    )


async def create_org(request: Request) -> Any:
    return orgs.create_org(emulator_of(request).store, await json_body(request))


async def get_org(request: Request) -> Any:
    return orgs.get_org(emulator_of(request).store, request.path_params["org_id"])


async def update_org(request: Request) -> Any:
    version = api_version(request)
    body = await json_body(request)
    return orgs.update_org(emulator_of(request).store, request.path_params["org_id"], body, version)


async def delete_org(request: Request) -> Any:
    return orgs.delete_org(emulator_of(request).store, request.path_params["org_id"])


async def merge_org_metadata(request: Request) -> Any:
    body = await json_body(request)
    return orgs.merge_org_metadata(emulator_of(request).store, request.path_params["org_id"], body)


async def replace_org_metadata(request: Request) -> Any:
    body = await json_body(request)
    return orgs.replace_org_metadata(emulator_of(request).store, request.path_params["org_id"], body)


async def list_org_memberships(request: Request) -> Any:
    limit, offset = _paging(request)
    return orgs.list_memberships(
        emulator_of(request).store,
        org=request.path_params["org_id"],
        user_ids=_id_filter(request, "user_id"),
        roles=list_param(request, "role"),
        order_by=first_param(request, "order_by") or "created_at",
        limit=limit,
        offset=offset,
    )


async def create_membership(request: Request) -> Any:
    body = await json_body(request)
    return orgs.create_membership(emulator_of(request).store, request.path_params["org_id"], body)


async def update_membership(request: Request) -> Any:
    body = await json_body(request)
    params = request.path_params
    return orgs.update_membership(emulator_of(request).store, params["org_id"], params["user_id"], body)


async def delete_membership(request: Request) -> Any:
    params = request.path_params
    return orgs.delete_membership(emulator_of(request).store, params["org_id"], params["user_id"])


async def merge_membership_metadata(request: Request) -> Any:
    body = await json_body(request)
    params = request.path_params
    return orgs.merge_membership_metadata(emulator_of(request).store, params["org_id"], params["user_id"], body)


async def instance_memberships(request: Request) -> Any:
    limit, offset = _paging(request)
    return orgs.list_memberships(
        emulator_of(request).store,
        order_by=first_param(request, "order_by") or "created_at",
        limit=limit,
        offset=offset,
    )


# -- sessions and tokens -----------------------------------------------------------------


async def list_sessions(request: Request) -> Any:
    user_id = request.query_params.get("user_id") or None
    client_id = request.query_params.get("client_id") or None
    if user_id is None and client_id is None:
        raise ClerkAPIError.invalid("user_id", "Either user_id or client_id must be provided")
    status = request.query_params.get("status") or None
    if status is not None and status not in _SESSION_STATUSES:
        raise ClerkAPIError.invalid("status", f"status must be one of {', '.join(sorted(_SESSION_STATUSES))}")
    limit, offset = _paging(request)
    found = sessions.list_sessions(
        emulator_of(request).store, user_id=user_id, client_id=client_id, status=status
    )
    page = found[offset : offset + limit]
    if bool_param(request, "paginated"):
        return {"data": page, "total_count": len(found)}
    return page


async def create_session(request: Request) -> Any:
    body = await json_body(request)
    user_id = body.get("user_id")
    if not isinstance(user_id, str):
        raise ClerkAPIError.missing("user_id")
    return sessions.create_session(
        emulator_of(request).store, user_id, organization_id=body.get("active_organization_id")
    )


async def get_session(request: Request) -> Any:
    return sessions.get_session(emulator_of(request).store, request.path_params["session_id"])


async def revoke_session(request: Request) -> Any:
    store = emulator_of(request).store
    return sessions.end_session(store, request.path_params["session_id"], "revoked")


async def create_session_token(request: Request) -> Any:
    body = await json_body(request)
    expires_in = body.get("expires_in_seconds")
    if expires_in is not None and (not isinstance(expires_in, int) or expires_in < 30):
        raise ClerkAPIError.invalid("expires_in_seconds", "expires_in_seconds must be at least 30")
    emulator = emulator_of(request)
    jwt = emulator.session_token(
        request.path_params["session_id"],
        template_name=request.path_params.get("template_name"),
        expires_in_s=expires_in,
        issuer=emulator.issuer(base_url(request)),
    )
    return {"object": "token", "jwt": jwt}


async def create_actor_token(request: Request) -> Any:
    emulator = emulator_of(request)
    limit = emulator.config.actor_tokens_per_month
    if limit is not None and sessions.actor_tokens_in_last_month(emulator.store) >= limit:
        # Clerk answers 402 here (spec: POST /actor_tokens -> 400, 402, 422): free plans allow 5 a month
        raise ClerkAPIError(402, "payment_required", "Actor tokens are limited on your plan",
                            f"Your plan allows {limit} impersonations a month; upgrade it to impersonate more users.")
    token = sessions.create_actor_token(emulator.store, await json_body(request))
    return sessions.render_actor_token(token, base_url(request))


async def revoke_actor_token(request: Request) -> Any:
    token = sessions.revoke_actor_token(emulator_of(request).store, request.path_params["token_id"])
    return sessions.render_actor_token(token, base_url(request))


async def create_sign_in_token(request: Request) -> Any:
    token = sessions.create_sign_in_token(emulator_of(request).store, await json_body(request))
    return sessions.render_sign_in_token(token, base_url(request))


async def revoke_sign_in_token(request: Request) -> Any:
    store = emulator_of(request).store
    token = sessions.revoke_sign_in_token(store, request.path_params["token_id"])
    return sessions.render_sign_in_token(token, base_url(request))


async def jwks(request: Request) -> Any:
    return emulator_of(request).keys.jwks()


async def get_instance(request: Request) -> Any:
    """``GET /instance``: the instance the secret key belongs to (the spec's Instance object)."""
    return {"object": "instance", "id": emulator_of(request).config.instance_id, "environment_type": "development",
            "allowed_origins": None, "workspace_id": None}


def _route(path: str, handler: Any, *methods: str, rate_limited: bool = True) -> Route:
    return Route("/v1" + path, bapi_endpoint(handler, rate_limited=rate_limited), methods=list(methods))


def bapi_routes() -> list[Route]:
    """All ``/v1`` routes (``/users/count`` before ``/users/{user_id}``)."""
    return [
        _route("/jwks", jwks, "GET", rate_limited=False),
        _route("/instance", get_instance, "GET"),
        _route("/users", list_users, "GET"),
        _route("/users", create_user, "POST"),
        _route("/users/count", count_users, "GET"),
        _route("/users/{user_id}", get_user, "GET"),
        _route("/users/{user_id}", update_user, "PATCH"),
        _route("/users/{user_id}", delete_user, "DELETE"),
        _route("/users/{user_id}/metadata", merge_user_metadata, "PATCH"),
        _route("/users/{user_id}/metadata", replace_user_metadata, "PUT"),
        _route("/users/{user_id}/ban", _flag("banned", True), "POST"),
        _route("/users/{user_id}/unban", _flag("banned", False), "POST"),
        _route("/users/{user_id}/lock", lock_user, "POST"),
        _route("/users/{user_id}/unlock", _flag("locked", False), "POST"),
        _route("/users/{user_id}/organization_memberships", user_memberships, "GET"),
        _route("/organizations", list_orgs, "GET"),
        _route("/organizations", create_org, "POST"),
        _route("/organizations/{org_id}", get_org, "GET"),
        _route("/organizations/{org_id}", update_org, "PATCH"),
        _route("/organizations/{org_id}", delete_org, "DELETE"),
        _route("/organizations/{org_id}/metadata", merge_org_metadata, "PATCH"),
        _route("/organizations/{org_id}/metadata", replace_org_metadata, "PUT"),
        _route("/organizations/{org_id}/memberships", list_org_memberships, "GET"),
        _route("/organizations/{org_id}/memberships", create_membership, "POST"),
        _route("/organizations/{org_id}/memberships/{user_id}", update_membership, "PATCH"),
        _route("/organizations/{org_id}/memberships/{user_id}", delete_membership, "DELETE"),
        _route("/organizations/{org_id}/memberships/{user_id}/metadata", merge_membership_metadata, "PATCH"),
        _route("/organization_memberships", instance_memberships, "GET"),
        _route("/sessions", list_sessions, "GET"),
        _route("/sessions", create_session, "POST"),
        _route("/sessions/{session_id}", get_session, "GET"),
        _route("/sessions/{session_id}/revoke", revoke_session, "POST"),
        _route("/sessions/{session_id}/tokens", create_session_token, "POST"),
        _route("/sessions/{session_id}/tokens/{template_name}", create_session_token, "POST"),
        _route("/actor_tokens", create_actor_token, "POST"),
        _route("/actor_tokens/{token_id}/revoke", revoke_actor_token, "POST"),
        _route("/sign_in_tokens", create_sign_in_token, "POST"),
        _route("/sign_in_tokens/{token_id}/revoke", revoke_sign_in_token, "POST"),
    ]
