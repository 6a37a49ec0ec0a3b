"""Django REST framework: an authentication class and permission classes over the same checks::

    REST_FRAMEWORK = {"DEFAULT_AUTHENTICATION_CLASSES": [
        "clerk_sync.integrations.django.rest_framework.ClerkAuthentication"]}

    class Invoices(APIView):
        permission_classes = [IsClerkAuthenticated, HasPermission.of("org:invoices:read")]

They compose with DRF's ``|``, ``&`` and ``~``: ``HasRole.of("admin") | HasOrgRole.of("org:admin")``, whichever
authentication classes the view has (a session ``ClerkMiddleware`` verified that none of them took is authenticated
as :class:`ClerkAuthentication` would, so DRF refuses with 403, not its 401 ``NotAuthenticated``).

``request.auth`` is the verified :class:`~clerk_sync.auth.claims.Auth`, its active organization as the database
has it (read once a request, shared with :class:`HasOrgRole` and :class:`HasPermission`); ``request.user`` is the
Django user when :class:`~.backends.ClerkBackend` is installed, else a :class:`ClerkPrincipal`. With the backend
installed, a session whose Django user it refuses (inactive, or a local account it never takes over)
is not authenticated here either: 401 ``AuthenticationFailed``, as plain Django views see
``AnonymousUser``. Other refusals keep the status, body and headers of the one error table
(``{"error": ..., "message": ...}``) where a Clerk class decides: a failed ``__session`` cookie is
anonymous to :class:`ClerkAuthentication`, so DRF's own ``IsAuthenticated`` answers its generic 401 for
it, where :class:`IsClerkAuthenticated` answers the cookie's own error (``token_expired``, 503 while the
database is down).
"""

from __future__ import annotations

from typing import Any, ClassVar

try:
    from rest_framework import exceptions
    from rest_framework.authentication import BaseAuthentication, CSRFCheck
    from rest_framework.permissions import BasePermission
    from rest_framework.request import Request
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("clerk_sync.integrations.django.rest_framework needs djangorestframework: "
                      "pip install 'clerk-sync[django]'") from exc

from django.http import HttpResponse

from clerk_sync.auth.authenticator import Authenticator
from clerk_sync.auth.claims import Auth
from clerk_sync.errors import AccessDenied, ClerkSyncError, UserBanned, UserDeleted
from clerk_sync.integrations.django.decorators import check_role, confirm_org_role
from clerk_sync.integrations.django.request import ClerkRequest, ClerkUserUnavailable, clerk_request
from clerk_sync.integrations.http import error_response

__all__ = [
    "ClerkAPIException",
    "ClerkAuthentication",
    "ClerkPrincipal",
    "HasOrgRole",
    "HasPermission",
    "HasRole",
    "IsClerkAuthenticated",
    "NotImpersonated",
    "clerk_auth",
]

class ClerkAPIException(exceptions.APIException):
    """A clerk-sync error in DRF's shape, with the status, body and headers of ``error_response``."""

    def __init__(self, error: ClerkSyncError) -> None:
        answer = error_response(error)
        super().__init__(detail=answer.body)
        self.status_code = answer.status
        self.error = error
        self.auth_header = answer.headers.get("WWW-Authenticate")
        retry_after = answer.headers.get("Retry-After")
        self.wait = float(retry_after) if retry_after else None


class ClerkPrincipal:
    """``request.user`` for a Clerk session when no Django user is linked (no backend installed).

    It answers what DRF and Django read from a user (``pk`` for ``UserRateThrottle``, ``is_staff`` for
    ``IsAdminUser``, ``has_perm`` for model permissions), as ``AnonymousUser`` does: the Clerk id, and
    no staff, superuser or Django permission (Clerk roles are checked with :class:`HasRole` & co.).
    """

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_staff = False
    is_superuser = False

    def __init__(self, auth: Auth) -> None:
        self.auth = auth
        self.clerk_id = auth.user_id
        self.pk = self.id = self.username = auth.user_id

    def __str__(self) -> str:
        return self.clerk_id

    def get_username(self) -> str:
        return self.clerk_id

    def has_perm(self, perm: str, obj: Any = None) -> bool:
        return False

    def has_perms(self, perm_list: Any, obj: Any = None) -> bool:
        return False

    def has_module_perms(self, module: str) -> bool:
        return False


