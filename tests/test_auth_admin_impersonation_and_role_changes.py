"""The admin edges of auth, each once broken: an impersonation outlived its admin's demotion (and asked Clerk
for no session length, so it lasted Clerk's default), a queued promotion was pushed after its admin lost the
role, a locked or deprovisioned user read by a JIT loader was signed out (401) instead of refused (403), and
outage answers told anonymous callers the database's host and the JWKS URL. Real servers on loopback, real
tokens, the emulator for Clerk."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import structlog

from clerk_sync.auth.admin import IMPERSONATION_SESSION_S, AdminActions
from clerk_sync.auth.authenticator import Authenticator, DenyList
from clerk_sync.auth.claims import Auth
from clerk_sync.auth.users import AuthUser, read_user
from clerk_sync.clerk_api import CircuitBreaker, ClerkClient, RetryPolicy
from clerk_sync.errors import (
    ClerkAPIError,
    ClerkUnauthorized,
    ClerkUnavailable,
    ImpersonationEnded,
    RateLimited,
    StoreDataError,
    StoreError,
    TokenKeysUnavailable,
    UserDeprovisioned,
    UserLocked,
)
from clerk_sync.integrations import http as error_table
from clerk_sync.integrations.asgi import ClerkAuthMiddleware
from clerk_sync.store import Store
from clerk_sync.testing import EmulatorServer
from tests import factories as f
from tests._server import running
from tests.test_admin import audit_rows, synced_user
from tests.test_auth import Harness, bearer, build_app, token


@pytest.fixture
def harness(db_url: str) -> Iterator[tuple[Harness, httpx.Client]]:
    h = Harness(db_url)
    app = ClerkAuthMiddleware(build_app(h), h.auth, public_paths={"/"})
    with running(app) as url, httpx.Client(base_url=url) as client:
        yield h, client
    h.store.dispose()


def test_an_impersonation_ends_when_its_admin_is_demoted(harness: tuple[Harness, httpx.Client]) -> None:
    """The actor's role is read on every impersonated request (the async face, in a worker thread, and the
    sync one): a demoted admin's impersonation ends at once, and comes back with the role."""
    h, client = harness
    h.event("user.created", f.user("user_sup_admin", 1, role="admin"))
    h.event("user.created", f.user("user_sup_target", 1))
    tok = token("user_sup_target", act={"sub": "user_sup_admin", "sid": "sess_sup_admin"})
    headers = {"authorization": f"Bearer {tok}"}
    assert client.get("/me", headers=bearer(tok)).json() == {"user_id": "user_sup_target", "impersonated": True}
    assert h.auth.authenticate(headers, {}).actor_id == "user_sup_admin"

    h.event("user.updated", f.user("user_sup_admin", 2, role="user"))
    refused = client.get("/me", headers=bearer(tok))
    assert (refused.status_code, refused.json()["error"]) == (401, "impersonation_ended")
    assert "no longer has the role" in refused.json()["message"]
    with pytest.raises(ImpersonationEnded):
        h.auth.authenticate(headers, {})
    assert client.get("/me", headers=bearer(token("user_sup_target"))).status_code == 200  # their own session

    h.event("user.updated", f.user("user_sup_admin", 3, role="admin"))
    assert client.get("/me", headers=bearer(tok)).status_code == 200


def test_an_impersonation_by_a_dashboard_user_is_not_the_apps_to_judge(harness: tuple[Harness, httpx.Client]) -> None:
    """An actor with no row here (Clerk Dashboard impersonation) passes as before; the app's roles name it not."""
    h, client = harness
    h.event("user.created", f.user("user_dash_target", 1))
    tok = token("user_dash_target", act={"iss": "https://dashboard.clerk.com", "sub": "user_dashboard_staff",
                                         "sid": "sess_dash"})
    assert client.get("/me", headers=bearer(tok)).json() == {"user_id": "user_dash_target", "impersonated": True}


