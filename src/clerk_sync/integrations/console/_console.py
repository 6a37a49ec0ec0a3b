"""What the console's handlers share: the store, access rules, templates, Clerk, the drift job."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from anyio import to_thread
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup, escape
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Router
from starlette.templating import Jinja2Templates

from clerk_sync._time import as_utc
from clerk_sync.auth.audit import AuditEntry, record_audit
from clerk_sync.clerk_api import ClerkClient
from clerk_sync.errors import ClerkSyncError, TokenError
from clerk_sync.integrations.console._access import ConsoleAccess, Identity
from clerk_sync.integrations.console._drift import DriftJob
from clerk_sync.integrations.console._queries import aware
from clerk_sync.integrations.console._throttle import SignInThrottle
from clerk_sync.integrations.console._web import client_ip
from clerk_sync.integrations.http import error_response
from clerk_sync.metrics import Metrics
from clerk_sync.store import Store

__all__ = ["Console", "SignInThrottled", "utcnow"]

_CLERK_ID = re.compile(r"[A-Za-z0-9_]+")  # user_2x…, org_2x…, orgmem_2x…
# Bidirectional controls: embeddings and overrides (U+202A-U+202E), isolates (U+2066-U+2069), and the marks
# (U+200E, U+200F, U+061C). In a name they reorder what follows (``adm\u202enimgpj.exe`` shows as
# ``admexe.jpgmin``): the console shows each as a visible ``⟨U+202E⟩`` instead (:func:`_show_bidi`).
_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# What a Clerk session token looks like (a JWS in compact form): only such a credential is verified before its
# failure is remembered (:meth:`Console.sign_in`); anything else is a guess at the operator token at once.
_SESSION_TOKEN = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
log = structlog.get_logger("clerk_sync.console")


def utcnow() -> datetime:
    return datetime.now(UTC)


class SignInThrottled(Exception):
    """Too many failed sign-ins from the client's address lately: answer 429 with ``Retry-After: wait``; the
    token it sent was not compared."""

    def __init__(self, wait: int) -> None:
        super().__init__(f"too many failed sign-ins from this address: try again in {wait} s")
        self.wait = wait


class Console:
    """What the handlers share: the store, access rules, templates, the Clerk client and the drift job."""

    def __init__(self, store: Store, access: ConsoleAccess, *, clerk: ClerkClient | None, read_only: bool,
                 now: Callable[[], datetime], freshness_limits: dict[str, Any] | None = None,
                 metrics: Metrics | None = None, instance_id: str | None = None,
                 sign_ins: SignInThrottle | None = None) -> None:
        self.store = store
        self.access = access
        self.metrics = metrics
        # Failed sign-ins per client address (429 past its limit). ``is not None``: a throttle has a __len__, so
        # an empty one (as every new one) is falsy, and ``sign_ins or ...`` ignored the one passed in.
        self.sign_ins = sign_ins if sign_ins is not None else SignInThrottle()
        self.clerk = clerk
        self.read_only = read_only
        self.now: Callable[[], datetime] = lambda: as_utc(now())  # a naive clock is UTC, as everywhere
        # The thresholds of the alert rules and `doctor --freshness` (CLERK_SYNC_FRESHNESS_*).
        self.freshness_limits = freshness_limits or {}
        self.drift = (DriftJob(store, clerk, now=self.now, metrics=metrics, instance_id=instance_id)
                      if clerk is not None else None)
        env = Environment(loader=PackageLoader("clerk_sync.integrations.console", "templates"),
                          autoescape=select_autoescape(default=True), trim_blocks=True, lstrip_blocks=True,
                          finalize=_show_bidi)
        env.filters.update(ago=self.ago, when=_when, pretty=_pretty, submitted=_submitted)
        env.tests["clerk_id"] = _is_clerk_id
        self.templates = Jinja2Templates(env=env)
        # The console's own routes (create_console fills them in): its URLs are resolved here, never through
        # ``request.url_for``, which asks the outermost app, whose own ``login`` or ``static`` would win.
        self.router = Router()

    def path_for(self, request: Request, name: str, /, **params: Any) -> str:
        """The path of one of the console's routes, under the path it is mounted at."""
        return (request.scope.get("root_path") or "") + str(self.router.url_path_for(name, **params))

    def render(self, request: Request, name: str, identity: Identity | None, *, status: int = 200,
               **context: Any) -> Response:
        context.update(identity=identity, csrf=identity.csrf if identity and identity.csrf else "",
                       read_only=self.read_only, path_for=lambda n, **p: self.path_for(request, n, **p))
        return self.templates.TemplateResponse(request, name, context, status_code=status)

    def ago(self, value: datetime | None) -> str:
        value = aware(value)
        if value is None:
            return "never"
        seconds = max(0.0, (self.now() - value).total_seconds())
        for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
            if seconds >= size:
                return f"{seconds / size:.0f} {unit} ago"
        return f"{seconds:.0f} s ago"

    def audit(self, identity: Identity, action: str, target: str | None, request: Request, **details: Any) -> None:
        with self.store.transaction() as w:
            record_audit(w, self.audit_entry(identity, action, target, request, **details))

    @staticmethod
    def origin(identity: Identity) -> dict[str, Any]:
        """Where an audited action came from: ``{"via": "console", "as": <identity kind>}`` (the operator token's
        actor is None, as the CLI's: these details tell them apart)."""
        return {"via": "console", "as": identity.kind}

    @staticmethod
    def audit_entry(identity: Identity, action: str, target: str | None, request: Request,
                    **details: Any) -> AuditEntry:
        details = {**Console.origin(identity), **details}
        return AuditEntry(action, identity.actor, target, details=details, ip=client_ip(request))

    # -- failed sign-ins -----------------------------------------------------------------------------
    # Logged and counted, not audited: the audit log records what an identity did, and a refused sign-in has
    # none (an operator row has no actor, so it would read as the operator's own action); a row per guess would
    # also let anyone on the network write to the database as fast as they can send (the throttle bounds the
    # log lines, not the requests answered 429).
    async def sign_in(self, request: Request, via: str, presented: str, compare: Callable[[], Identity], *,
                      operator: Callable[[], Identity] | None, sessions: bool,
                      guessed: Callable[[TokenError], bool]) -> Identity:
        """Every operator-token comparison, and every other credential a guesser could send (a session token as
        ``Bearer`` or in a sign-in link), goes through here, ``presented`` being that credential:

        - :class:`SignInThrottled` (counted; no log line, so a guesser cannot flood the log), nothing compared,
          when the client's address has failed ``limit`` times lately;
        - else, when ``operator`` is given and ``presented`` is the operator token (compared here, on the event
          loop: constant time, no I/O), ``operator()`` (no I/O either) is the identity: never held back by
          requests still being answered, and forgetting no failures;
        - else, when ``presented`` is no session token (``sessions`` false: the form; or not shaped as a JWT),
          it is a guess: remembered against the address at once, with no ``await`` since the check, so a burst
          of concurrent guesses passes the check ``limit`` times at most; ``compare`` (in a worker thread) then
          only says why it is refused;
        - else a session token: ``compare`` verifies it (in a worker thread: it may read the database or fetch
          Clerk's keys); a TokenError that is ``guessed`` (forged, unknown key) is remembered then (it cannot
          succeed: the operator token, which could, is never shaped so, as Settings refuses one). A genuine
          token refused for its age or user is no guess.

        Each guess is logged and counted (:meth:`_refused`)."""
        address = client_ip(request)
        wait = self.sign_ins.retry_after(address)
        if wait is not None:
            self._count_sign_in_failure(via, "throttled")
            raise SignInThrottled(wait)
        if operator is not None and self.access.is_operator_token(presented):
            return operator()
        failures = None
        if not (sessions and _SESSION_TOKEN.fullmatch(presented)):
            failures = self.sign_ins.failed(address)  # a guess: recorded before anything is awaited
        try:
            return await to_thread.run_sync(compare)
        except TokenError as exc:
            if failures is not None:
                self._refused(address, via, exc.code, failures)
            elif guessed(exc):
                self._refused(address, via, exc.code, self.sign_ins.failed(address))
            raise

    def _refused(self, address: str | None, via: str, code: str, failures: int) -> None:
        """A wrong operator token (or a forged session token), remembered by :attr:`sign_ins` against the
        client's address (``failures``: its count now): a WARNING line with the address (never the token), and
        counted."""
        throttled = failures >= self.sign_ins.limit
        log.warning("console_sign_in_refused", client=address, via=via, code=code, failures=failures,
                    window_s=self.sign_ins.window_s,
                    **({"throttled_for_s": self.sign_ins.retry_after(address)} if throttled else {}))
        self._count_sign_in_failure(via, "wrong_token")

    def _count_sign_in_failure(self, via: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.console_sign_in_failures.labels(via=via, reason=reason).inc()

    def error(self, request: Request, status: int, code: str, message: str,
              headers: dict[str, str] | None = None) -> Response:
        """JSON (the shared error body) for API callers, else an HTML page with the same status."""
        if "text/html" not in request.headers.get("accept", ""):
            return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)
        response = self.render(request, "error.html", None, status=status, code=code, message=message)
        response.headers.update(headers or {})
        return response

    def clerk_error(self, request: Request, exc: ClerkSyncError) -> Response:
        answer = error_response(exc)
        return self.error(request, answer.status, answer.body["error"], answer.body["message"], answer.headers)


