"""The Flask example app: public, signed-in, organization and admin pages, impersonation, audit.

The same pages as ``examples/saas`` (FastAPI). Everything request-time is local: the session token is
verified against cached keys, roles are read from our own ``users`` table. Clerk is called only to
sync a user the webhook has not delivered yet (JIT), to change a role, and to start impersonation.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from flask import Flask, request

from clerk_sync.config import Settings
from clerk_sync.integrations.flask import (
    ClerkSync,
    clerk_login_required,
    clerk_state,
    current_clerk,
    current_user,
    not_impersonated,
    public,
    require_org_role,
    require_role,
)
from clerk_sync.tables import audit_log, organization_memberships, organizations, users


def create_app(settings: Settings | None = None) -> Flask:
    """The app; settings default to ``app.config`` / the environment (``flask --app ... clerk-sync migrate``)."""
    app = Flask(__name__)
    # + POST /webhooks/clerk (public), and POST /sync/me for the front end right after sign-up
    ClerkSync(app, settings=settings, deny_by_default=True, sync_me_path="/sync/me")
    state = clerk_state(app)
    store = state.store

    @app.get("/")
    @public
    def home() -> dict[str, str]:
        return {"page": "public", "hint": "GET /dashboard with Authorization: Bearer <session token>"}

    @app.get("/healthz")
    @public
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/dashboard")
    @clerk_login_required
    def dashboard() -> dict[str, Any]:
        return {"user": current_user.clerk_id, "email": current_user.email, "role": current_user.role,
                "plan": current_user.plan, "impersonated_by": current_clerk.actor_id}

    @app.get("/org")
    @require_org_role("org:admin", "org:member")
    def org_page() -> dict[str, Any]:
        with store.connect() as conn:
            org = conn.execute(sa.select(organizations.c.name, organizations.c.slug)
                               .where(organizations.c.clerk_id == current_clerk.org_id)).mappings().first()
            members = conn.execute(
                sa.select(users.c.email, organization_memberships.c.role)
                .join(users, users.c.clerk_id == organization_memberships.c.user_clerk_id)
                .where(organization_memberships.c.organization_clerk_id == current_clerk.org_id,
                       organization_memberships.c.deleted_at.is_(None), users.c.deleted_at.is_(None))
                .order_by(users.c.email)
            ).mappings().all()
        return {"org": dict(org) if org else None, "your_role": current_clerk.org_role,
                "members": [dict(m) for m in members]}

    @app.get("/admin/users")
    @require_role("admin")
    def admin_users() -> dict[str, Any]:
        with store.connect() as conn:
            rows = conn.execute(sa.select(users.c.clerk_id, users.c.email, users.c.role)
                                .where(users.c.deleted_at.is_(None)).order_by(users.c.id)).mappings().all()
        return {"admin": current_user.clerk_id, "users": [dict(r) for r in rows]}

    @app.post("/admin/users/<clerk_id>/role")
    @require_role("admin")
    @not_impersonated
    def set_role(clerk_id: str) -> dict[str, Any]:
        assert state.admin is not None
        role = request.args["role"]
        change = state.admin.promote(clerk_id, role, by=current_user.clerk_id, ip=request.remote_addr)
        return {"user": clerk_id, "role": role, "status": change.status, "previous": change.previous_role}

    @app.post("/admin/impersonate/<clerk_id>")
    @not_impersonated
    def impersonate(clerk_id: str) -> dict[str, Any]:
        # AdminActions checks the admin role itself so that a refusal is audited too.
        assert state.admin is not None
        grant = state.admin.start_impersonation(current_clerk.user_id, clerk_id, ip=request.remote_addr)
        return {"method": grant.method, "token": grant.token, "url": grant.url, "expires_in_s": grant.expires_in_s}

    @app.get("/admin/audit")
    @require_role("admin")
    def audit() -> list[dict[str, Any]]:
        with store.connect() as conn:
            rows = conn.execute(sa.select(audit_log).order_by(audit_log.c.id.desc()).limit(50)).mappings().all()
        return [{**dict(r), "created_at": r["created_at"].isoformat()} for r in rows]

    @app.get("/billing")
    @not_impersonated
    def billing() -> dict[str, Any]:
        return {"billing": "sensitive", "user": current_clerk.user_id}

    return app