def test_impersonator_roles_name_who_may_keep_impersonating(harness: tuple[Harness, httpx.Client]) -> None:
    """An app whose support staff impersonate (by its own actor tokens) lists their role; None: standing only."""
    h, _ = harness
    h.event("user.created", f.user("user_support", 1, role="support"))
    h.event("user.created", f.user("user_customer", 1))
    headers = {"authorization": f"Bearer {token('user_customer', act={'sub': 'user_support'})}"}
    with pytest.raises(ImpersonationEnded):
        h.auth.authenticate(headers, {})
    for roles in (frozenset({"admin", "support"}), None):
        support = Authenticator(h.auth.verifier, h.store, deny_list=DenyList(h.store, refresh_s=0),
                                impersonator_roles=roles)
        assert support.authenticate(headers, {}).actor_id == "user_support"
    h.event("user.updated", {**f.user("user_support", 2, role="support"), "banned": True})
    with pytest.raises(ImpersonationEnded, match="banned"):
        Authenticator(h.auth.verifier, h.store, impersonator_roles=None).authenticate(headers, {})


def test_the_impersonated_session_length_is_asked_for(emu: EmulatorServer, store: Store,
                                                       actions: AdminActions) -> None:
    """Only the link's life was bounded (≤ 5 min); the session took Clerk's default without saying so. It is
    asked for now, and audited with the grant."""
    admin = synced_user(emu, store, "root@example.com", role="admin")
    target = synced_user(emu, store, "erin@example.com")
    for asked in (IMPERSONATION_SESSION_S, 600):
        actions.start_impersonation(admin, target, session_max_s=asked)
        row = audit_rows(store)[-1]
        assert row["details"]["session_max_s"] == asked
        accepted = emu.request("POST", f"/_emulator/actor_tokens/{row['details']['grant_id']}/accept")
        session = accepted["session"]
        assert session["expire_at"] - session["created_at"] == asked * 1000


def test_a_queued_promotion_is_not_pushed_after_its_admin_lost_the_role(emu: EmulatorServer, store: Store,
                                                                         actions: AdminActions) -> None:
    """A promotion asked for during a Clerk outage was pushed by ``retry_pending`` later whatever had become of
    the admin who asked: a compromised admin, demoted since, still granted the role."""
    admin = synced_user(emu, store, "ops@example.com", role="admin")
    target = synced_user(emu, store, "mallory@example.com")
    emu.set_faults(outage=True)
    assert actions.promote(target, "admin", by=admin).status == "pending"
    emu.set_faults(outage=False)
    actions.promote(admin, "user", by=None)  # the CLI operator demotes the admin
    assert actions.retry_pending() == {"applied": 0, "pending": 0, "failed": 1}
    assert emu.request("GET", f"/v1/users/{target}")["public_metadata"]["role"] == "user"
    db = read_user(store, target)
    assert db is not None and db.role == "user"
    refused = audit_rows(store)[-1]
    assert (refused["action"], refused["actor_clerk_id"], refused["target_clerk_id"]) == (
        "role.change_refused", admin, target)
    assert actions.retry_pending() == {"applied": 0, "pending": 0, "failed": 0}  # closed, not retried

    emu.set_faults(outage=True)  # the same by a CLI operator (requested_by None) is still pushed
    assert actions.promote(target, "admin", by=None).status == "pending"
    emu.set_faults(outage=False)
    assert actions.retry_pending() == {"applied": 1, "pending": 0, "failed": 0}


def test_queued_demotions_of_two_admins_both_land_whatever_their_order(emu: EmulatorServer, store: Store,
                                                                        actions: AdminActions) -> None:
    """A gap in the fix above: requesters judged one change at a time let a compromised admin's "demote A",
    queued first, refuse A's own "demote them" queued after it. Judged once before pushing, both land."""
    mallory = synced_user(emu, store, "mallory-admin@example.com", role="admin")
    alice = synced_user(emu, store, "alice-admin@example.com", role="admin")
    emu.set_faults(outage=True)
    assert actions.promote(alice, "user", by=mallory).status == "pending"
    assert actions.promote(mallory, "user", by=alice).status == "pending"
    emu.set_faults(outage=False)
    assert actions.retry_pending() == {"applied": 2, "pending": 0, "failed": 0}
    for who in (mallory, alice):
        db = read_user(store, who)
        assert db is not None and db.role == "user"


