"""The example app: public, signed-in, organization and admin pages, impersonation, audit.

Everything request-time is local: the session token is verified against cached keys, roles are read
from our own ``users`` table. Clerk is called only to sync a user the webhook has not delivered yet
(JIT), to change a role, and to start impersonation.
"""

from __future__ import annotations

from typing import Any

import httpx
import sqlalchemy as sa
from fastapi import Depends, FastAPI, Request

from clerk_sync.auth.admin import AdminActions
from clerk_sync.auth.authenticator import Authenticator
from clerk_sync.auth.claims import Auth
from clerk_sync.auth.sessions import verifier_from_settings
from clerk_sync.auth.users import AuthUser, JitUsers
from clerk_sync.clerk_api import ClerkClient
from clerk_sync.config import Settings
from clerk_sync.errors import AccessDenied
from clerk_sync.integrations.fastapi import ClerkAuth, build_processor, sync_me_router, webhook_router
from clerk_sync.tables import audit_log, organization_memberships, organizations, users

PUBLIC = {"/", "/webhooks/clerk", "/healthz"}
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


def create_app(settings: Settings) -> FastAPI:
    """Build the app from settings: FastAPI, protected by default (``clerk.install``)."""
    processor = build_processor(settings)
    store = processor.store
    http = httpx.Client()
    clerk_api = ClerkClient.from_settings(settings)
    jit = JitUsers(store, clerk=clerk_api, refresh_interval_s=settings.jit_refresh_interval_s)
    authenticator = Authenticator(verifier_from_settings(settings, http=http), store,
                                  load_user=jit.get_auth_user, impersonator_roles=settings.impersonator_roles(),
                                  metrics=processor.metrics)  # clerk_sync_auth_* beside the webhook series
    clerk = ClerkAuth(authenticator, get_user=lambda auth: jit.get_auth_user(auth.user_id))
    admin_actions = AdminActions(store, clerk_api)
    require_admin = clerk.require_role("admin")

    app = FastAPI(title="clerk-sync example SaaS")
    clerk.install(app, public_paths=PUBLIC)  # deny by default: serving `app` is safe
    app.include_router(webhook_router(processor))
    app.include_router(sync_me_router(clerk, jit))  # POST /sync/me, right after sign-up
    app.state.store = store

    @app.get("/")
    def home() -> dict[str, str]:
        return {"page": "public", "hint": "GET /dashboard with Authorization: Bearer <session token>"}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/dashboard")
    def dashboard(
        user: AuthUser = Depends(clerk.current_user), auth: Auth = Depends(clerk.current_auth)
    ) -> dict[str, Any]:
        return {"user": user.clerk_id, "email": user.email, "role": user.role, "plan": user.plan,
                "impersonated_by": auth.actor_id}

    @app.get("/org")
    def org_page(auth: Auth = Depends(clerk.require_org_role(*ORG_ROLES))) -> dict[str, Any]:
        with store.connect() as conn:
            your_role = live_org_role(conn, auth)  # the token's claim, confirmed against the DB
            org = conn.execute(sa.select(organizations.c.name, organizations.c.slug)
                               .where(organizations.c.clerk_id == auth.org_id)).mappings().first()
            members = conn.execute(
                sa.select(users.c.email, organization_memberships.c.role)
                .join(users, users.c.clerk_id == organization_memberships.c.user_clerk_id)
                .where(organization_memberships.c.organization_clerk_id == auth.org_id,
                       organization_memberships.c.deleted_at.is_(None), users.c.deleted_at.is_(None))
                .order_by(users.c.email)
            ).mappings().all()
        return {"org": dict(org) if org else None, "your_role": your_role, "members": [dict(m) for m in members]}

    @app.get("/admin/users")
    def admin_users(admin: AuthUser = Depends(require_admin)) -> dict[str, Any]:
        with store.connect() as conn:
            rows = conn.execute(sa.select(users.c.clerk_id, users.c.email, users.c.role)
                                .where(users.c.deleted_at.is_(None)).order_by(users.c.id)).mappings().all()
        return {"admin": admin.clerk_id, "users": [dict(r) for r in rows]}

    @app.post("/admin/users/{clerk_id}/role")
    def set_role(clerk_id: str, role: str, request: Request, admin: AuthUser = Depends(require_admin),
                 auth: Auth = Depends(clerk.not_impersonated)) -> dict[str, Any]:
        change = admin_actions.promote(clerk_id, role, by=admin.clerk_id, ip=_ip(request))
        return {"user": clerk_id, "role": change.role, "status": change.status, "previous": change.previous_role}

    @app.post("/admin/impersonate/{clerk_id}")
    def impersonate(clerk_id: str, request: Request, auth: Auth = Depends(clerk.not_impersonated)) -> dict[str, Any]:
        # AdminActions checks the admin role itself so that a refusal is audited too.
        grant = admin_actions.start_impersonation(auth.user_id, clerk_id, ip=_ip(request))
        return {"method": grant.method, "token": grant.token, "url": grant.url, "expires_in_s": grant.expires_in_s}

    @app.get("/admin/audit")
    def audit(admin: AuthUser = Depends(require_admin)) -> list[dict[str, Any]]:
        with store.connect() as conn:
            rows = conn.execute(sa.select(audit_log).order_by(audit_log.c.id.desc()).limit(50)).mappings().all()
        return [{**dict(r), "created_at": r["created_at"].isoformat()} for r in rows]

    @app.get("/billing")
    def billing(auth: Auth = Depends(clerk.not_impersonated)) -> dict[str, Any]:
        return {"billing": "sensitive", "user": auth.user_id}

    return app


def _ip(request: Request) -> str | None:
    return request.client.host if request.client else None
