"""FastAPI's dependencies, typed: checked by `scripts/check` (mypy --strict) and tests/test_typing_fastapi.py.

``current_user`` returns what the getter returns, an AuthUser by default, so a misspelt attribute is refused.
Each ``type: ignore`` below is an error mypy must report (one it no longer needs fails: warn_unused_ignores)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request

from clerk_sync.auth.authenticator import Authenticator
from clerk_sync.auth.claims import Auth
from clerk_sync.auth.users import AuthUser
from clerk_sync.integrations.fastapi import ClerkAuth


@dataclass
class Account:
    """An app's own row, from a getter of its own."""

    clerk_id: str
    plan: str


def routes(app: FastAPI, clerk: ClerkAuth) -> None:  # a bare ClerkAuth is ClerkAuth[AuthUser] (no strict error)
    @app.get("/me")
    async def me(request: Request) -> dict[str, str | None]:
        user = await clerk.current_user(request)
        email: str | None = user.email
        misspelt = user.emial  # type: ignore[attr-defined]  # (was Any: any attribute went through)
        assert misspelt is None
        return {"email": email}

    @app.get("/profile")
    async def profile(user: AuthUser = Depends(clerk.current_user)) -> dict[str, str]:
        return {"id": user.clerk_id}


async def default_getter(authenticator: Authenticator, request: Request) -> AuthUser:
    clerk = ClerkAuth(authenticator)
    return await clerk.current_user(request)


async def own_getter(authenticator: Authenticator, request: Request) -> str:
    def account(auth: Auth) -> Account:
        return Account(auth.user_id, "pro")

    clerk = ClerkAuth(authenticator, get_user=account)
    row = await clerk.current_user(request)
    wrong: AuthUser = await clerk.current_user(request)  # type: ignore[assignment]  # an Account, not an AuthUser
    assert wrong
    return row.plan
