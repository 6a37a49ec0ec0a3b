"""The README's Flask usage, typed: checked by `scripts/check` (mypy --strict) so the proxies and guards keep their types."""

from __future__ import annotations

from flask import Flask

from clerk_sync.auth.claims import Auth
from clerk_sync.auth.users import AuthUser
from clerk_sync.integrations.flask import (
    ClerkSync,
    ClerkSyncState,
    clerk_login_required,
    clerk_state,
    current_clerk,
    current_user,
    not_impersonated,
    optional_clerk,
    public,
    require_org_role,
    require_permission,
    require_role,
)


def build() -> Flask:
    app = Flask(__name__)
    app.config["CLERK_SYNC"] = {"DATABASE_URL": "sqlite:///app.db"}
    ClerkSync(app, deny_by_default=True, public_endpoints={"static"})
    state: ClerkSyncState = clerk_state(app)
    assert state.store is not None

    @app.get("/")
    @public
    def home() -> dict[str, str | None]:
        auth: Auth | None = optional_clerk()
        return {"user": auth.user_id if auth else None}

    @app.get("/dashboard")
    @clerk_login_required
    def dashboard() -> dict[str, str | None]:
        user: AuthUser = current_user
        return {"email": user.email, "impersonated_by": current_clerk.actor_id}

    @app.get("/admin")
    @require_role("admin")
    def admin() -> dict[str, str]:
        return {"admin": current_user.clerk_id}

    @app.get("/org")
    @require_org_role("org:admin")
    @require_permission("org:invoices:read")
    @not_impersonated
    def org() -> dict[str, str | None]:
        return {"org": current_clerk.org_id}

    return app
