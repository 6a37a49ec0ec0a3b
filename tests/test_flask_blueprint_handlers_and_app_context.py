"""Review findings on the Flask face's refusals: a blueprint's catch-all error handler turned them into 500s,
``init_app`` replaced the app's own ``ClerkSyncError`` handler, and ``current_user`` in a template rendered
without a request (an e-mail from a CLI command) raised "Working outside of request context"."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
from flask import Blueprint, Flask, jsonify, redirect, render_template_string
from flask.views import MethodView
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from clerk_sync.errors import ClerkSyncError
from clerk_sync.integrations.flask import (
    ClerkSync,
    clerk_login_required,
    clerk_state,
    current_clerk,
    current_user,
    require_role,
)
from tests import factories as f
from tests.conftest import SECRET
from tests.test_auth import bearer, token
from tests.test_sessions import ISS, KEY, pem


def _config(url: str) -> dict[str, Any]:
    return {"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "CLERK_JWT_KEY": pem(KEY), "CLERK_ISSUER": ISS}


def _blueprint_app(url: str, *, deny: bool) -> Flask:
    app = Flask(__name__)
    app.config["CLERK_SYNC"] = _config(url)
    ClerkSync(app, deny_by_default=deny, revocation_refresh_s=0)
    api = Blueprint("api", __name__, url_prefix="/api")

    @api.errorhandler(Exception)  # Flask's documented catch-all: HTTP errors pass through, the rest is a 500
    def internal(e: Exception) -> Any:
        if isinstance(e, HTTPException):
            return e
        return jsonify(error="internal server error"), 500

    @api.get("/me")
    @clerk_login_required
    def me() -> dict[str, str]:
        return {"user": current_clerk.user_id}

    @api.get("/admin")
    @require_role("admin")
    def admin() -> dict[str, str]:
        return {"admin": current_user.clerk_id}

    @api.get("/async")
    @clerk_login_required
    async def async_me() -> dict[str, str]:
        return {"user": current_clerk.user_id}

    @api.get("/boom")
    @clerk_login_required
    def boom() -> None:
        raise RuntimeError("the view's own failure")

    def logged(view: Callable[..., Any]) -> Callable[..., Any]:  # the app's own decorator over a guard
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return view(*args, **kwargs)
        return wrapper

    @api.get("/wrapped")
    @logged
    @require_role("member")
    def wrapped() -> dict[str, str]:
        return {"member": current_clerk.user_id}

    class Items(MethodView):
        decorators = [clerk_login_required]  # noqa: RUF012 (Flask's own attribute)

        def get(self) -> dict[str, str]:
            return {"items": current_clerk.user_id}

    api.add_url_rule("/items", view_func=Items.as_view("items"))

    shop = Blueprint("shop", __name__, url_prefix="/shop")  # nested, with its own ClerkSyncError handler

    @shop.errorhandler(ClerkSyncError)
    def to_sign_in(e: ClerkSyncError) -> Response:
        return redirect(f"/sign-in?why={e.code}")

    @shop.get("/cart")
    @clerk_login_required
    async def cart() -> dict[str, str]:
        return {"cart": current_clerk.user_id}

    api.register_blueprint(shop)
    app.register_blueprint(api)
    return app


@pytest.mark.parametrize("deny", [True, False], ids=["deny_by_default", "guards"])
def test_a_blueprints_catch_all_handler_does_not_turn_refusals_into_500s(sqlite_url: str, deny: bool) -> None:
    """Fixed: Flask tries a blueprint's handlers for every class of an exception before the app's, so a
    blueprint's ``errorhandler(Exception)`` answered deny_by_default's and the guards' 401/403 with its 500.
    They answer where they refuse now; a blueprint's own ClerkSyncError handler still applies (innermost)."""
    app = _blueprint_app(sqlite_url, deny=deny)
    processor = clerk_state(app).processor
    assert processor is not None
    env = f.envelope("user.created", f.user("user_member", 10, role="member"))
    assert processor.process(*f.signed(env, "msg_member")).status == "applied"
    member = bearer(token("user_member"))
    with app.test_client() as client:
        for path in ("/api/me", "/api/admin", "/api/async", "/api/boom", "/api/wrapped", "/api/items"):
            r = client.get(path)
            assert (r.status_code, r.get_json()["error"]) == (401, "token_missing"), path
            assert r.headers["WWW-Authenticate"] == "Bearer"
            r = client.get(path, headers=bearer("garbage"))
            assert (r.status_code, r.get_json()["error"]) == (401, "token_malformed"), path
        r = client.get("/api/admin", headers=member)
        assert (r.status_code, r.get_json()["error"]) == (403, "access_denied")
        assert client.get("/api/me", headers=member).get_json() == {"user": "user_member"}
        assert client.get("/api/async", headers=member).get_json() == {"user": "user_member"}
        assert client.get("/api/wrapped", headers=member).get_json() == {"member": "user_member"}
        assert client.get("/api/items", headers=member).get_json() == {"items": "user_member"}
        r = client.get("/api/boom", headers=member)  # the blueprint's handler still answers the rest
        assert (r.status_code, r.get_json()) == (500, {"error": "internal server error"})
        r = client.get("/api/shop/cart")  # the nested blueprint's own handler, before its parent's catch-all
        assert (r.status_code, r.headers["Location"]) == (302, "/sign-in?why=token_missing")
        assert client.get("/api/shop/cart", headers=member).get_json() == {"cart": "user_member"}
    clerk_state(app).close()


