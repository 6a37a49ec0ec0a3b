"""Review finding: an admin's console session outlived the Clerk session it was opened with: revoked in
Clerk (sign out everywhere, a compromised session), the console cookie kept working for up to 8 hours.
The console session now holds the Clerk session id and ends with it."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest

from clerk_sync.errors import SessionRevoked
from clerk_sync.integrations.console._access import COOKIE, ConsoleAccess
from clerk_sync.store import Store
from clerk_sync.tables import revoked_sessions, users
from tests.console.conftest import ConsoleStack, admin_signed_in

JSON = {"Accept": "application/json"}


def test_a_console_session_ends_when_its_clerk_session_is_revoked(stack: ConsoleStack) -> None:
    session = stack.emulator.create_session(stack.admin_id)
    other = stack.emulator.create_session(stack.admin_id)  # the same admin, signed in elsewhere
    token = stack.emulator.session_token(session["id"])
    r = httpx.get(f"{stack.console_url}/", headers=JSON, cookies={"__session": token})
    assert r.status_code == 200
    console_cookie = r.cookies[COOKIE]
    with httpx.Client(base_url=stack.console_url, cookies={COOKIE: console_cookie}, timeout=30) as client:
        assert client.get("/audit", headers=JSON).status_code == 200  # the console session alone, as after 60 s
        stack.emulator.request("POST", f"/v1/sessions/{session['id']}/revoke")
        stack.wait_synced()
        r = client.get("/audit", headers=JSON)
        assert (r.status_code, r.json()["error"]) == (401, "session_revoked")
        assert f'{COOKIE}=""' in r.headers["set-cookie"] and "Max-Age=0" in r.headers["set-cookie"]  # signed out
    r = httpx.get(f"{stack.console_url}/audit", headers={"Accept": "text/html"}, cookies={COOKIE: console_cookie})
    assert r.status_code == 303 and r.headers["location"].startswith("/console/login")
    # Signing in again with a live session works, the stale console cookie notwithstanding.
    fresh = stack.emulator.session_token(other["id"])
    r = httpx.get(f"{stack.console_url}/", headers=JSON, cookies={COOKIE: console_cookie, "__session": fresh})
    assert r.status_code == 200 and f"{COOKIE}=" in r.headers["set-cookie"]
    # The revoked session cannot open a new console session either (the deny list may lag; the table does not).
    r = httpx.get(f"{stack.console_url}/login/clerk", params={"token": token}, headers=JSON)
    assert r.status_code == 401


@pytest.fixture
def access(store: Store) -> ConsoleAccess:
    now = datetime.now(UTC)
    with store.transaction() as w:
        w.conn.execute(users.insert().values(
            clerk_id="user_adm", email_addresses=[], public_metadata={"role": "admin"}, private_metadata={},
            unsafe_metadata={}, role="admin", clerk_updated_at=1, created_at=now, updated_at=now))
    return ConsoleAccess(store, operator_token=None, authenticator=None, secret=b"k" * 32)


def test_a_revocation_the_deny_list_has_forgotten_still_ends_the_console_session(
        store: Store, access: ConsoleAccess) -> None:
    """The deny list drops a revocation once the Clerk session would have expired (tokens are dead by
    then); a console session can last longer, so the table decides."""
    cookie = admin_signed_in(access, "user_adm", "sess_adm")
    assert access.identify({}, {COOKIE: cookie}).kind == "admin"
    past = int(datetime.now(UTC).timestamp() * 1000) - 1000
    with store.transaction() as w:
        w.conn.execute(revoked_sessions.insert().values(session_id="sess_adm", reason="ended", revoked_at=w.now,
                                                        expire_at=past))
    with pytest.raises(SessionRevoked):
        access.identify({}, {COOKIE: cookie})
    with pytest.raises(SessionRevoked):
        access.admin_session("user_adm", "sess_adm")


def test_an_admin_console_session_without_a_clerk_session_id_is_refused(access: ConsoleAccess) -> None:
    """Cookies minted before this fix carry no ``sid``: nothing to follow, so sign in again."""
    old = access._sessions.dumps({"k": "admin", "sub": "user_adm", "csrf": "x" * 32})
    with pytest.raises(SessionRevoked, match="sign in again"):
        access.identify({}, {COOKIE: old})


def test_a_console_session_lasts_what_clerk_sync_console_session_s_says(tmp_path: object) -> None:
    """Clerk sends nothing when a session merely expires, so the console's own limit is what ends a console
    session then: 8 hours was fixed; ``CLERK_SYNC_CONSOLE_SESSION_S`` sets it (measured on the injected
    clock, not the wall's)."""
    from clerk_sync import migrations
    from clerk_sync.config import Settings
    from clerk_sync.errors import TokenMissing
    from clerk_sync.integrations.console import create_console

    now = [1_800_000_000.0]
    store = Store.from_url(f"sqlite:///{tmp_path}/c.db")
    migrations.upgrade(store.engine)
    access = ConsoleAccess(store, operator_token="op-token", authenticator=None, secret=b"k" * 32, max_age_s=600,
                           clock=lambda: now[0])
    cookie = access.operator_session("op-token").new_cookie
    assert cookie is not None
    now[0] += 599
    assert access.identify({}, {COOKIE: cookie}).kind == "operator"
    now[0] += 2
    with pytest.raises(TokenMissing):
        access.identify({}, {COOKIE: cookie})
    settings = Settings(_env_file=None, CLERK_SYNC_CONSOLE_TOKEN="op-token-0123456789",  # type: ignore[call-arg]
                        CLERK_SYNC_CONSOLE_SESSION_S="900")
    app = create_console(Store.from_url(f"sqlite:///{tmp_path}/c.db"), settings)
    assert app.state.console.access.max_age_s == 900
    with pytest.raises(ValueError, match="CLERK_SYNC_CONSOLE_SESSION_S"):
        Settings(_env_file=None, CLERK_SYNC_CONSOLE_SESSION_S="5")  # type: ignore[call-arg]


def test_a_copy_of_a_signed_out_console_cookie_is_refused(stack: ConsoleStack) -> None:
    """Review finding (left alone before): signing out only deleted the cookie, so a copy of it (another
    tab's, a proxy's log, a stolen one) kept the console open until CLERK_SYNC_CONSOLE_SESSION_S. The
    sign-out's audit row now ends every console session of that admin opened before it."""
    from tests.console.test_http import csrf_of, signed_in

    with signed_in(stack, stack.admin_id) as client:
        copy = client.cookies[COOKIE]
        token = csrf_of(client.get("/", headers={"Accept": "text/html"}).text)
        assert httpx.get(f"{stack.console_url}/audit", headers=JSON, cookies={COOKIE: copy}).status_code == 200
        assert client.post("/logout", data={"csrf": token}).status_code == 303
    r = httpx.get(f"{stack.console_url}/audit", headers=JSON, cookies={COOKIE: copy})
    assert (r.status_code, r.json()["error"]) == (401, "token_missing") and "signed out" in r.json()["message"]
    assert f'{COOKIE}=""' in r.headers["set-cookie"]  # the dead cookie is cleared
    logout = [row for row in stack.audit_rows() if row.action == "console.logout"]
    assert [(row.actor_clerk_id, row.details["via"]) for row in logout] == [(stack.admin_id, "console")]
    with signed_in(stack, stack.admin_id) as client:  # signing in again opens a new session
        assert client.get("/audit", headers=JSON).status_code == 200


def test_a_sign_out_ends_only_that_identitys_earlier_sessions(tmp_path: object) -> None:
    """On the injected clock: the operator's sign-out ends every operator session opened before it (one
    token, one identity), not those opened after, nor an admin's."""
    from clerk_sync import migrations
    from clerk_sync.auth.audit import AuditEntry, record_audit
    from clerk_sync.errors import TokenMissing
    from clerk_sync.integrations.console._access import SIGN_OUT

    now = [1_800_000_000.0]
    store = Store.from_url(f"sqlite:///{tmp_path}/c.db")
    migrations.upgrade(store.engine)
    access = ConsoleAccess(store, operator_token="op-token", authenticator=None, secret=b"k" * 32,
                           clock=lambda: now[0])
    first, second = (access.operator_session("op-token").new_cookie for _ in range(2))
    with store.transaction() as w:
        w.conn.execute(users.insert().values(
            clerk_id="user_adm", email_addresses=[], public_metadata={"role": "admin"}, private_metadata={},
            unsafe_metadata={}, role="admin", clerk_updated_at=1, created_at=w.now, updated_at=w.now))
    admin = admin_signed_in(access, "user_adm", "sess_adm")
    assert first and second and admin
    now[0] += 0.5
    with store.transaction() as w:
        record_audit(w, AuditEntry(SIGN_OUT, None, None, details=access.sign_out_details()))
    for cookie in (first, second):
        with pytest.raises(TokenMissing, match="signed out"):
            access.identify({}, {COOKIE: cookie})
    assert access.identify({}, {COOKIE: admin}).clerk_id == "user_adm"  # another identity's session lives
    later = access.operator_session("op-token").new_cookie
    assert later and access.identify({}, {COOKIE: later}).kind == "operator"
    with store.transaction() as w:  # an admin's sign-out
        record_audit(w, AuditEntry(SIGN_OUT, "user_adm", "user_adm", details=access.sign_out_details()))
    now[0] += 0.5
    with pytest.raises(TokenMissing, match="signed out"):
        access.identify({}, {COOKIE: admin})
    assert access.identify({}, {COOKIE: later}).kind == "operator"
    store.dispose()


def test_signing_out_when_the_audit_row_cannot_be_written_still_signs_this_browser_out(
        stack: ConsoleStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review suspicion: the sign-out's audit row is a write; refused (a read-only database role), the
    sign-out answered 503 and left the cookie in place. This browser is signed out all the same."""
    from clerk_sync.errors import StoreError
    from clerk_sync.integrations.console._console import Console
    from tests.console.test_http import csrf_of, signed_in

    def refused(*args: object, **kwargs: object) -> None:
        raise StoreError("database error: permission denied for table audit_log")

    with signed_in(stack, stack.admin_id) as client:
        token = csrf_of(client.get("/", headers={"Accept": "text/html"}).text)
        monkeypatch.setattr(Console, "audit", refused)
        response = client.post("/logout", data={"csrf": token})
        assert response.status_code == 303 and f'{COOKIE}=""' in response.headers["set-cookie"]


@pytest.mark.parametrize("lose_access", ["demoted", "locked"])
def test_an_admin_who_lost_access_can_still_sign_out_and_end_the_cookies_copies(
        stack: ConsoleStack, lose_access: str) -> None:
    """Review finding: identifying a demoted, locked or banned admin refused POST /logout (403) before its
    handler, so no ``console.logout`` row ended the session's copies: once re-promoted (or unlocked), a stolen
    copy of the cookie worked again. A validly signed cookie (and its CSRF token) can always sign itself out."""
    from clerk_sync.auth.admin import AdminActions
    from tests.console.test_http import HTML, csrf_of, signed_in

    assert stack.console.clerk is not None
    actions = AdminActions(stack.store, stack.console.clerk)

    def lose(lost: bool) -> None:
        if lose_access == "demoted":
            actions.promote(stack.admin_id, "user" if lost else "admin", by=None)
            stack.wait_synced()
        else:
            with stack.store.transaction() as w:
                w.conn.execute(users.update().where(users.c.clerk_id == stack.admin_id).values(locked=lost))

    with signed_in(stack, stack.admin_id) as client:
        copy = client.cookies[COOKIE]
        token = csrf_of(client.get("/", headers=HTML).text)
        lose(True)
        assert client.get("/audit", headers=JSON).status_code == 403
        assert client.post("/logout").status_code == 403  # the CSRF check still holds
        response = client.post("/logout", data={"csrf": token})
        assert response.status_code == 303 and f'{COOKIE}=""' in response.headers["set-cookie"]
    logout = [row for row in stack.audit_rows() if row.action == "console.logout"]
    assert [(row.actor_clerk_id, row.details["as"]) for row in logout] == [(stack.admin_id, "admin")]
    lose(False)
    r = httpx.get(f"{stack.console_url}/audit", headers=JSON, cookies={COOKIE: copy})
    assert (r.status_code, r.json()["error"]) == (401, "token_missing") and "signed out" in r.json()["message"]
    with signed_in(stack, stack.admin_id) as client:  # access is back: only the signed-out session is over
        assert client.get("/audit", headers=JSON).status_code == 200