def clerk_auth(request: Request) -> Auth:
    """``request.auth`` typed: the verified session, its organization as the database has it (raises the 401
    when there is none, the 503 when the database is down)."""
    state = _require(request)
    try:
        return state.require_auth()
    except ClerkSyncError as exc:
        raise ClerkAPIException(exc) from exc


def _state(request: Request) -> ClerkRequest:
    return clerk_request(request._request)


def _require(request: Request) -> ClerkRequest:
    """The verified session, or the refusal. A session from the ``__session`` cookie is ambient: unless
    :class:`ClerkAuthentication` authenticated the request (and checked CSRF then), Django's CSRF check
    runs here, since APIView is CSRF-exempt and the view's own classes may be any (or none)."""
    state = _state(request)
    try:
        state.require_session()  # (no membership read: a check that needs it reads it, once a request)
    except ClerkSyncError as exc:
        raise ClerkAPIException(exc) from exc
    if request.authenticators and not request.successful_authenticator:
        _authenticate_as_clerk(request)
    if not _has_bearer(request) and not isinstance(request.successful_authenticator, ClerkAuthentication):
        ClerkAuthentication.enforce_csrf(request)
    return state


def _authenticate_as_clerk(request: Request) -> None:
    """The session verified by the middleware, on a view whose own classes took nothing (SessionAuthentication
    without ClerkBackend): authenticated as :class:`ClerkAuthentication` would have, so that DRF answers a
    check's False with 403 and its message, not 401 ``NotAuthenticated``, and ``|``, ``&``, ``~`` compose."""
    authenticator = ClerkAuthentication()
    found = authenticator.authenticate(request)  # (CSRF for a cookie; the backend's refusal is its 401)
    assert found is not None  # (a verified session)
    request._authenticator = authenticator  # type: ignore[attr-defined]  # (successful_authenticator: no setter)
    request.user, request.auth = found


def _has_bearer(request: Request) -> bool:
    bearer = request._request.headers.get("Authorization", "")
    return bearer[:7].lower() == "bearer " and bool(bearer[7:].strip())


class ClerkAuthentication(BaseAuthentication):
    """Bearer token or ``__session`` cookie; no token means anonymous (other classes may try).

    A ``__session`` cookie that fails (expired, revoked..) is anonymous too, as on plain Django views: a
    public view serves the visitor signed out, and the Clerk permission classes answer the cookie's
    own error (401 ``token_expired``..). A Bearer token that fails is refused here (401)."""

    def authenticate(self, request: Request) -> tuple[Any, Auth] | None:
        state = _state(request)
        if state.token_auth is None:
            if state.error is None or not _has_bearer(request):
                return None
            raise ClerkAPIException(state.error)
        if not _has_bearer(request):
            self.enforce_csrf(request)  # the __session cookie is ambient: as DRF's SessionAuthentication
        try:
            auth = state.require_auth()  # request.auth: the organization as the database has it (503 if down)
        except ClerkSyncError as exc:
            raise ClerkAPIException(exc) from exc
        return self._user(request, state), auth

    @staticmethod
    def enforce_csrf(request: Request) -> None:
        """Django's CSRF check for cookie-authenticated requests (APIView is CSRF-exempt otherwise)."""
        check = CSRFCheck(lambda _: HttpResponse())
        check.process_request(request._request)
        reason = check.process_view(request._request, None, (), {})  # type: ignore[arg-type]
        if reason:
            raise exceptions.PermissionDenied(f"CSRF Failed: {reason}")

    def authenticate_header(self, request: Request) -> str:
        return "Bearer"

    @staticmethod
    def _user(request: Request, state: ClerkRequest) -> Any:
        """The Django user when :class:`~.backends.ClerkBackend` is installed (never a principal in its
        place: a user the backend refuses fails authentication), else a :class:`ClerkPrincipal`."""

        assert state.auth is not None
        from clerk_sync.integrations.django.backends import django_user, uses_clerk_backend

        if not uses_clerk_backend():
            return ClerkPrincipal(state.auth)

        try:  # the row first: none (late webhook, JIT off or failing), or deleted, answers its own error
            _ = state.user
        except ClerkSyncError as exc:
            raise ClerkAPIException(exc) from exc
        try:
            user = django_user(request._request, state)
        except ClerkUserUnavailable as exc:  # Django's database down (the row was read): 503, as for the row
            raise ClerkAPIException(exc.error) from exc
        if not user.is_authenticated:
            raise exceptions.AuthenticationFailed(
                f"Clerk user {state.auth.user_id} has no Django user that may sign in: ClerkBackend refused "
                "it (inactive, or a local account with a usable password that a Clerk session never takes over)")
        return user


