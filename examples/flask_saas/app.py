"""The Flask example app: public, signed-in, organization and admin pages, impersonation, audit.

The same pages as ``examples/saas`` (FastAPI). Everything request-time is local: the session token is
verified against cached keys, roles are read from our own ``users`` table. Clerk is called only to
sync a user the webhook has not delivered yet (JIT), to change a role, and to start impersonation.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from flask import Flask, request

from clerk_sync.auth.admin import AdminActions
from clerk_sync.auth.claims import Auth
from clerk_sync.config import Settings
from clerk_sync.errors import AccessDenied, ConfigError
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

ORG_ROLES = ("org:admin", "org:member")


def live_org_role(conn: sa.Connection, auth: Auth, roles: tuple[str, ...] = ORG_ROLES) -> str:
    """The caller's role in the session's active organization, read from ``organization_memberships``.

    The token's org claims last until it expires (60 s): a member whose removal was already applied
    (``organizationMembership.deleted``) would keep them. The live row is the authority: no row, a
    deleted one or a role not in ``roles`` is refused (403)."""
    m = organization_memberships
    role = conn.execute(sa.select(m.c.role).where(
        m.c.organization_clerk_id == auth.org_id, m.c.user_clerk_id == auth.user_id, m.c.deleted_at.is_(None),
    )).scalar()
    if role not in roles:
        raise AccessDenied(f"no live membership of organization {auth.org_id} with a role in {sorted(roles)}")
    return str(role)


def create_app(settings: Settings | None = None) -> Flask:
    """The app; settings default to ``app.config`` / the environment (``flask --app ... clerk-sync migrate``)."""
    app = Flask(__name__)
    # + POST /webhooks/clerk (public), and POST /sync/me for the front end right after sign-up
    ClerkSync(app, settings=settings, deny_by_default=True, sync_me_path="/sync/me")
    state = clerk_state(app)
    store = state.store

    def admin_actions() -> AdminActions:
        if state.admin is None:  # no CLERK_SECRET_KEY: nothing can reach Clerk's API
            raise ConfigError("admin actions need CLERK_SECRET_KEY (the Clerk Backend API key)")
        return state.admin

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
    @require_org_role(*ORG_ROLES)
    def org_page() -> dict[str, Any]:
        with store.connect() as conn:
            your_role = live_org_role(conn, current_clerk)  # the token's claim, confirmed against the DB
            org = conn.execute(sa.select(organizations.c.name, organizations.c.slug)
                               .where(organizations.c.clerk_id == current_clerk.org_id)).mappings().first()
            members = conn.execute(
                sa.select(users.c.email, organization_memberships.c.role)
                .join(users, users.c.clerk_id == organization_memberships.c.user_clerk_id)
                .where(organization_memberships.c.organization_clerk_id == current_clerk.org_id,
                       organization_memberships.c.deleted_at.is_(None), users.c.deleted_at.is_(None))
                .order_by(users.c.email)
            ).mappings().all()
        return {"org": dict(org) if org else None, "your_role": your_role, "members": [dict(m) for m in members]}

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
    def set_role(clerk_id: str) -> Any:
        role = request.args.get("role")
        if not role:
            return {"error": "bad_request", "message": "the query parameter 'role' is required"}, 400
        change = admin_actions().promote(clerk_id, role, by=current_user.clerk_id, ip=request.remote_addr)
        return {"user": clerk_id, "role": change.role, "status": change.status, "previous": change.previous_role}

    @app.post("/admin/impersonate/<clerk_id>")
    @not_impersonated
    def impersonate(clerk_id: str) -> dict[str, Any]:
        # AdminActions checks the admin role itself so that a refusal is audited too.
        grant = admin_actions().start_impersonation(current_clerk.user_id, clerk_id, ip=request.remote_addr)
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
