"""What the console's handlers share: the store, access rules, templates, Clerk, the drift job."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Router
from starlette.templating import Jinja2Templates

from clerk_sync.auth.audit import AuditEntry, record_audit
from clerk_sync.clerk_api import ClerkClient
from clerk_sync.errors import ClerkSyncError
from clerk_sync.integrations.console._access import ConsoleAccess, Identity
from clerk_sync.integrations.console._drift import DriftJob
from clerk_sync.integrations.console._queries import aware
from clerk_sync.integrations.console._web import client_ip
from clerk_sync.integrations.http import error_response
from clerk_sync.metrics import Metrics
from clerk_sync.store import Store

__all__ = ["Console", "utcnow"]

_CLERK_ID = re.compile(r"[A-Za-z0-9_]+")  # user_2x…, org_2x…, orgmem_2x…


def utcnow() -> datetime:
    return datetime.now(UTC)


class Console:
    """What the handlers share: the store, access rules, templates, the Clerk client and the drift job."""

    def __init__(self, store: Store, access: ConsoleAccess, *, clerk: ClerkClient | None, read_only: bool,
                 now: Callable[[], datetime], freshness_limits: dict[str, Any] | None = None,
                 metrics: Metrics | None = None, instance_id: str | None = None) -> None:
        self.store = store
        self.access = access
        self.clerk = clerk
        self.read_only = read_only
        self.now = now
        # The thresholds of the alert rules and `doctor --freshness` (CLERK_SYNC_FRESHNESS_*).
        self.freshness_limits = freshness_limits or {}
        self.drift = (DriftJob(store, clerk, now=now, metrics=metrics, instance_id=instance_id)
                      if clerk is not None else None)
        env = Environment(loader=PackageLoader("clerk_sync.integrations.console", "templates"),
                          autoescape=select_autoescape(default=True), trim_blocks=True, lstrip_blocks=True)
        env.filters.update(ago=self.ago, when=_when, pretty=_pretty)
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
    def audit_entry(identity: Identity, action: str, target: str | None, request: Request,
                    **details: Any) -> AuditEntry:
        details = {"via": "console", "as": identity.kind, **details}
        return AuditEntry(action, identity.actor, target, details=details, ip=client_ip(request))

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


def _when(value: datetime | int | None) -> str:
    if isinstance(value, int):  # Clerk's milliseconds
        value = datetime.fromtimestamp(value / 1000, UTC)
    value = aware(value)
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "—"


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)
