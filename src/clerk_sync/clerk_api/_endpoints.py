"""The Backend API calls clerk-sync makes, as pure :class:`ApiRequest` values (paths per BAPI 2026-05-12).

Both client faces turn these into requests; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from clerk_sync.clerk_api._policy import ApiRequest
from clerk_sync.errors import ClerkAPIError

__all__ = ["JSON", "Page"]

JSON = dict[str, Any]
MAX_PAGE = 500  # Clerk's largest ``limit``


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a ``{data, total_count}`` listing."""

    data: list[JSON]
    total_count: int


def _object(body: Any) -> JSON:
    if not isinstance(body, dict):
        raise ClerkAPIError(f"expected a JSON object from Clerk, got {type(body).__name__}")
    return body


def _array(body: Any) -> list[JSON]:
    if not isinstance(body, list):
        raise ClerkAPIError(f"expected a JSON array from Clerk, got {type(body).__name__}")
    return body


def _page(body: Any) -> Page:
    obj = _object(body)
    data, total = obj.get("data"), obj.get("total_count")
    if not isinstance(data, list) or not isinstance(total, int):
        raise ClerkAPIError("expected {data, total_count} from Clerk")
    return Page(data, total)


def _count(body: Any) -> int:
    total = _object(body).get("total_count")
    if not isinstance(total, int):
        raise ClerkAPIError("expected {total_count} from Clerk")
    return total


def _id(value: str) -> str:
    if not value:
        raise ValueError("an empty Clerk id")
    return quote(value, safe="")


def _paging(limit: int, offset: int, order_by: str | None) -> list[tuple[str, str]]:
    if not 1 <= limit <= MAX_PAGE or offset < 0:
        raise ValueError(f"limit must be 1..{MAX_PAGE} and offset >= 0")
    params = [("limit", str(limit)), ("offset", str(offset))]
    return params + ([("order_by", order_by)] if order_by else [])


def _compact(body: JSON) -> JSON:
    return {k: v for k, v in body.items() if v is not None}


def get_user(user_id: str) -> ApiRequest[JSON]:
    return ApiRequest("GET", f"/users/{_id(user_id)}", _object, coalesce=True, route="/users/{id}")


def list_users(limit: int, offset: int, order_by: str | None, user_ids: Sequence[str],
               starting_after: str | None = None, created_at_after: int | None = None) -> ApiRequest[list[JSON]]:
    params = _paging(limit, offset, order_by) + [("user_id", u) for u in user_ids]
    if created_at_after is not None:  # ms since the epoch, exclusive
        params.append(("created_at_after", str(created_at_after)))
    if starting_after is not None:  # a cursor: Clerk refuses it beside a non-zero offset (422)
        if offset:
            raise ValueError("starting_after cannot be combined with a non-zero offset")
        params = [p for p in params if p[0] != "offset"] + [("starting_after", starting_after)]
    return ApiRequest("GET", "/users", _array, tuple(params))


def get_instance() -> ApiRequest[JSON]:
    return ApiRequest("GET", "/instance", _object)


def count_users() -> ApiRequest[int]:
    return ApiRequest("GET", "/users/count", _count)


def get_organization(org_id: str) -> ApiRequest[JSON]:
    return ApiRequest("GET", f"/organizations/{_id(org_id)}", _object, coalesce=True,
                      route="/organizations/{id}")


def list_organizations(limit: int, offset: int, order_by: str | None, org_ids: Sequence[str]) -> ApiRequest[Page]:
    params = _paging(limit, offset, order_by) + [("organization_id", o) for o in org_ids]
    return ApiRequest("GET", "/organizations", _page, tuple(params))


def list_organization_memberships(org_id: str, limit: int, offset: int, order_by: str | None,
                                  user_ids: Sequence[str] = ()) -> ApiRequest[Page]:
    params = tuple(_paging(limit, offset, order_by) + [("user_id", u) for u in user_ids])
    return ApiRequest("GET", f"/organizations/{_id(org_id)}/memberships", _page, params,
                      route="/organizations/{id}/memberships")


def list_all_organization_memberships(limit: int, offset: int, order_by: str | None) -> ApiRequest[Page]:
    return ApiRequest("GET", "/organization_memberships", _page, tuple(_paging(limit, offset, order_by)))


def update_user_metadata(user_id: str, public: JSON | None, private: JSON | None,
                         unsafe: JSON | None) -> ApiRequest[JSON]:
    body = _compact({"public_metadata": public, "private_metadata": private, "unsafe_metadata": unsafe})
    return ApiRequest("PATCH", f"/users/{_id(user_id)}/metadata", _object, json=body, per_object_limit=True,
                      route="/users/{id}/metadata")


def create_actor_token(user_id: str, actor: JSON, expires_in_seconds: int | None,
                       session_max_duration_in_seconds: int | None) -> ApiRequest[JSON]:
    body = _compact({"user_id": user_id, "actor": actor, "expires_in_seconds": expires_in_seconds,
                     "session_max_duration_in_seconds": session_max_duration_in_seconds})
    return ApiRequest("POST", "/actor_tokens", _object, json=body, idempotent=False)


def create_sign_in_token(user_id: str, expires_in_seconds: int | None) -> ApiRequest[JSON]:
    body = _compact({"user_id": user_id, "expires_in_seconds": expires_in_seconds})
    return ApiRequest("POST", "/sign_in_tokens", _object, json=body, idempotent=False)


def revoke_session(session_id: str) -> ApiRequest[JSON]:
    # not idempotent: a revoke whose answer was lost, sent again, is refused ("not active") for a session it
    # revoked: the caller got ClerkValidationError for a success (review)
    return ApiRequest("POST", f"/sessions/{_id(session_id)}/revoke", _object, route="/sessions/{id}/revoke",
                      idempotent=False)
