"""The public surface is decided on purpose and pinned here, name by name (as httpx's
``test_exported_members.py`` does): adding or dropping a public name is a change to this file."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import warnings

import pytest

import clerk_sync
from clerk_sync import _compat

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(clerk_sync.__path__, "clerk_sync.")
    if ".migrations.versions" not in m.name and not m.name.endswith("migrations.env")
)

# fmt: off
PUBLIC_API: dict[str, list[str]] = {
    "clerk_sync": ["__version__"],
    "clerk_sync.auth": ["AuditEntry", "Auth", "AuthUser", "Authenticator", "ClaimsValidator", "DenyList", "JitUsers", "SessionVerifier", "read_user", "record_audit", "verifier_from_settings"],
    "clerk_sync.auth.admin": ["ADMIN_ROLE", "AdminActions", "ClerkAdminAPI", "Impersonation", "RoleChange", "check_role"],
    "clerk_sync.auth.audit": ["AuditEntry", "record_audit"],
    "clerk_sync.auth.authenticator": ["Authenticator", "DenyList", "UserLoader", "signed_out_if_banned",
                                      "warn_if_any_origin"],
    "clerk_sync.auth.claims": ["Auth", "ClaimsValidator", "auth_from_claims", "normalize_claims"],
    "clerk_sync.auth.jwks": ["JWKSKeySource", "KeySource", "NeedsFetch", "StaticKeySource"],
    "clerk_sync.auth.sessions": ["ALLOWED_ALGORITHMS", "RevocationCheck", "SAFE_METHODS", "SessionVerifier", "check_request_origin", "check_websocket_origin", "cookie_suffix", "is_cors_preflight", "is_public_path", "token_from_request", "verifier_from_settings"],
    "clerk_sync.auth.users": ["AuthUser", "JitUsers", "load_user", "read_user", "standing_error"],
    "clerk_sync.changes": ["Change", "EVENT_TYPES", "Event", "EventHandler", "Handler", "Hook", "describe", "job_payload"],
    "clerk_sync.clerk_api": ["API_VERSION", "ApiRequest", "AsyncClerkClient", "CircuitBreaker", "ClerkClient", "DEFAULT_API_URL", "DEFAULT_TIMEOUT", "JSON", "MAX_PAGE", "Page", "RetryPolicy", "Stats", "UNREACHABLE", "unreachable_advice"],
    "clerk_sync.clerk_api.ratelimit": ["Budget", "LocalBudget", "RateLimit", "RedisBudget", "Reservation", "budget_from_settings", "default_rate_limit"],
    "clerk_sync.cli": ["app", "main"],
    "clerk_sync.cli.hooks": ["HOOKS_HELP", "MAPPING_HELP", "MappingMigrated", "hooks_app", "load_hooks", "load_mapping", "migrate_mapping", "worker"],
    "clerk_sync.cli.dev": ["DevReport", "DevStack", "run_dev", "seed_demo"],
    "clerk_sync.cli.doctor": ["Check", "run_checks", "run_freshness"],
    "clerk_sync.cli.main": ["EXIT_SETTINGS", "EXIT_UNAVAILABLE", "EXIT_UNDONE", "app", "erase_outcome", "exit_code",
                            "main"],
    "clerk_sync.cli.reconcile": ["reconcile_command"],
    "clerk_sync.config": ["DEFAULT_DATABASE_URL", "DatabaseTimeouts", "Settings", "parse_webhook_secrets"],
    "clerk_sync.engine": ["Action", "DeliveryPlan", "DeliveryStatus", "Entity", "HANDLED_EVENT_TYPES", "Ignore", "Intent", "Record", "RevokeSession", "RowState", "Tombstone", "Upsert", "decide", "delivery_reason", "membership_parents", "membership_to_repair", "person_named", "plan", "plan_delivery", "touches", "user_named"],
    "clerk_sync.errors": ["AccessDenied", "AmbiguousUser", "ClerkAPIError", "ClerkNotFound", "ClerkPaymentRequired", "ClerkSyncDeprecationWarning", "ClerkSyncError", "ClerkUnauthorized", "ClerkUnavailable", "ClerkValidationError", "ConfigError", "CrossSiteRequest", "EventShapeError", "HookGaveUp", "HookRetryLater", "ImpersonationEnded", "InvalidRole", "MigrationPending", "ParentNotThere", "PayloadError", "PayloadTooLarge", "RateLimited", "ReconcileBusy", "SessionPending", "SessionRevoked", "SessionUserBanned", "StoreDataError", "StoreError", "StorePrivilegeMissing", "TokenAlgorithmNotAllowed", "TokenAuthorizedPartyInvalid", "TokenClaimMissing", "TokenError", "TokenExpired", "TokenIssuedInFuture", "TokenIssuerInvalid", "TokenKeyUnknown", "TokenKeysUnavailable", "TokenMalformed", "TokenMissing", "TokenNotYetValid", "TokenSignatureInvalid", "UnknownUser", "UserBanned", "UserDeleted", "UserDeprovisioned", "UserLocked", "WebhookBodyTimeout", "WebhookError", "WebhookHeadersMissing", "WebhookVerificationError", "WrongInstance"],
    "clerk_sync.events": ["Envelope", "MembershipRecord", "OrganizationRecord", "UserRecord", "instance_mismatch", "membership_record", "normalize_timestamp_ms", "organization_record", "parse_envelope", "record_columns", "user_record"],
    "clerk_sync.hooks": ["Backoff", "Change", "Dispatcher", "Event", "Hook", "HookGaveUp", "HookRetryLater"],
    "clerk_sync.hooks.sinks": ["RabbitMQSink", "RedisStreamSink", "StandardWebhookSink", "change_message"],
    "clerk_sync.ingest": ["Outcome", "ReplayReport", "WebhookProcessor", "apply_envelope", "dismiss_failed", "replay_deliveries", "replay_one"],
    "clerk_sync.integrations": [],
    "clerk_sync.integrations.console": ["SignInThrottle", "check_console_settings", "create_console"],
    "clerk_sync.integrations.asgi": ["ClerkAuthBackend", "ClerkAuthMiddleware", "ClerkUser", "WEBHOOK_SLASH_TWINS", "check_handshake_origin", "judged_by", "keep_standing", "kept_standing", "refusal_of", "refuse_handshake", "remember"],
    "clerk_sync.integrations.django": [],
    "clerk_sync.integrations.django.admin": ["AuditLogAdmin", "ClerkUserAdmin", "MembershipAdmin", "OrganizationAdmin", "ReadOnlyAdmin", "WebhookDeliveryAdmin", "replay_audited"],
    "clerk_sync.integrations.django.apps": ["ClerkSyncConfig"],
    "clerk_sync.integrations.django.backends": ["ClerkBackend", "deactivate_django_user", "django_user",
                                                "forget_cleared_django_users", "forget_django_user",
                                                "refresh_django_user", "refresh_django_users", "sync_django_user",
                                                "uses_clerk_backend"],
    "clerk_sync.integrations.django.checks": ["check_settings"],
    "clerk_sync.integrations.django.conf": ["APP", "DjangoOptions", "UserFields", "clerk_settings", "database_url_from_django",
                                            "default_user_fields", "django_options", "require_app_installed"],
    "clerk_sync.integrations.django.decorators": ["Check", "check_role", "clerk_guard", "clerk_login_required", "confirm_org_role", "not_impersonated", "require_org_role", "require_permission", "require_role"],
    "clerk_sync.integrations.django.management": [],
    "clerk_sync.integrations.django.management.commands": [],
    "clerk_sync.integrations.django.management.commands.clerk_sync": ["Command"],
    "clerk_sync.integrations.django.middleware": ["ClerkMiddleware", "clerk_public"],
    "clerk_sync.integrations.django.request": ["ClerkRequest", "ClerkUserUnavailable", "aclerk_request", "clerk_request"],
    "clerk_sync.integrations.django.mixins": ["ClerkLoginRequiredMixin", "NotImpersonatedMixin", "OrgPermissionRequiredMixin", "OrgRoleRequiredMixin", "RoleRequiredMixin"],
    "clerk_sync.integrations.django.models": ["AuditLogEntry", "ClerkMembership", "ClerkOrganization", "ClerkUser", "WebhookDelivery"],
    "clerk_sync.integrations.django.rest_framework": ["ClerkAPIException", "ClerkAuthentication", "ClerkPrincipal", "HasOrgRole", "HasPermission", "HasRole", "IsClerkAuthenticated", "NotImpersonated", "clerk_auth"],
    "clerk_sync.integrations.django.runtime": ["ClerkSync", "get_clerk_sync", "reset_clerk_sync"],
    "clerk_sync.integrations.django.testing": ["ClerkSyncDiscoverRunner", "ClerkSyncTestRunnerMixin", "migrate_test_database"],
    "clerk_sync.integrations.django.urls": ["app_name", "urlpatterns"],
    "clerk_sync.integrations.django.views": ["error_json", "read_limited_body", "sync_me", "webhook"],
    "clerk_sync.integrations.fastapi": ["ClerkAuth", "build_processor", "sync_me_router", "webhook_router"],
    "clerk_sync.integrations.flask": ["AnonymousUser", "ClerkSync", "ClerkSyncState", "SignedInUser", "clerk_login_required", "clerk_state", "clerk_sync_cli", "current_clerk", "current_user", "error_json", "not_impersonated", "optional_clerk", "public", "require_org_role", "require_permission", "require_role", "settings_from_config", "webhook_blueprint"],
    "clerk_sync.integrations.http": ["ErrorResponse", "STATUS_BY_ERROR", "delivery_answer", "error_response", "status_for"],
    "clerk_sync.integrations.starlette": ["PruneSchedule", "StartupMigration", "WebhookFastPath", "app_from_env", "build_processor", "create_app", "error_json", "read_limited_body", "webhook_endpoint", "webhook_routes"],
    "clerk_sync.metrics": ["CONTENT_TYPE_LATEST", "DatabaseSnapshot", "KNOWN_EVENT_TYPES", "Metrics", "event_type_label"],
    "clerk_sync.freshness": ["FreshnessCheck", "check_freshness", "database_probe", "read_initial_load", "read_snapshot"],
    "clerk_sync.retention": ["ErasureReport", "PruneReport", "Retention", "RetentionPolicy", "UnknownUser", "redact_payload",
                            "settle_if_stored_redacted"],
    "clerk_sync.tracing": ["ENABLED", "delivery_span", "span"],
    "clerk_sync.mapping": ["Anonymise", "Column", "Deactivate", "DeletePolicy", "HardDelete", "LinkAmbiguous", "LinkLookup", "LinkUnverified", "MappedTable", "SchemaMapping", "SoftDelete", "TRANSFORMS", "build_unique_indexes_concurrently", "check_schema", "migrate_schema"],
    "clerk_sync.migrations": ["Upgraded", "current_revision", "head_revision", "is_current", "upgrade", "upgrading"],
    "clerk_sync.outbox": ["Job", "Outbox", "claim", "delete_jobs", "extend", "fail", "finish", "finish_many", "list_jobs", "redact_jobs", "release", "retry_jobs"],
    "clerk_sync.reconcile": ["Change", "Counts", "Progress", "ReconcileReport", "Reconciler"],
    "clerk_sync.store": ["READ_ONLY_OPTION", "Store", "Writer", "create_engine", "dialect_family", "erased_digest"],
    "clerk_sync.tables": ["audit_log", "erased", "hook_jobs", "metadata", "organization_memberships", "organizations", "pending_role_changes", "reconcile_runs", "reconcile_seen", "revoked_sessions", "seen_columns", "sync_locks", "users", "webhook_events"],
    "clerk_sync.testing": ["EmulatorRequestError", "EmulatorServer", "serve_app"],
    "clerk_sync.webhooks": ["DEFAULT_TOLERANCE_S", "SignedHeaders", "WebhookVerifier", "sign"],
}
# fmt: on


def test_every_public_module_is_pinned() -> None:
    public = {"clerk_sync"} | {
        m for m in MODULES if not any(part.startswith("_") for part in m.split(".")) and ".emulator" not in m
    }
    assert public == set(PUBLIC_API)


@pytest.mark.parametrize("name", sorted(PUBLIC_API))
def test_public_names_are_exactly_the_pinned_ones(name: str) -> None:
    module = importlib.import_module(name)
    assert sorted(module.__all__) == PUBLIC_API[name]
    assert len(set(module.__all__)) == len(module.__all__)
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert missing == []


@pytest.mark.parametrize("name", MODULES)
def test_every_module_declares_an_existing_all(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, list), f"{name} has no __all__ list"
    assert [n for n in exported if not hasattr(module, n)] == []


def test_every_error_is_in_the_one_tree_and_exported() -> None:
    from clerk_sync import errors

    classes = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, Exception)}
    assert classes == set(errors.__all__)
    for name in classes - {"ClerkSyncDeprecationWarning"}:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.ClerkSyncError), name
        assert cls.code and cls.code == cls.code.lower(), name
    assert issubclass(errors.ClerkSyncDeprecationWarning, UserWarning)  # shown by default


def test_every_error_has_an_http_status_in_the_one_table() -> None:
    from clerk_sync import errors
    from clerk_sync.integrations.http import STATUS_BY_ERROR, status_for

    assert status_for(errors.UserDeleted("x")) == 410  # the nearest class wins over AccessDenied
    assert status_for(errors.SessionUserBanned("x")) == 401
    assert status_for(errors.PayloadTooLarge("x")) == 413
    assert status_for(errors.StoreDataError("x")) == 503
    assert not any(hasattr(getattr(errors, n), "status_code") for n in errors.__all__)  # chosen only in the table
    assert all(100 <= s < 600 for s in STATUS_BY_ERROR.values())


def test_version_comes_from_the_installed_metadata() -> None:
    assert clerk_sync.__version__ != "0.0.0"


@pytest.mark.parametrize(("old", "name", "new"), [
    ("clerk_sync.sessions", "SessionVerifier", "clerk_sync.auth.sessions"),
    ("clerk_sync.sessions", "Auth", "clerk_sync.auth.claims"),
    ("clerk_sync.users", "AuthUser", "clerk_sync.auth.users"),
    ("clerk_sync.reconcile_tables", "reconcile_runs", "clerk_sync.tables"),
    ("clerk_sync.reconcile_cli", "parse_since", "clerk_sync.cli._args"),
    ("clerk_sync.integrations.auth_asgi", "ClerkAuthMiddleware", "clerk_sync.integrations.asgi"),
])
def test_old_module_paths_still_import_for_one_release_and_warn(old: str, name: str, new: str) -> None:
    # A fresh interpreter: the warning fires on the first import only.
    code = (f"import warnings; warnings.simplefilter('error')\n"
            f"try:\n    from {old} import {name}\nexcept Warning as w:\n    print(type(w).__name__, w)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("ClerkSyncDeprecationWarning") and new.rsplit(".", 1)[0] in out
    assert old in _compat.MOVED_MODULES
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", clerk_sync.errors.ClerkSyncDeprecationWarning)
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_renamed_names_resolve_to_the_new_ones_with_a_warning() -> None:
    import clerk_sync.auth.claims as claims

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", clerk_sync.errors.ClerkSyncDeprecationWarning)
        old = importlib.import_module("clerk_sync.sessions")
    with pytest.warns(clerk_sync.errors.ClerkSyncDeprecationWarning, match="ClaimsValidator"):
        assert old.SessionPolicy is claims.ClaimsValidator
