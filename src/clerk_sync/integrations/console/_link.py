"""The sign-in link (``/login/clerk?token=<a Clerk session token>``): when it signs in at once, and the page
that asks first.

A link is a GET any site can make a browser follow, with whatever token the linking site holds: an admin could
send their own token and have the console of whoever follows it signed in as them (its actions then audited
under their Clerk id; security walkthrough F3). So the link signs in at once only when nothing says it came
from elsewhere and nothing would be replaced (:func:`needs_confirmation`); otherwise it verifies the token,
keeps the sign-in in a short-lived cookie (:meth:`ConsoleAccess.pending_sign_in`: the admin and their Clerk
session, never the token) and answers 303 to :func:`confirm_page`, a URL without the token, which names who
would be signed in and who is signed in now. Only that page's POST (same-origin, with the cookie's CSRF token)
signs in (:func:`confirm_submit`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from anyio import to_thread
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from clerk_sync._urls import origin as url_origin
from clerk_sync.auth.users import read_user
from clerk_sync.errors import AccessDenied, ClerkSyncError
from clerk_sync.integrations.console._access import COOKIE, PENDING_COOKIE, PENDING_S, SIGN_IN, Identity, check_csrf
from clerk_sync.integrations.console._console import Console
from clerk_sync.integrations.console._web import BadInput, read_form, refuse_nul, set_session_cookie

__all__ = ["ask_first", "confirm_page", "confirm_submit", "needs_confirmation"]

# Sec-Fetch-Site values of a navigation the console trusts to sign in at once: a link on the console's own
# pages, or one the browser was given directly (typed, pasted, a bookmark, a link opened from another program:
# the terminal where `clerk-sync dev` printed it). Not ``same-site``: a sibling subdomain is another origin.
_DIRECT = ("same-origin", "none")


def needs_confirmation(request: Request) -> str | None:
    """Why a sign-in link must be confirmed before it signs in, or None when it may sign in at once.

    It may when no console session is open in this browser (its cookie absent: none would be replaced) and the
    request says it was not sent by another site: ``Sec-Fetch-Site`` ``same-origin`` or ``none``, and no
    ``Origin`` or ``Referer`` of another origin. ``none`` is what `clerk-sync dev`'s link sends (clicked in a
    terminal, or pasted), and also what a link opened from a mail or chat program sends: it is allowed because
    what it leaves open is small next to what confirming would cost the documented flow. A link needs an admin's
    Clerk session token (which Clerk lets live 60 s), it replaces no session (the walkthrough's harm: an
    operator's open console silently becoming the attacker's), and the console's header then names the admin
    signed in. A request without ``Sec-Fetch-Site`` (a script, a test client, a browser from before Fetch
    Metadata) is judged by ``Origin`` and ``Referer`` alone.
    """
    if COOKIE in request.cookies:
        return "a console session is open in this browser"
    site = request.headers.get("sec-fetch-site")
    if site is not None and site.strip().lower() not in _DIRECT:
        return f"the link was followed from another site (Sec-Fetch-Site: {site[:20]})"
    if _foreign(request):
        return "the link was followed from another site"
    return None


def ask_first(console: Console, request: Request, admin: Identity) -> Response:
    """303 to the confirmation page (a URL without the token, so it leaves the address bar and the history at
    once), holding ``admin``'s sign-in in a cookie until the page's form confirms it. Nothing is audited yet:
    nobody has signed in."""
    response = RedirectResponse(console.path_for(request, "login_clerk_confirm"), status_code=303)
    # SameSite=Lax: sent on the 303's GET even when a cross-site navigation led here (the page must show who
    # would be signed in), never on another site's POST; the confirmation's CSRF token is inside it.
    response.set_cookie(PENDING_COOKIE, console.access.pending_sign_in(admin), max_age=PENDING_S,
                        path=request.scope.get("root_path") or "/", secure=request.url.scheme == "https",
                        httponly=True, samesite="lax")
    return response


def confirm_page(console: Console) -> Callable[[Request], Awaitable[Response]]:
    """GET: who the waiting sign-in would sign in, who is signed in now, and a form to confirm or cancel."""

    async def endpoint(request: Request) -> Response:
        pending = console.access.pending(request.cookies.get(PENDING_COOKIE))
        if pending is None:
            return _no_pending(console, request)
        try:
            user = await to_thread.run_sync(read_user, console.store, str(pending.clerk_id))
            current = await to_thread.run_sync(_current, console, request)
        except ClerkSyncError as exc:  # the database down: the console's 503 page (was a bare 500)
            return console.clerk_error(request, exc)
        return console.render(request, "confirm_sign_in.html", None, pending=pending, user=user, current=current,
                              pending_csrf=pending.csrf)

    return endpoint


def confirm_submit(console: Console) -> Callable[[Request], Awaitable[Response]]:
    """POST from the confirmation page: with its CSRF token, from the console's own origin, ``action=sign_in``
    opens the admin's console session (audited, naming the session it replaced), anything else cancels."""

    async def endpoint(request: Request) -> Response:
        try:
            form = await read_form(request)
            refuse_nul(request, form)
        except BadInput as exc:
            return console.error(request, 400, "bad_request", str(exc))
        pending = console.access.pending(request.cookies.get(PENDING_COOKIE))
        if pending is None:
            return _no_pending(console, request)
        if _foreign(request) or request.headers.get("sec-fetch-site", "same-origin").strip().lower() != "same-origin":
            return console.error(request, 403, "access_denied", "a sign-in is confirmed on the console's own page only")
        if not check_csrf(pending, form.get("csrf")):
            return console.error(request, 403, "access_denied",
                                 "the form's CSRF token is missing or wrong: open the sign-in link again")
        if form.get("action") != "sign_in":
            return _cleared(request, RedirectResponse(console.path_for(request, "overview"), status_code=303))
        try:
            identity = await to_thread.run_sync(_sign_in, console, request, pending)
        except ClerkSyncError as exc:  # the role, the user's standing or the Clerk session changed meanwhile
            return _cleared(request, console.clerk_error(request, exc))
        response = RedirectResponse(console.path_for(request, "overview"), status_code=303)
        set_session_cookie(request, response, identity.new_cookie)
        return _cleared(request, response)

    return endpoint