class IsClerkAuthenticated(BasePermission):
    """A verified Clerk session (401 otherwise), whichever class authenticated the request."""

    def has_permission(self, request: Request, view: Any) -> bool:
        _require(request)
        return True


class _ClerkCheck(BasePermission):
    def has_permission(self, request: Request, view: Any) -> bool:
        """The check's own "no" (403) is False, so that DRF's ``|``, ``&`` and ``~`` compose it (``HasRole.of(
        "admin") | HasOrgRole.of("org:admin")``: raised, it refused before the other side was asked), with
        the error table's body as DRF's message. Everything else is raised: no session (401), a banned or
        deleted row, the database or Clerk down (503) are no answer to compose."""
        state = _require(request)
        try:
            self.check(state)
        except AccessDenied as exc:
            if isinstance(exc, UserBanned | UserDeleted):
                raise ClerkAPIException(exc) from exc
            self.message, self.code = error_response(exc).body, exc.code
            return False
        except ClerkSyncError as exc:
            raise ClerkAPIException(exc) from exc
        return True

    def has_object_permission(self, request: Request, view: Any, obj: Any) -> bool:
        """The same answer for an object (retrieve, update, destroy): BasePermission's default, True, made
        ``~HasRole.of(...)`` refuse everyone on a detail view."""
        return self.has_permission(request, view)

    def check(self, state: ClerkRequest) -> None:
        raise NotImplementedError


class HasRole(_ClerkCheck):
    """``users.role`` in :attr:`roles`, confirmed against the DB; ``HasRole.of("admin")``."""

    roles: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def of(cls, *roles: str) -> type[HasRole]:
        return type(f"HasRole_{'_'.join(roles)}", (cls,), {"roles": roles})

    def check(self, state: ClerkRequest) -> None:
        check_role(state.user, self.roles)


class HasOrgRole(_ClerkCheck):
    """The active organization role in :attr:`roles`, confirmed against the membership row (a member
    removed or demoted is refused at once); ``HasOrgRole.of("org:admin")``. The view's ``request.auth`` (as
    ``clerk_auth(request)``) then holds the database's role, not the token's."""

    roles: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def of(cls, *roles: str) -> type[HasOrgRole]:
        return type(f"HasOrgRole_{'_'.join(roles)}", (cls,), {"roles": roles})

    def check(self, state: ClerkRequest) -> None:
        confirm_org_role(state, self.roles)


class HasPermission(_ClerkCheck):
    """The active organization grants :attr:`permission`, in the token and still by the membership row (as
    ``request.auth`` shows it); ``HasPermission.of("org:invoices:read")``."""

    permission: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:  # HasPermission.of("org:sys_...") is refused at once
        super().__init_subclass__(**kwargs)
        if cls.permission:
            Authenticator.guardable_permission(cls.permission)

    @classmethod
    def of(cls, permission: str) -> type[HasPermission]:
        return type(f"HasPermission_{permission}", (cls,), {"permission": permission})

    def check(self, state: ClerkRequest) -> None:
        auth = Authenticator.require_permission(state.require_session(), self.permission)  # a "no" reads nothing
        state.runtime.authenticator.confirm_permission(auth, self.permission, standing=state.require_auth())


class NotImpersonated(_ClerkCheck):
    """Refuse (403) a session where an admin acts as the user: views an impersonator must not use
    (billing, password, deleting the account), as ``not_impersonated`` does for Django views."""

    def check(self, state: ClerkRequest) -> None:
        Authenticator.forbid_impersonation(state.require_session())
