"""The emulator's lockout ends by itself (rendered from its clock: no event, no updated_at bump); banned, locked
and deprovisioned users may not sign in; ``/_emulator/users/{id}/deprovision`` does what SCIM does."""

from __future__ import annotations

from typing import Any

import pytest

from clerk_sync.testing import EmulatorRequestError, EmulatorServer

from .support import SpecValidator

T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.at = T0

    def __call__(self) -> float:
        return self.at


def _user_events(emu: EmulatorServer, user_id: str) -> list[dict[str, Any]]:
    return [d for d in emu.deliveries(include_payload=True)
            if d["type"].startswith("user.") and d["payload"]["data"]["id"] == user_id]


def _refused(call: Any) -> tuple[int, str | None]:
    with pytest.raises(EmulatorRequestError) as caught:
        call()
    return caught.value.status, caught.value.clerk_code


def test_a_lock_counts_down_and_ends_with_no_event_and_no_updated_at_bump(bapi: SpecValidator) -> None:
    clock = Clock()
    with EmulatorServer(seed=3, clock=clock) as emu:
        user = emu.create_user(email="ada@example.com")
        locked = emu.request("POST", f"/v1/users/{user['id']}/lock")
        bapi.validate("User", locked)
        assert (locked["locked"], locked["lockout_expires_in_seconds"]) == (True, 3600)  # Clerk's default: an hour
        clock.at += 1000.2
        later = emu.request("GET", f"/v1/users/{user['id']}")
        assert (later["locked"], later["lockout_expires_in_seconds"]) == (True, 2600)  # whole seconds, rounded up
        events = len(_user_events(emu, user["id"]))
        clock.at = T0 + 3600
        over = emu.request("GET", f"/v1/users/{user['id']}")
        bapi.validate("User", over)
        assert (over["locked"], over["lockout_expires_in_seconds"]) == (False, None)
        assert over["verification_attempts_remaining"] is not None
        assert over["updated_at"] == locked["updated_at"]  # expiring is no change of Clerk's record
        listed = emu.request("GET", "/v1/users", params={"user_id": user["id"]})
        assert listed[0]["locked"] is False
        assert len(_user_events(emu, user["id"])) == events  # and sends nothing


def test_the_lock_duration_is_an_instance_setting_null_never_expires() -> None:
    clock = Clock()
    with EmulatorServer(seed=3, clock=clock) as emu:
        user = emu.create_user(email="ada@example.com")
        assert emu.request("POST", "/_emulator/lockout", json={"duration_s": None}) == {"duration_s": None}
        locked = emu.request("POST", f"/v1/users/{user['id']}/lock")
        assert (locked["locked"], locked["lockout_expires_in_seconds"]) == (True, None)
        clock.at += 365 * 86400
        assert emu.request("GET", f"/v1/users/{user['id']}")["locked"] is True
        unlocked = emu.request("POST", f"/v1/users/{user['id']}/unlock")
        assert (unlocked["locked"], unlocked["lockout_expires_in_seconds"]) == (False, None)
        emu.request("POST", "/_emulator/lockout", json={"duration_s": 60})
        assert emu.request("POST", f"/v1/users/{user['id']}/lock")["lockout_expires_in_seconds"] == 60
        emu.reset()  # restores the default
        other = emu.create_user(email="bob@example.com")
        assert emu.request("POST", f"/v1/users/{other['id']}/lock")["lockout_expires_in_seconds"] == 3600
        assert _refused(lambda: emu.request("POST", "/_emulator/lockout", json={"duration_s": -1}))[0] == 422


def test_a_locked_user_may_not_sign_in_until_the_lock_expires() -> None:
    clock = Clock()
    with EmulatorServer(seed=3, clock=clock) as emu:
        user = emu.create_user(email="ada@example.com")
        session = emu.create_session(user["id"])  # signed in before the lock: the session lives on
        emu.request("POST", f"/v1/users/{user['id']}/lock")
        assert _refused(lambda: emu.create_session(user["id"])) == (403, "user_locked")
        assert _refused(lambda: emu.mint_session_token(user["id"])) == (403, "user_locked")
        assert _refused(lambda: emu.request("POST", "/_emulator/sessions", json={"user_id": user["id"]})) == (
            403, "user_locked")
        ticket = emu.request("POST", "/v1/sign_in_tokens", json={"user_id": user["id"]})
        assert _refused(lambda: emu.request("POST", f"/_emulator/sign_in_tokens/{ticket['id']}/accept")) == (
            403, "user_locked")
        assert emu.session_token(session["id"])  # an existing session still gets tokens (a lock revokes nothing)
        clock.at += 3600
        assert emu.mint_session_token(user["id"])  # the lock is over: signs in again
        accepted = emu.request("POST", f"/_emulator/sign_in_tokens/{ticket['id']}/accept")  # not used up before
        assert accepted["session"]["user_id"] == user["id"]


def test_a_banned_user_may_not_sign_in() -> None:
    with EmulatorServer(seed=3) as emu:
        user = emu.create_user(email="ada@example.com")
        emu.request("POST", f"/v1/users/{user['id']}/ban")
        assert _refused(lambda: emu.create_session(user["id"])) == (403, "user_banned")
        assert _refused(lambda: emu.mint_session_token(user["id"])) == (403, "user_banned")
        admin = emu.create_user(email="root@example.com")
        assert _refused(lambda: emu.mint_session_token(user["id"], actor=admin["id"])) == (403, "user_banned")
        emu.request("POST", f"/v1/users/{user['id']}/unban")
        assert emu.mint_session_token(user["id"])


def test_deprovisioning_sends_user_updated_and_refuses_sign_in(bapi: SpecValidator) -> None:
    with EmulatorServer(seed=3) as emu:
        user = emu.create_user(email="ada@example.com")
        assert emu.request("GET", f"/v1/users/{user['id']}")["deprovisioned"] is False
        gone = emu.request("POST", f"/_emulator/users/{user['id']}/deprovision")
        bapi.validate("User", gone)
        assert gone["deprovisioned"] is True and gone["updated_at"] > user["updated_at"]
        last = _user_events(emu, user["id"])[-1]
        assert (last["type"], last["payload"]["data"]["deprovisioned"]) == ("user.updated", True)
        assert _refused(lambda: emu.create_session(user["id"])) == (403, "user_deprovisioned")
        back = emu.request("POST", f"/_emulator/users/{user['id']}/deprovision", json={"deprovisioned": False})
        assert back["deprovisioned"] is False and emu.mint_session_token(user["id"])
