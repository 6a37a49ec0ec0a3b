"""A hook naming ``session.revoked``/``ended``/``removed`` is refused with why (clerk-sync applies them: the deny
list refuses the session's tokens, no hook needed) and what to use instead (the deny list's ``is_revoked`` to act
on one; the session types a hook may name), not with types that never fire on a revocation."""

from __future__ import annotations

import pytest

from clerk_sync.auth import DenyList
from clerk_sync.changes import EVENT_TYPES, Hook


@pytest.mark.parametrize("event_type", ["session.revoked", "session.ended", "session.removed"])
def test_naming_a_session_revocation_says_why_and_what_to_use_instead(event_type: str) -> None:
    with pytest.raises(ValueError, match="hook 'logout'") as refused:
        Hook("logout", print, on=[event_type])
    said = str(refused.value)
    assert f"['{event_type}'] are applied by clerk-sync, not offered to hooks" in said
    assert "goes to the deny list" in said and "401 session_revoked" in said  # why no hook is needed
    assert "clerk_sync.auth.DenyList(store)'s is_revoked(session_id)" in said and hasattr(DenyList, "is_revoked")
    assert "'session.created'" in said and "'session.pending'" in said
    assert {"session.created", "session.pending"} <= EVENT_TYPES  # what it offers instead may be named
    assert "user.updated" not in said  # no user change follows a revocation


def test_session_family_wildcard_is_refused_as_it_would_never_get_a_revocation() -> None:
    """Review (webhook edge) 3: ``on=["session.*"]`` was accepted and got session.created and session.pending
    only, never a revoked, ended or removed session: an app closing connections on a revocation got nothing."""
    with pytest.raises(ValueError, match="hook 'logout'") as refused:
        Hook("logout", print, on=["session.*"])
    said = str(refused.value)
    assert "'session.*' would get session.created and session.pending only" in said
    assert "on=['session.created']" in said and "is_revoked(session_id)" in said
    assert Hook("seen", print, on=["session.created", "session.pending"]).wants_event("session.created")
