"""Small HTTP helpers shared by the console's app and pages: input errors, the form reader, cookies."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response

from clerk_sync.integrations.console._access import COOKIE

__all__ = ["MAX_FORM_BYTES", "BadInput", "NotFound", "client_ip", "read_form", "refuse_nul", "set_session_cookie"]

MAX_FORM_BYTES = 64 * 1024


class BadInput(ValueError):
    """A form or query value the console cannot use: answered 400, nothing written."""


class NotFound(LookupError):
    """No such delivery, user or organization: answered 404."""


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


async def read_form(request: Request) -> dict[str, str]:
    """An urlencoded form body, at most :data:`MAX_FORM_BYTES` (the console's forms are small)."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        return {}
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise BadInput(f"form larger than {MAX_FORM_BYTES} bytes")
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def refuse_nul(request: Request, form: Mapping[str, str]) -> None:
    """No console input holds a NUL, and PostgreSQL refuses one in text (an error, so 503): a clear 400."""
    for where, items in (("path", request.path_params.items()), ("query", request.query_params.multi_items()),
                         ("form", form.items())):
        for name, value in items:
            if isinstance(value, str) and "\x00" in value:
                raise BadInput(f"the {where} parameter {name!r} contains a NUL character (%00)")


def set_session_cookie(request: Request, response: Response, value: str | None) -> None:
    """Set (or, with None, clear) the console session cookie, scoped to the console's mount path."""
    path = request.scope.get("root_path") or "/"
    secure = request.url.scheme == "https"
    if value is None:
        response.delete_cookie(COOKIE, path=path, secure=secure, httponly=True, samesite="lax")
    else:
        response.set_cookie(COOKIE, value, path=path, secure=secure, httponly=True, samesite="lax")
