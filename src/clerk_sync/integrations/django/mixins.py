"""The guards of :mod:`.decorators` for class-based views (put the mixin first)::

    class AdminUsers(RoleRequiredMixin, View):
        required_roles = ("admin",)
        def get(self, request): ...

Each mixin wraps ``dispatch`` in the matching decorator, so checks and answers are the same; views
with ``async def`` handlers get the async guards.
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.http import HttpRequest, HttpResponseBase

from clerk_sync.auth.authenticator import Authenticator
from clerk_sync.integrations.django import decorators

__all__ = [
    "ClerkLoginRequiredMixin",
    "NotImpersonatedMixin",
    "OrgPermissionRequiredMixin",
    "OrgRoleRequiredMixin",
    "RoleRequiredMixin",
]


class _GuardMixin:
    def _guard(self) -> Any:
        raise NotImplementedError

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        parent = super().dispatch  # type: ignore[misc]
        if getattr(self, "view_is_async", False):  # Django's View: the handlers are coroutines

            async def parent_async(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
                response: HttpResponseBase = await parent(request, *args, **kwargs)
                return response

            return self._guard()(parent_async)(request, *args, **kwargs)
        return self._guard()(parent)(request, *args, **kwargs)


def _names(value: str | tuple[str, ...]) -> tuple[str, ...]:
    """One name or several, as Django's ``PermissionRequiredMixin`` takes ``permission_required``: a string was
    read letter by letter (``required_roles = "admin"`` refused the admin and let a role ``"a"`` in: review)."""
    return (value,) if isinstance(value, str) else tuple(value)


class ClerkLoginRequiredMixin(_GuardMixin):
    """A verified Clerk session (401 otherwise)."""

    def _guard(self) -> Any:
        return decorators.clerk_login_required


class RoleRequiredMixin(_GuardMixin):
    """``users.role`` in :attr:`required_roles`, confirmed against the DB."""

    required_roles: ClassVar[str | tuple[str, ...]] = ()  # (one role as a string too)

    def _guard(self) -> Any:
        if not self.required_roles:
            raise TypeError(f"{type(self).__name__} sets no required_roles")
        return decorators.require_role(*_names(self.required_roles))


class OrgRoleRequiredMixin(_GuardMixin):
    """The active organization role in :attr:`required_org_roles`, confirmed against the membership row
    (see :func:`~.decorators.require_org_role`)."""

    required_org_roles: ClassVar[str | tuple[str, ...]] = ()  # (one role as a string too)

    def _guard(self) -> Any:
        if not self.required_org_roles:
            raise TypeError(f"{type(self).__name__} sets no required_org_roles")
        return decorators.require_org_role(*_names(self.required_org_roles))


class OrgPermissionRequiredMixin(_GuardMixin):
    """The active organization grants :attr:`required_permission` (from the token)."""

    required_permission: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:  # a system permission is refused when the view is defined
        super().__init_subclass__(**kwargs)
        if cls.required_permission:
            Authenticator.guardable_permission(cls.required_permission)

    def _guard(self) -> Any:
        if not self.required_permission:
            raise TypeError(f"{type(self).__name__} sets no required_permission")
        return decorators.require_permission(self.required_permission)


class NotImpersonatedMixin(_GuardMixin):
    """Refuse impersonated sessions."""

    def _guard(self) -> Any:
        return decorators.not_impersonated
