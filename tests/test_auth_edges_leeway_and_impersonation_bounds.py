"""Two unbounded lengths of time (security review, session 2026-12-05): ``CLERK_SYNC_SESSION_LEEWAY_S`` had no
upper bound, so a typo (86400) silently accepted session tokens a day after they expired; and
``AdminActions.start_impersonation(session_max_s=...)`` passed the impersonated session's length to Clerk
unchecked (Clerk's spec sets no maximum for ``session_max_duration_in_seconds``), so an app endpoint forwarding
it could mint an impersonation of any length. The leeway is now at most 300 s, the session 1 s to an hour."""

from __future__ import annotations

from typing import Any

import pytest

from clerk_sync.auth import admin as admin_module
from clerk_sync.auth.admin import AdminActions
from clerk_sync.config import Settings
from clerk_sync.errors import ConfigError
from clerk_sync.store import Store
from clerk_sync.testing import EmulatorServer
from tests.test_admin import audit_rows, synced_user

MAX_IMPERSONATION_SESSION_S = 3600  # clerk_sync.auth.admin.MAX_IMPERSONATION_SESSION_S: an hour


def _leeway(value: str) -> float:
    return Settings.from_env({"DATABASE_URL": "sqlite://", "CLERK_SYNC_SESSION_LEEWAY_S": value}).session_leeway_s


def test_the_session_leeway_is_at_most_300_seconds() -> None:
    assert Settings.from_env({"DATABASE_URL": "sqlite://"}).session_leeway_s == 5.0
    assert [_leeway(v) for v in ("0", "5", "60", "300")] == [0.0, 5.0, 60.0, 300.0]
    for typo in ("300.5", "3600", "86400"):
        with pytest.raises(ConfigError, match=r"CLERK_SYNC_SESSION_LEEWAY_S.*less than or equal to 300"):
            _leeway(typo)
    for bad in ("-1", "inf", "nan"):  # as before
        with pytest.raises(ConfigError, match="CLERK_SYNC_SESSION_LEEWAY_S"):
            _leeway(bad)


def test_the_impersonated_sessions_length_is_bounded(emu: EmulatorServer, store: Store, actions: AdminActions,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    admin = synced_user(emu, store, "root@example.com", role="admin")
    target = synced_user(emu, store, "erin@example.com")
    asked: list[Any] = []
    create = actions.clerk.create_actor_token

    def spy(user_id: str, actor: dict[str, Any], **options: Any) -> dict[str, Any]:
        asked.append(options["session_max_duration_in_seconds"])
        return create(user_id, actor, **options)

    monkeypatch.setattr(actions.clerk, "create_actor_token", spy)
    for bad in (0, -60, MAX_IMPERSONATION_SESSION_S + 1, 86_400 * 365, True, 600.0, "600", None):
        with pytest.raises(ValueError, match=f"from 1 to {MAX_IMPERSONATION_SESSION_S}") as refused:
            actions.start_impersonation(admin, target, session_max_s=bad)
        assert "session_max_s" in str(refused.value)
    assert asked == [] and audit_rows(store) == []  # nothing asked of Clerk, nothing granted
    for good in (1, MAX_IMPERSONATION_SESSION_S):
        grant = actions.start_impersonation(admin, target, session_max_s=good)
        assert grant.method == "actor_token"
        accepted = emu.request("POST", f"/_emulator/actor_tokens/{audit_rows(store)[-1]['details']['grant_id']}/accept")
        assert accepted["session"]["expire_at"] - accepted["session"]["created_at"] == good * 1000
    assert asked == [1, MAX_IMPERSONATION_SESSION_S]
    assert admin_module.MAX_IMPERSONATION_SESSION_S == MAX_IMPERSONATION_SESSION_S
