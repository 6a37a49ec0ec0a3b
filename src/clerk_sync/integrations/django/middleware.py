"""``request.clerk``: the verified session of a Django request, and deny-by-default.

Add ``"clerk_sync.integrations.django.middleware.ClerkMiddleware"`` to ``MIDDLEWARE`` after
``AuthenticationMiddleware`` (with :class:`~.backends.ClerkBackend`, listed before it, it refuses to start:
``ImproperlyConfigured``, as Django's own refuses a setting it cannot work with).
Per request it verifies the session token (Bearer header or
``__session`` cookie: signatures are cached, no DB query) and sets ``request.clerk``, a
:class:`ClerkRequest` whose ``user`` row is read only when asked. With ``REQUIRE_AUTH`` it answers 401
on every path not declared public (``PUBLIC_PATHS``, ``PUBLIC_PREFIXES``, :func:`clerk_public`), unknown
ones too, before the view middleware (CSRF included) runs.
With :class:`~.backends.ClerkBackend` in ``AUTHENTICATION_BACKENDS``, ``request.user`` (and
``await request.auser()``) become the Django user linked to the Clerk id, again only when asked.

The middleware is sync and async capable: under WSGI nothing here touches an event loop; under
ASGI the ``a*`` variants run and database reads go to worker threads.

An outage answers 503, never a sign-in redirect. With the backend, ``request.user`` of a request carrying a
Clerk session raises :class:`~.request.ClerkUserUnavailable` while clerk-sync's database or Clerk is down
(see :mod:`.backends`), and this middleware answers it: 503 with ``Retry-After`` and a short body saying what
is unavailable, JSON (``{"error", "message"}``, as the guards answer) unless the client asks for HTML and not
JSON (a browser's page load), then plain text. Raised in a view, in the rendering of a ``TemplateResponse``
(``{{ user }}``, ``{% if user.is_authenticated %}``) or by Django's async ``login_required``, it reaches
:meth:`ClerkMiddleware.process_exception`. Raised where Django does not call ``process_exception`` (another
middleware's ``process_view``, as ``LoginRequiredMiddleware``'s; its ``process_template_response`` or
``__call__`` when listed after this one; an error page that renders ``user``), Django turns it into a 500
(logging its traceback) before this middleware sees the response, and the 500 is answered as the same 503.
``LoginRequiredMiddleware`` reads ``request.user`` before it looks at the view, so with it a request carrying a
session answers 503 during an outage on ``login_not_required`` views too. Not covered: a middleware listed
*before* this one that reads ``request.user`` once the response is made (its 500 is made outside this
middleware: list it after), and a streaming response whose content reads it (sent after every middleware
returned).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import Resolver404, resolve
from django.utils.functional import SimpleLazyObject
from django.utils.module_loading import import_string

from clerk_sync.auth.sessions import is_public_path
from clerk_sync.errors import ClerkSyncError, StoreError, StorePrivilegeMissing
from clerk_sync.integrations.django.request import (
    ClerkRequest,
    ClerkUserUnavailable,
    aclerk_request,
    clerk_request,
    is_outage,
)
from clerk_sync.integrations.django.views import error_json
from clerk_sync.integrations.http import _STORE_RETRY_AFTER_S  # the error table's, for a database outage

__all__ = ["ClerkMiddleware", "clerk_public"]

_MIDDLEWARE = "clerk_sync.integrations.django.middleware.ClerkMiddleware"
_AUTH_MIDDLEWARE = "django.contrib.auth.middleware.AuthenticationMiddleware"
V = TypeVar("V", bound=Callable[..., Any])


def clerk_public(view: V) -> V:
    """Mark a view as open without a session when ``REQUIRE_AUTH`` is on (like ``login_not_required``).
    A marked class-based view or ViewSet opens only itself: a subclass (a protected page built on a public one's
    code) is protected unless marked too."""
    view.clerk_public = True  # type: ignore[attr-defined]
    return view


def _inherited_dispatch_mark(view_class: type) -> bool:
    """Whether ``view_class`` takes a :func:`clerk_public` ``dispatch`` from a base class, not its own."""
    return "dispatch" not in vars(view_class) and getattr(getattr(view_class, "dispatch", None), "clerk_public",
                                                          False) is True


def _marked_public(owner: Any) -> bool:
    """Whether a view function or view class carries :func:`clerk_public`'s mark, a class's own only: read
    through inheritance, a subclass of a public view was served without a session under ``REQUIRE_AUTH``."""
    if isinstance(owner, type):
        return vars(owner).get("clerk_public", False) is True
    return getattr(owner, "clerk_public", False) is True


class ClerkMiddleware:
    """Sets ``request.clerk`` (and ``request.user`` with the backend); refuses non-public views when
    ``REQUIRE_AUTH`` is set; audits each request made while impersonating."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        from clerk_sync.integrations.django.conf import require_app_installed

        require_app_installed("ClerkMiddleware")  # (at start-up: Django builds the middleware chain then)
        _refuse_authentication_middleware_after_us()
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        state = clerk_request(request)  # (which audits a request made while impersonating, once)
        if state.is_authenticated:  # (the token's session: the membership is read only when asked)
            self._signed_in(request, state)
        elif (refusal := self._refusal(request, state)) is not None:
            return refusal
        elif is_outage(state.error):  # a session that could not be checked: request.user must not be anonymous
            self._link_user(request, state)
        return self._outage_answered(request, state, self.get_response(request))

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        state = await aclerk_request(request)
        if state.is_authenticated:  # (the token's session: the membership is read only when asked)
            self._signed_in(request, state)
        elif (refusal := self._refusal(request, state)) is not None:
            return refusal
        elif is_outage(state.error):
            self._link_user(request, state)
        response: Awaitable[HttpResponse] = self.get_response(request)
        return self._outage_answered(request, state, await response)

    @staticmethod
    def _outage_answered(request: HttpRequest, state: ClerkRequest, response: HttpResponse) -> HttpResponse:
        """The 503 in place of the 500 Django made of a :class:`ClerkUserUnavailable` raised where it calls no
        ``process_exception`` (another middleware's ``process_view``: ``LoginRequiredMiddleware``)."""
        if state.user_unavailable is not None and response.status_code == 500:
            return _user_unavailable_response(request, state.user_unavailable)
        return response

    @classmethod
    def _refusal(cls, request: HttpRequest, state: ClerkRequest) -> HttpResponse | None:
        """Deny by default, before any other middleware's view hook (CSRF included) gets to answer:
        401 unless the path is public or resolves to a :func:`clerk_public` view. A path that resolves to
        nothing is refused too, as on the other faces (a 404 would tell a stranger what does not exist),
        unless ``APPEND_SLASH`` will redirect it to a public view."""
        options = state.runtime.options
        path = request.path_info
        # No trailing-slash twin is public by path (``/health/`` may be a protected view): the webhook's twin
        # is public as a clerk_public view, below.
        if not options.require_auth or is_public_path(path, options.public_paths, options.public_prefixes,
                                                      slash_twins=()):
            return None
        if cls._is_public_view(request, path):
            return None
        try:
            state.require_session()
        except ClerkSyncError as exc:
            return error_json(exc)
        return None  # pragma: no cover - require_auth raises when there is no session

    @staticmethod
    def _is_public_view(request: HttpRequest, path: str) -> bool:
        """Whether ``path`` (or, for ``APPEND_SLASH``'s redirect, ``path/``) resolves to a :func:`clerk_public`
        view: a function, a class-based view (``view_class``) or a DRF ViewSet (``cls``)."""
        urlconf = getattr(request, "urlconf", None)
        candidates = [path]
        if getattr(django_settings, "APPEND_SLASH", False) and not path.endswith("/"):
            candidates.append(path + "/")
        for candidate in candidates:
            try:
                func = resolve(candidate, urlconf).func
            except Resolver404:
                continue
            classes = [c for c in (getattr(func, "view_class", None), getattr(func, "cls", None)) if c is not None]
            if any(_marked_public(c) for c in classes):
                return True
            # A view function's own mark; for an as_view() function, not one it took from an inherited dispatch
            # (as_view copies dispatch's attributes: a base's @method_decorator(clerk_public, name="dispatch")
            # opened its subclasses: review)
            return _marked_public(func) and not any(_inherited_dispatch_mark(c) for c in classes)
        return False

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        """A clerk-sync error raised by a view (e.g. an admin action) answers through the one table;
        ``request.user`` unavailable (an outage, :class:`ClerkUserUnavailable`) answers 503."""
        if isinstance(exception, ClerkUserUnavailable):
            return _user_unavailable_response(request, exception)
        return error_json(exception) if isinstance(exception, ClerkSyncError) else None

    @classmethod
    def _signed_in(cls, request: HttpRequest, state: ClerkRequest) -> None:
        bearer = request.headers.get("Authorization", "")
        if bearer[:7].lower() == "bearer " and bearer[7:].strip() \
                and django_settings.SESSION_COOKIE_NAME not in request.COOKIES:
            # A verified Bearer token is never attached by the browser on its own, so a cross-site form
            # cannot forge it: CSRF checks are for ambient cookies. But only a request with no Django session
            # cookie goes unchecked: with one, the header may be anyone's token (the attacker's own) next to
            # the victim's session, and request.session stays the victim's whoever request.user turns out to
            # be (ClerkBackend is opt-in, and even with it session-bound state is not the token's).
            request._dont_enforce_csrf_checks = True  # type: ignore[attr-defined]
        cls._link_user(request, state)

    @staticmethod
    def _link_user(request: HttpRequest, state: ClerkRequest) -> None:
        """``request.user`` from the Clerk session, resolved on first use (a Clerk session wins over a
        Django login session; one that could not be checked for an outage raises on use, see
        :mod:`.backends`)."""
        from clerk_sync.integrations.django.backends import django_user, uses_clerk_backend

        if not uses_clerk_backend():
            return

        request.user = SimpleLazyObject(lambda: django_user(request, state))  # type: ignore[assignment]

        async def auser() -> Any:
            return await sync_to_async(django_user)(request, state)

        request.auser = auser


