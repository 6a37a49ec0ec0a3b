"""Flask integration: ``ClerkSync(app)`` mirrors Clerk into the app's database and guards its views.

Usage::

    app.config["CLERK_SYNC"] = {"DATABASE_URL": ..., "CLERK_WEBHOOK_SIGNING_SECRET": ..., "CLERK_SECRET_KEY": ...}
    ClerkSync(app, deny_by_default=True, public_endpoints={"home"})   # + POST /webhooks/clerk

    @app.get("/admin")
    @require_role("admin")                # confirmed against the users row on every request
    def admin():
        return {"admin": current_user.email, "session": current_clerk.session_id}

Errors answer as JSON through the one table in :mod:`clerk_sync.integrations.http`;
``flask clerk-sync migrate|replay|reconcile|promote|retry-pending|prune`` runs the commands with the app's
settings, with ``clerk-sync``'s exit codes (1 work left undone, 2 a setting to fix, 3 retry later).
"""

from __future__ import annotations

try:
    import flask  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("clerk_sync.integrations.flask needs Flask: pip install 'clerk-sync[flask]'") from exc

from clerk_sync.integrations.flask._cli import clerk_sync_cli
from clerk_sync.integrations.flask._core import (
    AnonymousUser,
    ClerkSyncState,
    SignedInUser,
    clerk_login_required,
    clerk_state,
    current_clerk,
    current_user,
    error_json,
    not_impersonated,
    optional_clerk,
    public,
    require_org_role,
    require_permission,
    require_role,
    settings_from_config,
)
from clerk_sync.integrations.flask._extension import ClerkSync
from clerk_sync.integrations.flask._webhook import webhook_blueprint

__all__ = [
    "AnonymousUser",
    "ClerkSync",
    "ClerkSyncState",
    "SignedInUser",
    "clerk_login_required",
    "clerk_state",
    "clerk_sync_cli",
    "current_clerk",
    "current_user",
    "error_json",
    "not_impersonated",
    "optional_clerk",
    "public",
    "require_org_role",
    "require_permission",
    "require_role",
    "settings_from_config",
    "webhook_blueprint",
]
