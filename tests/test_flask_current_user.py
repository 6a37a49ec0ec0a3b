"""Review finding: Flask's ``current_user`` answered 401 to anonymous visitors of public pages, and had no
``is_authenticated``: the Flask-Login idiom ``{% if current_user.is_authenticated %}`` could not be used.
Now an anonymous visitor gets an anonymous user (falsy, ``is_authenticated`` False), a signed-in one their
row with ``is_authenticated`` True; protected views still refuse with 401. Real server, real tokens."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from flask import Flask, render_template_string

from clerk_sync.auth.users import AuthUser
from clerk_sync.integrations.flask import (
    AnonymousUser,
    ClerkSync,
    SignedInUser,
    clerk_login_required,
    current_user,
    public,
)
from tests import factories as f
from tests._flask import running_wsgi
from tests.conftest import SECRET
from tests.test_auth import Harness, bearer, token
from tests.test_sessions import ISS, KEY, pem

PAGE = """{% if current_user.is_authenticated %}hi {{ current_user.email }} ({{ current_user.get_id() }})\
{% else %}anon {{ current_user.is_anonymous }} {{ current_user.get_id() }}{% endif %}\
{% if current_user %} truthy{% endif %}"""


def build_app(db_url: str, **options: Any) -> Flask:
    app = Flask(__name__)
    app.config["CLERK_SYNC"] = {"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                                "CLERK_JWT_KEY": pem(KEY), "CLERK_ISSUER": ISS}
    ClerkSync(app, revocation_refresh_s=0, **options)

    @app.get("/")
    @public
    def home() -> str:
        return render_template_string(PAGE)

    @app.get("/shape")
    @public
    def shape() -> dict[str, Any]:
        user = current_user._get_current_object()  # type: ignore[attr-defined]
        return {"class": type(user).__name__, "row": isinstance(user, AuthUser),
                "authenticated": current_user.is_authenticated, "active": current_user.is_active}

    @app.get("/me")
    @clerk_login_required
    def me() -> dict[str, Any]:
        return {"email": current_user.email, "authenticated": current_user.is_authenticated}

    @app.get("/unguarded")
    def unguarded() -> dict[str, Any]:  # no guard, no deny by default: reading the row is the only check
        return {"email": current_user.email}

    return app


@pytest.fixture
def served(db_url: str) -> Iterator[tuple[Harness, httpx.Client]]:
    h = Harness(db_url)
    h.event("user.created", f.user("user_fl", 1, email="ada@example.com"))
    app = build_app(db_url)
    with running_wsgi(app) as url, httpx.Client(base_url=url) as client:
        yield h, client
    app.extensions["clerk_sync"].close()
    h.store.dispose()


def test_the_flask_login_idiom_works_for_anonymous_and_signed_in_visitors(served: tuple[Harness, httpx.Client]) -> None:
    _, client = served
    r = client.get("/")
    assert (r.status_code, r.text) == (200, "anon True None")
    r = client.get("/", headers=bearer(token("user_fl")))
    assert (r.status_code, r.text) == (200, "hi ada@example.com (user_fl) truthy")
    r = client.get("/", headers={"Cookie": f"__session={token('user_fl')}"})
    assert r.text == "hi ada@example.com (user_fl) truthy"
    now = int(time.time())
    expired = token("user_fl", iat=now - 600, nbf=now - 610, exp=now - 540)
    assert client.get("/", headers=bearer(expired)).text == "anon True None"  # a stale session browses signed out
    assert client.get("/", headers=bearer(token("user_unknown"))).text == "anon True None"  # no row (no JIT here)
    assert client.get("/shape").json() == {"class": "AnonymousUser", "row": False, "authenticated": False,
                                           "active": False}
    assert client.get("/shape", headers=bearer(token("user_fl"))).json() == {
        "class": "SignedInUser", "row": True, "authenticated": True, "active": True}


def test_protected_views_still_refuse_anonymous_visitors(served: tuple[Harness, httpx.Client]) -> None:
    _, client = served
    for path in ("/me", "/unguarded"):
        r = client.get(path)
        assert (r.status_code, r.json()["error"]) == (401, "token_missing"), path
    now = int(time.time())
    r = client.get("/unguarded", headers=bearer(token("user_fl", iat=now - 600, nbf=now - 610, exp=now - 540)))
    assert (r.status_code, r.json()["error"]) == (401, "token_expired")  # the refusal itself, not a 500
    r = client.get("/unguarded", headers=bearer(token("user_unknown")))
    assert (r.status_code, r.json()["error"]) == (403, "access_denied")
    assert client.get("/me", headers=bearer(token("user_fl"))).json() == {"email": "ada@example.com",
                                                                          "authenticated": True}
    assert client.get("/unguarded", headers=bearer(token("user_fl"))).json() == {"email": "ada@example.com"}


def test_the_anonymous_user_keeps_its_refusal_and_copies_cleanly() -> None:
    import copy

    from clerk_sync.errors import TokenMissing

    anonymous = AnonymousUser(TokenMissing("no session"))
    assert not anonymous and anonymous.get_id() is None and copy.copy(anonymous).is_anonymous
    with pytest.raises(TokenMissing):
        anonymous.email  # noqa: B018
    assert issubclass(SignedInUser, AuthUser)