def _refuse_authentication_middleware_after_us() -> None:
    """With :class:`~.backends.ClerkBackend`, ``AuthenticationMiddleware`` listed after ``ClerkMiddleware`` would
    replace the Clerk session's ``request.user`` with ``AnonymousUser`` (``@require_role("admin")`` passing while
    the view sees no staff user). System check E004 says so, but servers run no checks: refused when Django builds
    the middleware chain (at start-up, or a test client's first request), as Django's own middleware refuses a
    setting it cannot work with. A project without ``AuthenticationMiddleware`` (DRF only, stateless) is left to
    E004, as before: DRF sets ``request.user`` itself (review)."""
    from django.contrib.auth.middleware import AuthenticationMiddleware

    def position(base: type, path: str) -> int | None:  # (by path, or an app's subclass, as the checks find them)
        for i, entry in enumerate(getattr(django_settings, "MIDDLEWARE", None) or []):
            try:
                found = entry == path or issubclass(import_string(entry), base)
            except Exception:  # noqa: S112 (Django itself reports a middleware that does not import)
                continue
            if found:
                return i
        return None

    from clerk_sync.integrations.django.backends import uses_clerk_backend

    if not uses_clerk_backend():
        return
    clerk, auth = position(ClerkMiddleware, _MIDDLEWARE), position(AuthenticationMiddleware, _AUTH_MIDDLEWARE)
    if clerk is not None and auth is not None and clerk < auth:
        raise ImproperlyConfigured(
            "ClerkMiddleware with ClerkBackend needs django.contrib.auth's AuthenticationMiddleware before it: edit "
            "your MIDDLEWARE setting to list 'django.contrib.auth.middleware.AuthenticationMiddleware' before "
            f"{_MIDDLEWARE!r} (listed after it, it replaces the Clerk session's request.user with AnonymousUser; "
            "`manage.py check` reports it as clerk_sync.E004).")