def _sign_in(console: Console, request: Request, pending: Identity) -> Identity:
    """The admin's console session, checked again (role, standing, Clerk session) and audited before its cookie
    is set, as every sign-in is; the row's ``replaced`` names who was signed in in this browser until now."""
    clerk_id, session_id = str(pending.clerk_id), str(pending.session_id)
    console.access.confirm_admin(clerk_id)
    identity = console.access.admin_session(clerk_id, session_id)
    current = _current(console, request)
    replaced = current.label if current is not None else None
    console.audit(identity, SIGN_IN, clerk_id, request, method="clerk_link", confirmed=True, replaced=replaced,
                  sid=identity.session_id, session=identity.session_digest)
    return identity


def _current(console: Console, request: Request) -> Identity | None:
    """The console session open in this browser (its cookie alone: no Clerk cookie, no ``Bearer``), or None."""
    cookie = request.cookies.get(COOKIE)
    if not cookie:
        return None
    try:
        return console.access.identify({}, {COOKIE: cookie})
    except ClerkSyncError:  # ended, signed out, demoted: nobody is signed in with it
        return None


def _no_pending(console: Console, request: Request) -> Response:
    message = (f"no sign-in is waiting for confirmation in this browser (a sign-in link's lasts {PENDING_S // 60} "
               "minutes): open the sign-in link again")
    return _cleared(request, console.clerk_error(request, AccessDenied(message)))


def _cleared(request: Request, response: Response) -> Response:
    if PENDING_COOKIE in request.cookies:
        response.delete_cookie(PENDING_COOKIE, path=request.scope.get("root_path") or "/",
                               secure=request.url.scheme == "https", httponly=True, samesite="lax")
    return response


def _foreign(request: Request) -> bool:
    """Whether the request's ``Origin`` or ``Referer`` names another origin than the console's own (its scheme
    and ``Host``; behind a proxy, forward both: a mismatch only ever asks for a confirmation or refuses one).
    ``Origin: null`` (a sandboxed frame, a privacy-sensitive redirect) is another origin."""
    own = url_origin(f"{request.url.scheme}://{request.headers.get('host', '')}")
    for name in ("origin", "referer"):
        sent = request.headers.get(name)
        if sent is not None and (own is None or url_origin(sent) != own):
            return True
    return False