def test_init_app_keeps_the_apps_own_clerk_sync_error_handler(sqlite_url: str) -> None:
    """Fixed: ``init_app`` registered its JSON handler over the one the app's factory registered first (the
    usual order), silently: the app's sign-in redirect became a 401 JSON body."""
    clerk = ClerkSync()
    app = Flask(__name__)
    app.config["CLERK_SYNC"] = _config(sqlite_url)

    @app.errorhandler(ClerkSyncError)
    def to_sign_in(e: ClerkSyncError) -> Response:
        return redirect("/sign-in")

    clerk.init_app(app)

    @app.get("/dash")
    @clerk_login_required
    def dash() -> dict[str, str]:
        return {}

    @app.get("/unguarded")
    def unguarded() -> dict[str, str]:
        return {"email": current_user.email}  # refused through the app's handler (raised in the view)

    with app.test_client() as client:
        for path in ("/dash", "/unguarded"):
            r = client.get(path)
            assert (r.status_code, r.headers.get("Location")) == (302, "/sign-in"), path
    clerk_state(app).close()
    plain = Flask(__name__)  # without one of the app's, clerk-sync's JSON answers
    plain.config["CLERK_SYNC"] = _config(sqlite_url)
    ClerkSync(plain)
    plain.add_url_rule("/unguarded", view_func=unguarded)

    @clerk_login_required
    def helper() -> str:  # a guarded function a view calls, not the view: it raises, as before
        return current_clerk.user_id

    plain.add_url_rule("/calls", "calls", lambda: {"user": helper()})
    for path in ("/unguarded", "/calls"):
        r = plain.test_client().get(path)
        assert (r.status_code, r.get_json()["error"]) == (401, "token_missing"), path
    clerk_state(plain).close()


def test_templates_rendered_without_a_request_see_no_current_user(sqlite_url: str) -> None:
    """Fixed: the ``current_user`` context processor read the request, so any template rendered inside
    ``app.app_context()`` alone (an e-mail sent by a CLI command or a job) raised RuntimeError."""
    app = Flask(__name__)
    app.config["CLERK_SYNC"] = _config(sqlite_url)
    ClerkSync(app)
    page = "{% if current_user.is_authenticated %}Hi {{ current_user.email }}{% else %}Welcome{% endif %}"
    shape = " {{ current_user.is_anonymous }} {{ current_user.get_id() }}{% if current_user %} truthy{% endif %}"
    with app.app_context():  # an anonymous user, shaped as with a request
        assert render_template_string(page + shape) == "Welcome True None"
    with app.test_request_context("/"):  # with a request, as before
        assert render_template_string(page + shape) == "Welcome True None"
    clerk_state(app).close()
