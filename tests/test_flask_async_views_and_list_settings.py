"""The Flask face on par with the other frameworks: guards on ``async def`` views, and
lists for the settings Django takes as lists (authorized parties, webhook secrets)."""

from __future__ import annotations

from typing import Any

from flask import Flask

from clerk_sync.integrations.flask import (
    ClerkSync,
    clerk_login_required,
    clerk_state,
    current_clerk,
    not_impersonated,
    require_role,
    settings_from_config,
)
from tests import factories as f
from tests.conftest import SECRET
from tests.test_auth import bearer, token
from tests.test_sessions import AZP, ISS, KEY, pem

OTHER_SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"


def _config(db_url: str, **extra: Any) -> dict[str, Any]:
    return {"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "CLERK_JWT_KEY": pem(KEY),
            "CLERK_ISSUER": ISS, **extra}


def test_guards_run_async_views_to_their_result(db_url: str) -> None:
    """Fixed: Flask serves ``async def`` views (``flask[async]``), but the guards called the view
    directly and returned its coroutine: 500. They run it as Flask (and Flask-Login's guards) do."""
    app = Flask(__name__)
    app.config["CLERK_SYNC"] = _config(db_url)
    ClerkSync(app, revocation_refresh_s=0)

    @app.get("/async/me")
    @clerk_login_required
    async def async_me() -> dict[str, str]:
        return {"user": current_clerk.user_id}

    @app.get("/async/admin")
    @require_role("admin")
    async def async_admin() -> dict[str, str]:
        return {"admin": current_clerk.user_id}

    @app.get("/async/billing")
    @not_impersonated
    async def async_billing() -> dict[str, str]:
        return {"billing": "ok"}

    @app.get("/sync/me")
    @clerk_login_required
    def sync_me() -> dict[str, str]:
        return {"user": current_clerk.user_id}

    for user_id, role in (("user_admin", "admin"), ("user_member", "member")):
        env = f.envelope("user.created", f.user(user_id, 10, role=role))
        assert clerk_state(app).processor.process(*f.signed(env, f"msg_{user_id}")).status == "applied"  # type: ignore[union-attr]
    admin, member = bearer(token("user_admin")), bearer(token("user_member"))
    with app.test_client() as client:
        assert client.get("/async/me").status_code == 401
        assert client.get("/async/me", headers=admin).get_json() == {"user": "user_admin"}
        assert client.get("/async/admin", headers=admin).get_json() == {"admin": "user_admin"}
        assert client.get("/async/admin", headers=member).status_code == 403
        assert client.get("/async/billing", headers=member).get_json() == {"billing": "ok"}
        assert client.get("/sync/me", headers=member).get_json() == {"user": "user_member"}


def test_authorized_parties_and_webhook_secrets_take_a_list_as_in_django() -> None:
    """Fixed: Django's ``CLERK_SYNC`` joins a list of origins or secrets; Flask refused it ("Input
    should be a valid string"), in the ``CLERK_SYNC`` dict and as top-level config keys alike."""
    origins = ["https://app.example.com", "https://admin.example.com/"]
    for config in ({"CLERK_SYNC": {"CLERK_AUTHORIZED_PARTIES": origins,
                                   "CLERK_WEBHOOK_SIGNING_SECRET": [SECRET, OTHER_SECRET]}},
                   {"CLERK_AUTHORIZED_PARTIES": tuple(origins), "CLERK_WEBHOOK_SIGNING_SECRET": (SECRET, OTHER_SECRET)},
                   {"CLERK_SYNC": {"authorized_parties_raw": origins, "webhook_secret": [SECRET, OTHER_SECRET]}}):
        settings = settings_from_config(config, environ={})
        assert settings.authorized_parties() == {"https://app.example.com", "https://admin.example.com"}
        assert len(settings.webhook_secrets()) == 2


def test_a_list_of_authorized_parties_is_enforced_on_requests(db_url: str) -> None:
    app = Flask(__name__)
    app.config["CLERK_SYNC"] = _config(db_url, CLERK_AUTHORIZED_PARTIES=["https://other.example", AZP])
    ClerkSync(app, revocation_refresh_s=0)

    @app.get("/me")
    @clerk_login_required
    def me() -> dict[str, str]:
        return {"user": current_clerk.user_id}

    with app.test_client() as client:
        assert client.get("/me", headers=bearer(token("user_1"))).get_json() == {"user": "user_1"}
        refused = client.get("/me", headers=bearer(token("user_1", azp="https://evil.example")))
        assert (refused.status_code, refused.get_json()["error"]) == (401, "token_invalid_authorized_parties")


def test_impersonator_roles_is_a_flask_setting(db_url: str) -> None:
    """A gap in the impersonation fix: the roles an impersonating user must still hold are a setting (a list
    or comma-separated, as the authorized parties), so support staff who impersonate keep working."""
    def app_with(**extra: Any) -> Flask:
        app = Flask(__name__)
        app.config["CLERK_SYNC"] = _config(db_url, **extra)
        ClerkSync(app, revocation_refresh_s=0)

        @app.get("/me")
        @clerk_login_required
        def me() -> dict[str, str]:
            return {"user": current_clerk.user_id, "actor": current_clerk.actor_id or ""}

        return app

    default, listed = app_with(), app_with(CLERK_IMPERSONATOR_ROLES=["admin", "support"])
    for n, (user_id, role) in enumerate((("user_support", "support"), ("user_cust", "member"))):
        env = f.envelope("user.created", f.user(user_id, 10, role=role))
        assert clerk_state(default).processor.process(*f.signed(env, f"msg_imp{n}")).status == "applied"  # type: ignore[union-attr]
    acting = bearer(token("user_cust", act={"sub": "user_support"}))
    with default.test_client() as client:
        refused = client.get("/me", headers=acting)
        assert (refused.status_code, refused.get_json()["error"]) == (401, "impersonation_ended")
    with listed.test_client() as client:
        assert client.get("/me", headers=acting).get_json() == {"user": "user_cust", "actor": "user_support"}