def _user_unavailable_response(request: HttpRequest, exc: ClerkUserUnavailable) -> HttpResponse:
    """503 with ``Retry-After`` for a request whose Clerk user cannot be told during an outage: JSON with the
    error's code (``store_unavailable``, ``clerk_unavailable``..., as the guards answer), or plain text for a
    client that asks for HTML and not JSON. Says what is down, never why (the cause is logged, once, by
    :func:`~.backends.django_user`)."""
    error = exc.error
    retry_after = getattr(error, "retry_after", None)
    wait = max(1, int(retry_after)) if isinstance(retry_after, int | float) else _STORE_RETRY_AFTER_S
    if isinstance(error, StorePrivilegeMissing):  # a GRANT to run, not an outage (the log names it)
        down = ("the auth database refuses this service's database role a privilege it needs (the service's log "
                "says which)")
    else:
        down = f"{'the auth database' if isinstance(error, StoreError) else 'Clerk'} is unavailable"
    message = f"{down}, so who is signed in cannot be told: retry in {wait} s"
    if _wants_json(request):
        response: HttpResponse = JsonResponse({"error": error.code, "message": message}, status=503)
    else:
        response = HttpResponse(f"Service unavailable: {message}.\n", status=503,
                                content_type="text/plain; charset=utf-8")
    response["Retry-After"] = str(wait)
    response["Cache-Control"] = "no-store"
    return response


def _wants_json(request: HttpRequest) -> bool:
    """JSON unless ``Accept`` names ``text/html`` and not ``application/json`` (a browser loading a page; an API
    client, ``fetch`` and ``curl`` send ``*/*``, JSON or nothing)."""
    accepted = {part.split(";", 1)[0].strip().lower() for part in request.headers.get("Accept", "").split(",")}
    return "text/html" not in accepted or "application/json" in accepted