def test_a_rejected_key_leaves_every_queued_change_queued(emu: EmulatorServer, store: Store,
                                                          actions: AdminActions) -> None:
    """Fixed (CLI): a 401 for a wrong or rotated CLERK_SECRET_KEY was taken for Clerk refusing the
    change for good: the queued promotion was closed ``failed``, and the right key later had nothing to push."""
    target = synced_user(emu, store, "frank@example.com")
    emu.set_faults(outage=True)
    assert actions.promote(target, "admin", by=None).status == "pending"
    emu.set_faults(outage=False)
    wrong = ClerkClient("sk_test_rotated_away", api_url=emu.url, retry=RetryPolicy(attempts=1, deadline_s=2),
                        breaker=CircuitBreaker(threshold=100))
    with wrong, pytest.raises(ClerkUnauthorized):
        AdminActions(store, wrong).retry_pending()
    assert actions.retry_pending() == {"applied": 1, "pending": 0, "failed": 0}
    db = read_user(store, target)
    assert db is not None and db.role == "admin"


@pytest.mark.parametrize("refusal", [UserLocked("locked"), UserDeprovisioned("deprovisioned")])
def test_a_loaders_locked_or_deprovisioned_refusal_stays_a_403(harness: tuple[Harness, httpx.Client],
                                                                refusal: Exception) -> None:
    """They subclass UserBanned, so the JIT loader's refusal was turned into a sign-out (401) where the table
    loader and the docs say 403: signing in again cannot help."""
    h, _ = harness

    def loader(clerk_id: str) -> AuthUser | None:
        raise refusal

    auth = Authenticator(h.auth.verifier, h.store, load_user=loader)
    with pytest.raises(type(refusal)):
        auth.user(Auth(user_id="user_x", session_id="sess_x", expires_at=2**40))


@pytest.mark.parametrize(("exc", "code"), [
    (StoreError('database error: OperationalError: connection to server at "10.255.0.9", port 5433 failed: '
                'FATAL: role "billing_rw" does not exist'), "store_unavailable"),
    (StoreDataError("value too long for column email: 'alice@example.com'"), "store_data_rejected"),
    (TokenKeysUnavailable("no signing keys yet: the JWKS fetch from http://10.255.0.9:8080/jwks failed"),
     "token_keys_unavailable"),
    # review: a JIT fetch's Clerk failures named CLERK_API_URL's or REDIS_URL's host to any signed-in caller
    (ClerkUnavailable("GET /users/user_x: could not connect to http://10.255.0.9:8080/v1 (ConnectError): check "
                      "CLERK_API_URL"), "clerk_unavailable"),
    (RateLimited("the shared Clerk request budget in Redis at redis://***@10.255.0.9:6379/0 is unreachable",
                 retry_after=3), "clerk_rate_limited"),
    (ClerkUnauthorized("GET /users/user_x: http://10.255.0.9:8080/v1 answered 401"), "clerk_unauthorized"),
    (ClerkAPIError("GET /users/user_x answered user 'alice', not the one asked for (http://10.255.0.9:8080)"),
     "clerk_api_error"),
])
def test_outage_answers_keep_their_cause_for_the_log(exc: Exception, code: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every face answers through the one table: the body says what happened and what to do, the cause (host,
    port, role, URL, a value) goes to the operator's log, an outage's once per error class every few seconds."""
    monkeypatch.setattr(error_table, "_logged", {})
    with structlog.testing.capture_logs() as logs:
        answers = [error_table.error_response(exc) for _ in range(3)]  # type: ignore[arg-type]
    for answer in answers:
        assert answer.body["error"] == code
        assert "10.255.0.9" not in answer.body["message"] and "alice" not in answer.body["message"]
        assert "billing_rw" not in answer.body["message"] and "log" in answer.body["message"]
    lines = [entry for entry in logs if entry["event"] == "answered_unavailable"]
    # an outage once per window; a refused value is one request's story: every one
    assert len(lines) == (3 if code == "store_data_rejected" else 1)
    assert all(line["cause"] == str(exc) and line["error"] == code for line in lines)
