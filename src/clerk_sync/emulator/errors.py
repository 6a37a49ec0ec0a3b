"""Clerk-shaped API errors.

Every failure the emulator reports uses Clerk's body,
``{"errors": [{"code", "message", "long_message", "meta"}], "clerk_trace_id": ...}``,
so clients exercise the same error parsing they need against the real service.
"""

from __future__ import annotations

import secrets
from typing import Any

from starlette.responses import JSONResponse

__all__ = ["ClerkAPIError", "error_body"]


class ClerkAPIError(Exception):
    """Raised by emulator internals; the app turns it into a Clerk error response."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        long_message: str | None = None,
        *,
        meta: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.long_message = long_message or message
        self.meta = meta or {}
        self.headers = headers or {}

    def to_response(self) -> JSONResponse:
        """Render as the HTTP response Clerk would send."""
        body = error_body(self.code, self.message, self.long_message, self.meta)
        return JSONResponse(body, status_code=self.status, headers=self.headers)

    @classmethod
    def not_found(cls) -> ClerkAPIError:
        return cls(404, "resource_not_found", "not found", "Resource not found")

    @classmethod
    def unauthorized(cls) -> ClerkAPIError:
        return cls(
            401,
            "authentication_invalid",
            "Invalid authentication",
            "Unable to authenticate the request, you need to supply an active API key",
        )

    @classmethod
    def invalid(cls, param: str, message: str, code: str = "form_param_value_invalid") -> ClerkAPIError:
        return cls(422, code, message, message, meta={"param_name": param})

    @classmethod
    def missing(cls, param: str) -> ClerkAPIError:
        return cls(
            422,
            "form_param_missing",
            f"{param} must be included.",
            f"{param} must be included.",
            meta={"param_name": param},
        )

    @classmethod
    def identifier_exists(cls, param: str, what: str = "email address") -> ClerkAPIError:
        message = f"That {what} is taken. Please try another."
        return cls(422, "form_identifier_exists", message, message, meta={"param_name": param})

    @classmethod
    def not_implemented(cls, param: str, what: str, reason: str) -> ClerkAPIError:
        """A 422 for something Clerk would honour and the emulator cannot: refused, not silently dropped."""
        return cls(
            422,
            "emulator_not_implemented",
            f"The Clerk emulator does not implement {what}",
            f"The Clerk emulator does not implement {what}: {reason}. Clerk would apply it; the emulator refuses "
            "it rather than answer as if it were not there.",
            meta={"param_name": param},
        )


def error_body(code: str, message: str, long_message: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Return a ``ClerkErrors`` JSON body with a fresh trace id."""
    return {
        "errors": [{"message": message, "long_message": long_message, "code": code, "meta": meta}],
        "meta": {},
        "clerk_trace_id": secrets.token_hex(16),
    }
