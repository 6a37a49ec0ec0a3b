"""Route guards for function views, sync or async; each answers through the one error table.

::

    @require_role("admin")          # role confirmed against the users row: demotion is immediate
    def admin_page(request): ...

    @require_org_role("org:admin")  # the token's org role, confirmed against the membership row
    def org_settings(request): ...

    @not_impersonated               # billing, password, deleting the account
    async def billing(request): ...

Every guard verifies the session itself when no middleware did, so a view stays protected wherever
it is mounted. Refusals are JSON: 401 (no/invalid session), 403 (not allowed), 503 (DB down).
Sync views never touch an event loop; async views use the ``a*`` variants.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from asgiref.sync import iscoroutinefunction, sync_to_async

from clerk_sync.auth.authenticator import Authenticator
from clerk_sync.auth.claims import Auth
from clerk_sync.auth.users import AuthUser
from clerk_sync.errors import AccessDenied, ClerkSyncError
from clerk_sync.integrations.django.request import ClerkRequest, aclerk_request, clerk_request
from clerk_sync.integrations.django.views import error_json

__all__ = [
    "Check",
    "check_role",
    "clerk_guard",
    "clerk_login_required",
    "confirm_org_role",
    "not_impersonated",
    "require_org_role",
    "require_permission",
    "require_role",
]

V = TypeVar("V", bound=Callable[..., Any])
#: A guard's test: raise a ClerkSyncError to refuse. ``needs_user`` guards get the row as well.
Check = Callable[[Auth, AuthUser | None], None]


def check_role(user: AuthUser, roles: tuple[str, ...]) -> None:
    if user.role not in roles:
        raise AccessDenied(f"role {user.role!r} is not one of {sorted(roles)}")


def clerk_guard(check: Check, *, needs_user: bool = False, standing: bool = True) -> Callable[[V], V]:
    """Build a decorator from a check; the other guards are made with it. The check gets ``request.clerk.auth``
    (the organization as the database has it: one read a request, when the token names an organization role),
    or with ``standing=False`` the token's session (no membership read)."""

    def decorate(view: V) -> V:
        if iscoroutinefunction(view):

            @functools.wraps(view)
            async def async_view(request: Any, *args: Any, **kwargs: Any) -> Any:
                state = await aclerk_request(request)
                try:
                    auth = state.require_session()
                    if standing:
                        await state.astanding()  # (the read in a worker thread)
                        auth = state.require_auth()
                    check(auth, await state.auser() if needs_user else None)
                except ClerkSyncError as exc:
                    return error_json(exc)
                return await view(request, *args, **kwargs)

            return async_view  # type: ignore[return-value]

        @functools.wraps(view)
        def sync_view(request: Any, *args: Any, **kwargs: Any) -> Any:
            state = clerk_request(request)
            try:
                _run(check, state, needs_user, standing)
            except ClerkSyncError as exc:
                return error_json(exc)
            return view(request, *args, **kwargs)

        return sync_view  # type: ignore[return-value]

    return decorate


def _run(check: Check, state: ClerkRequest, needs_user: bool, standing: bool) -> None:
    auth = state.require_auth() if standing else state.require_session()
    check(auth, state.user if needs_user else None)


def _signed_in(auth: Auth, user: AuthUser | None) -> None:
    """Nothing beyond a verified session (``require_auth`` already ran)."""


def clerk_login_required(view: V) -> V:
    """A verified session (401 otherwise); neither the user's row nor the membership is read."""
    return clerk_guard(_signed_in, standing=False)(view)


def require_role(*roles: str) -> Callable[[V], V]:
    """The app role (``users.role``) is one of ``roles``, confirmed against the DB on each request."""

    def check(auth: Auth, user: AuthUser | None) -> None:
        assert user is not None  # needs_user
        check_role(user, roles)

    return clerk_guard(check, needs_user=True, standing=False)


def confirm_org_role(state: ClerkRequest, roles: tuple[str, ...]) -> Auth:
    """The session's organization role (token first), confirmed against the membership row: see
    :meth:`~clerk_sync.auth.authenticator.Authenticator.confirm_org_role`, judging ``state.auth`` (read once a
    request, by whichever asks first). Blocking (one indexed query when the token passes and nothing read it
    yet): async callers run it in a worker thread."""
    auth = Authenticator.require_org_role(state.require_session(), *roles)  # the token's first: a "no" reads nothing
    return state.runtime.authenticator.confirm_org_role(auth, *roles, standing=state.require_auth())


def _confirm_permission(state: ClerkRequest, permission: str) -> Auth:
    """``permission`` in the token first (a "no" reads nothing: 403 from the token alone, even with the database
    down), then still granted by the membership row: see
    :meth:`~clerk_sync.auth.authenticator.Authenticator.confirm_permission`, judging ``state.auth``. Blocking,
    as :func:`confirm_org_role`."""
    auth = Authenticator.require_permission(state.require_session(), permission)
    return state.runtime.authenticator.confirm_permission(auth, permission, standing=state.require_auth())


def _org_guard(confirm: Callable[[ClerkRequest], object]) -> Callable[[V], V]:
    """A decorator running ``confirm`` (sync; in a worker thread for an async view)."""

    def decorate(view: V) -> V:
        if iscoroutinefunction(view):

            @functools.wraps(view)
            async def async_view(request: Any, *args: Any, **kwargs: Any) -> Any:
                state = await aclerk_request(request)
                try:
                    await sync_to_async(confirm, thread_sensitive=False)(state)
                except ClerkSyncError as exc:
                    return error_json(exc)
                return await view(request, *args, **kwargs)

            return async_view  # type: ignore[return-value]

        @functools.wraps(view)
        def sync_view(request: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                confirm(clerk_request(request))
            except ClerkSyncError as exc:
                return error_json(exc)
            return view(request, *args, **kwargs)

        return sync_view  # type: ignore[return-value]

    return decorate


def require_org_role(*roles: str) -> Callable[[V], V]:
    """The session's active organization role is one of ``roles`` (e.g. ``"org:admin"``), confirmed against
    the ``organization_memberships`` row on each request: a member removed or demoted is refused at once."""
    return _org_guard(lambda state: confirm_org_role(state, roles))


def require_permission(permission: str) -> Callable[[V], V]:
    """The active organization grants ``permission`` (e.g. ``"org:invoices:read"``): in the token (judged first:
    a "no" reads nothing), and still granted by the membership row (:func:`_confirm_permission`: none for a
    removed member, and only the token's that the row lists once the role changed). A system permission
    (``org:sys_*``), which tokens never carry, is refused here (``ValueError``)."""
    Authenticator.guardable_permission(permission)
    return _org_guard(lambda state: _confirm_permission(state, permission))


def _not_impersonated(auth: Auth, user: AuthUser | None) -> None:
    Authenticator.forbid_impersonation(auth)


def not_impersonated(view: V) -> V:
    """Refuse sessions where an admin acts as the user (billing, password, deleting the account)."""
    return clerk_guard(_not_impersonated, standing=False)(view)