def _is_clerk_id(value: object) -> bool:
    """Only what looks like a Clerk id is linked (``{% if x is clerk_id %}``): a stored id is any text a
    payload or an audit row held, and one with a ``/`` (or empty) is no path parameter (url_path_for asserts)."""
    return isinstance(value, str) and _CLERK_ID.fullmatch(value) is not None


class _Submitted(Markup):
    """A value a form sends back (:func:`_submitted`): escaped, and left as it is by :func:`_show_bidi`."""

    __slots__ = ()


def _submitted(value: Any) -> Markup:
    """``value="{{ x|submitted }}"``: a form field's value, which the browser sends back as it is written, so it
    keeps its bidirectional controls (autoescaped all the same). With ``⟨U+202E⟩`` markers in it instead, a
    filter holding one came back as other text, and "Replay all failed matching this filter" replayed what
    matched that text (review), not the filter shown. Only for values that are submitted, never for text shown."""
    return _Submitted(escape("" if value is None else value))


def _show_bidi(value: Any) -> Any:
    """Every value a template prints (``finalize``): bidirectional controls shown as ``⟨U+202E⟩``, so a name
    cannot reorder itself or the text around it. The markers hold no HTML, so Markup stays Markup. A form
    field's value (``|submitted``) is left as it is: it is sent back, not read."""
    if isinstance(value, _Submitted):
        return value
    if isinstance(value, str) and _BIDI.search(value):
        shown = _BIDI.sub(lambda m: f"⟨U+{ord(m.group()):04X}⟩", value)
        return Markup(shown) if isinstance(value, Markup) else shown  # noqa: S704 - was Markup, markers add no HTML
    return value


def _when(value: datetime | int | None) -> str:
    if isinstance(value, int):  # Clerk's milliseconds
        value = datetime.fromtimestamp(value / 1000, UTC)
    # (in UTC, as the pages say: a PostgreSQL session whose TimeZone is not UTC hands its times back in that zone)
    return as_utc(value).strftime("%Y-%m-%d %H:%M:%S") if value else "—"


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)
