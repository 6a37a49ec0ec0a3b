"""Just-in-time user sync against the emulator, on SQLite and PostgreSQL: the sign-up race above all."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa

from clerk_sync.auth.users import AuthUser, JitUsers
from clerk_sync.clerk_api import AsyncClerkClient, CircuitBreaker, ClerkClient, RetryPolicy
from clerk_sync.clerk_api.ratelimit import LocalBudget, RateLimit
from clerk_sync.engine import Entity, Tombstone
from clerk_sync.errors import ClerkAPIError, ClerkUnavailable, RateLimited, UserBanned, UserDeleted
from clerk_sync.events import UserRecord, record_columns, user_record
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations.http import status_for
from clerk_sync.store import Store
from clerk_sync.tables import users
from clerk_sync.testing import EmulatorServer
from clerk_sync.webhooks import WebhookVerifier
from tests import factories
from tests.conftest import FakeClock, clerk_client

RETRY = RetryPolicy(attempts=2, backoff_s=0.02, backoff_max_s=0.05, deadline_s=3.0)


def _mirrored(data: dict[str, Any]) -> dict[str, Any]:
    """The user record's values the ``users`` table holds (its external_id is carried, not mirrored)."""
    record = user_record(data)
    return {k: v for k, v in asdict(record).items() if k in record_columns(UserRecord)}


@pytest.fixture
def jit(store: Store, clerk: ClerkClient) -> JitUsers:
    return JitUsers(store, clerk=clerk, timeout_s=2.0)


def deliver(store: Store, event_type: str, data: dict[str, Any], svix_id: str) -> str:
    processor = WebhookProcessor(store, WebhookVerifier([factories.SECRET]))
    headers, body = factories.signed(factories.envelope(event_type, data), svix_id)
    return processor.process(headers, body).status


def clerk_columns(user: AuthUser) -> dict[str, Any]:
    """The columns that come from Clerk (ours, id/created_at/updated_at, may legitimately differ)."""
    return {k: v for k, v in asdict(user).items() if k not in {"id", "created_at", "updated_at"}}


def rows(store: Store) -> int:
    with store.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(users)).scalar_one())


def test_existing_row_costs_one_query_and_no_clerk_call(store: Store, jit: JitUsers, emu: EmulatorServer) -> None:
    data = emu.create_user(email="ada@example.com", first_name="Ada")
    assert deliver(store, "user.created", data, "msg_1") == "applied"
    selects: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append(statement)

    sa.event.listen(store.engine, "before_cursor_execute", count)
    try:
        user = jit.get_auth_user(data["id"])
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", count)
    assert user.first_name == "Ada" and user.email == "ada@example.com"
    assert len(selects) == 1 and "clerk_id" in selects[0]
    assert jit.clerk is not None and jit.clerk.stats.requests == 0


def test_missing_row_is_fetched_and_stored_like_the_webhook_would(store: Store, jit: JitUsers,
                                                                  emu: EmulatorServer) -> None:
    data = emu.create_user(email="ada@example.com", first_name="Ada", public_metadata={"role": "admin"})
    user = jit.get_auth_user(data["id"])
    expected = _mirrored(data)
    assert {k: getattr(user, k) for k in expected} == expected
    assert user.role == "admin" and rows(store) == 1
    assert jit.get_auth_user(data["id"]) == user  # now from the table
    assert jit.clerk is not None and jit.clerk.stats.requests == 1


@pytest.mark.parametrize("webhook_first", [True, False], ids=["webhook-then-jit", "jit-then-webhook"])
def test_sign_up_race_either_order_ends_with_one_identical_row(store: Store, jit: JitUsers, emu: EmulatorServer,
                                                               webhook_first: bool) -> None:
    data = emu.create_user(email="ada@example.com", first_name="Ada")
    if webhook_first:
        assert deliver(store, "user.created", data, "msg_1") == "applied"
        user = jit.get_auth_user(data["id"])
    else:
        user = jit.get_auth_user(data["id"])
        assert deliver(store, "user.created", data, "msg_1") == "skipped"  # same version: a no-op
    assert rows(store) == 1
    assert jit.get_auth_user(data["id"]) == user
    assert clerk_columns(user) == clerk_columns(_reference(data))


def test_sign_up_race_concurrent(store: Store, jit: JitUsers, emu: EmulatorServer) -> None:
    emu.set_faults(latency_s=0.3)  # JIT fetches overlap the webhook's transaction; all reads miss within it
    data = emu.create_user(email="ada@example.com", first_name="Ada")
    barrier = threading.Barrier(11)
    seen: list[AuthUser] = []
    statuses: list[str] = []

    def webhook() -> None:
        barrier.wait()
        statuses.append(deliver(store, "user.created", data, "msg_1"))

    def request() -> None:
        barrier.wait()
        seen.append(jit.get_auth_user(data["id"]))

    threads = [threading.Thread(target=webhook)] + [threading.Thread(target=request) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rows(store) == 1 and len(seen) == 10
    assert statuses[0] in {"applied", "skipped"}
    expected = clerk_columns(_reference(data))
    assert all(clerk_columns(u) == expected for u in seen)
    assert jit.clerk is not None and jit.clerk.stats.requests <= 1


def test_late_older_webhook_does_not_undo_a_newer_jit_fetch(store: Store, jit: JitUsers, emu: EmulatorServer) -> None:
    created = emu.create_user(email="ada@example.com", first_name="Ada")
    renamed = emu.request("PATCH", f"/v1/users/{created['id']}", json={"first_name": "Grace"})
    assert jit.get_auth_user(created["id"]).first_name == "Grace"
    assert deliver(store, "user.created", created, "msg_old") == "skipped"
    assert jit.get_auth_user(created["id"]).first_name == "Grace"
    assert deliver(store, "user.updated", renamed, "msg_new") == "skipped"


def test_single_flight_many_requests_one_clerk_call(store: Store, jit: JitUsers, emu: EmulatorServer) -> None:
    emu.set_faults(latency_s=0.6)  # every thread reads the table and joins the flight within it (CI: 2-core box)
    data = emu.create_user(email="ada@example.com")
    found: list[str] = []
    threads = [threading.Thread(target=lambda: found.append(jit.get_auth_user(data["id"]).clerk_id))
               for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert found == [data["id"]] * 30 and rows(store) == 1
    assert jit.clerk is not None and jit.clerk.stats.requests == 1


@pytest.mark.anyio
async def test_async_single_flight_and_race(store: Store, emu: EmulatorServer) -> None:
    emu.set_faults(latency_s=1.0)  # 50 reads through a 40-thread pool and new connections: all within it
    data = emu.create_user(email="ada@example.com")
    async with AsyncClerkClient(emu.secret_key, api_url=emu.url, retry=RETRY) as aclerk:
        jit = JitUsers(store, aclerk=aclerk, timeout_s=2.0)
        found: list[AuthUser] = []

        async def one() -> None:
            found.append(await jit.aget_auth_user(data["id"]))

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(one)
            tg.start_soon(anyio.to_thread.run_sync, deliver, store, "user.created", data, "msg_1")
        assert len(found) == 50 and {u.clerk_id for u in found} == {data["id"]}
        assert aclerk.stats.requests <= 1 and rows(store) == 1


def test_deleted_and_banned_users_are_refused(store: Store, jit: JitUsers, emu: EmulatorServer) -> None:
    gone = emu.create_user(email="gone@example.com")
    with store.transaction() as writer:
        writer.apply(Tombstone(Entity.USER, gone["id"], int(time.time() * 1000)))
    with pytest.raises(UserDeleted) as deleted:
        jit.get_auth_user(gone["id"])
    assert status_for(deleted.value) == 410
    banned = emu.create_user(email="bad@example.com", banned=True)
    with pytest.raises(UserBanned):
        jit.get_auth_user(banned["id"])
    assert rows(store) == 2  # the banned user is stored all the same
    with pytest.raises(UserDeleted):
        jit.get_auth_user("user_never_existed")



def test_a_user_erased_here_but_live_in_clerk_is_refused_without_a_clerk_call(store: Store, jit: JitUsers,
                                                                             emu: EmulatorServer) -> None:
    """Review finding: once retention hard-deleted an erased user's tombstone (only its digest is left), the
    JIT fetch from Clerk (which still has the user) was refused by the guard, and ``assert user is not
    None`` made every request of that user a 500 and a Clerk call. Now 410 ``UserDeleted``, sync and async,
    before any Clerk request; and the guard's refusal after the read (an erasure in between) is a 410 too."""
    from datetime import timedelta

    from clerk_sync.retention import Retention, RetentionPolicy

    data = emu.create_user(email="erased@example.com")
    assert deliver(store, "user.created", data, "msg_1") == "applied"
    Retention(store).erase_user(data["id"], actor="user_admin", reason="DSR-1")  # erased here, not in Clerk
    policy = RetentionPolicy(clear_tombstones_after=timedelta(days=1), delete_tombstones_after=timedelta(days=2))
    assert Retention(store, policy, now=lambda: datetime.now(UTC) + timedelta(days=3)).prune().erased == 1
    assert rows(store) == 0
    with pytest.raises(UserDeleted) as refused:
        jit.get_auth_user(data["id"])
    assert status_for(refused.value) == 410
    assert jit.clerk is not None and jit.clerk.stats.requests == 0

    async def main() -> None:
        async with AsyncClerkClient(emu.secret_key, api_url=emu.url, retry=RETRY) as aclerk:
            with pytest.raises(UserDeleted):
                await JitUsers(store, aclerk=aclerk, timeout_s=2.0).aget_auth_user(data["id"])
            assert aclerk.stats.requests == 0
    anyio.run(main)

    for _ in range(3):  # POST /sync/me too (it skipped the check: a Clerk call each, never throttled)
        with pytest.raises(UserDeleted):
            jit.refresh_user(data["id"])
    assert jit.clerk.stats.requests == 0 and rows(store) == 0

    async def refresh() -> None:
        async with AsyncClerkClient(emu.secret_key, api_url=emu.url, retry=RETRY) as aclerk:
            with pytest.raises(UserDeleted):
                await JitUsers(store, aclerk=aclerk, timeout_s=2.0).arefresh_user(data["id"])
            assert aclerk.stats.requests == 0
    anyio.run(refresh)


def test_a_user_erased_during_the_fetch_is_refused_for_the_interval(store: Store, emu: EmulatorServer) -> None:
    """The guard's refusal after the read (an erasure while Clerk answered) is a 410, and counts in the
    interval as Clerk's 404 does: the user was never recorded, and every POST /sync/me asked Clerk again."""
    from clerk_sync.store import erased_digest
    from clerk_sync.tables import erased

    clock = FakeClock()
    data = emu.create_user(email="erased@example.com")

    def erase(response: httpx.Response) -> None:  # Clerk answered; the user is erased here meanwhile
        with store.engine.begin() as conn:
            conn.execute(erased.insert().values(digest=erased_digest(Entity.USER, data["id"]), entity="user",
                                                erased_at=datetime.now(UTC)))

    with httpx.Client(event_hooks={"response": [erase]}) as http, clerk_client(emu, http=http) as clerk:
        jit = JitUsers(store, clerk=clerk, timeout_s=2.0, clock=clock)
        with pytest.raises(UserDeleted):
            jit.refresh_user(data["id"])
        assert clerk.stats.requests == 1 and rows(store) == 0
        assert jit._fetched_at[data["id"]] == (clock.t, False)  # 410 within the interval, without a read

    async def main() -> None:
        async def aerase(response: httpx.Response) -> None:
            erase(response)  # (a test's blocking write on the loop)

        with store.engine.begin() as conn:
            conn.execute(erased.delete())
        async with httpx.AsyncClient(event_hooks={"response": [aerase]}) as http, \
                AsyncClerkClient(emu.secret_key, api_url=emu.url, retry=RETRY, http=http) as aclerk:
            ajit = JitUsers(store, aclerk=aclerk, timeout_s=2.0, clock=clock)
            with pytest.raises(UserDeleted):
                await ajit.arefresh_user(data["id"])
            assert aclerk.stats.requests == 1 and ajit._fetched_at[data["id"]] == (clock.t, False)
    anyio.run(main)

def test_clerk_outage_without_a_row_is_a_fast_503(store: Store, emu: EmulatorServer) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=2, reset_s=5.0, clock=clock)
    with clerk_client(emu, breaker=breaker) as clerk:
        jit = JitUsers(store, clerk=clerk, timeout_s=2.0)
        known = emu.create_user(email="known@example.com")
        jit.get_auth_user(known["id"])
        emu.set_faults(outage=True)
        with pytest.raises(ClerkUnavailable) as down:
            jit.get_auth_user("user_unknown")
        assert status_for(down.value) == 503 and down.value.retry_after > 0
        assert breaker.is_open
        sent = clerk.stats.requests
        with pytest.raises(ClerkUnavailable):
            jit.get_auth_user("user_unknown_2")  # circuit open: no request at all
        assert clerk.stats.requests == sent
        assert jit.get_auth_user(known["id"]).clerk_id == known["id"]  # stored users unaffected
        emu.set_faults(outage=False)
        clock.t += 5.0  # the circuit lets a probe through
        late = emu.create_user(email="late@example.com")
        assert jit.get_auth_user(late["id"]).clerk_id == late["id"]
        assert not breaker.is_open


def test_slow_clerk_is_bounded_by_the_timeout(store: Store, emu: EmulatorServer) -> None:
    emu.set_faults(latency_s=2.0)
    with ClerkClient(emu.secret_key, api_url=emu.url, retry=RETRY) as clerk:
        jit = JitUsers(store, clerk=clerk, timeout_s=0.3)
        started = time.monotonic()
        with pytest.raises(ClerkUnavailable):
            jit.get_auth_user("user_slow")
        assert time.monotonic() - started < 1.9  # Clerk answers after 2 s


def test_waiting_for_our_budget_does_not_open_the_breaker(store: Store, emu: EmulatorServer) -> None:
    """Review: 20 sign-ins at once, a budget of 10/s, a 1 s timeout and Clerk answering in 0.8 s. The
    later ones were sent with a few ms left; their timeouts opened the breaker (503 for everyone, blaming
    Clerk). Now they are refused as rate limited, or time out without counting against Clerk."""
    people = [emu.create_user(email=f"u{i}@example.com")["id"] for i in range(20)]
    late = emu.create_user(email="late@example.com")
    emu.set_faults(latency_s=0.8)
    with clerk_client(emu, limit=RateLimit(10, 1.0)) as clerk:  # the default breaker: 5 failures open it
        jit = JitUsers(store, clerk=clerk, timeout_s=1.0)
        start = threading.Barrier(20)
        errors: list[ClerkAPIError] = []

        def sign_in(user_id: str) -> None:
            start.wait(timeout=10)
            try:
                jit.get_auth_user(user_id)
            except ClerkAPIError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=sign_in, args=(u,)) for u in people]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not clerk.breaker.is_open
        assert errors and all(isinstance(e, RateLimited) or "left of the 1s deadline" in str(e) for e in errors)
        emu.set_faults(latency_s=0.0)
        assert jit.get_auth_user(late["id"]).clerk_id == late["id"]


def _reference(data: dict[str, Any]) -> AuthUser:
    """What the row must hold for ``data``: its record plus our defaults."""
    record = _mirrored(data)  # events map deprovisioned now
    now = time.time()
    return AuthUser(id=0, plan="free", created_at=now, updated_at=now, deleted_at=None, **record)  # type: ignore[arg-type]


def test_jit_returns_the_user_it_asked_for(store: Store) -> None:
    """Security review: ``GET /users/user_new`` answered with another user's object (a caching proxy, a
    stand-in ignoring the path) was stored and returned, signing the caller in as that user, role included.
    Refused now as a bad answer from Clerk (502), nothing stored, in both faces."""
    admin = factories.user("user_admin", 5, role="admin")

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=admin)

    refused = re.escape("GET /users/user_new answered user 'user_admin', not the one asked for; refused")
    budget = LocalBudget(RateLimit(1000, 1.0))
    with ClerkClient("sk_test_x", transport=httpx.MockTransport(answer), budget=budget) as clerk:
        with pytest.raises(ClerkAPIError, match=refused) as wrong:
            JitUsers(store, clerk=clerk).get_auth_user("user_new")
        assert status_for(wrong.value) == 502

    async def main() -> None:
        async with AsyncClerkClient("sk_test_x", transport=httpx.MockTransport(answer), budget=budget) as aclerk:
            with pytest.raises(ClerkAPIError, match=refused):
                await JitUsers(store, aclerk=aclerk).aget_auth_user("user_new")

    anyio.run(main)
    assert rows(store) == 0


@pytest.mark.parametrize(("field", "value"), [("updated_at", None), ("updated_at", "yesterday")])
def test_a_user_object_clerk_sync_cannot_read_is_a_bad_answer_from_clerk_not_the_callers(
        store: Store, field: str, value: Any) -> None:
    """Review finding: ``GET /users/{id}`` answering an object the event mapping refuses (no ``updated_at``, a
    proxy or stand-in breaking Clerk's contract) reached the signed-in caller as ``422 event_shape_invalid``, a
    client error naming a webhook field, and was not counted in ``clerk_sync_jit_fetches_total``. It is a bad
    answer from Clerk now (502, what to check), counted as ``error``, nothing stored, in both faces."""
    from clerk_sync.metrics import Metrics

    odd = {**factories.user("user_new", 5), field: value}

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=odd)

    metrics = Metrics()
    refused = rf"GET /users/user_new answered a user object clerk-sync cannot read \(.*{field}.*\); nothing stored"
    budget = LocalBudget(RateLimit(1000, 1.0))
    with ClerkClient("sk_test_x", transport=httpx.MockTransport(answer), budget=budget) as clerk:
        with pytest.raises(ClerkAPIError, match=refused) as bad:
            JitUsers(store, clerk=clerk, metrics=metrics).get_auth_user("user_new")
        assert (status_for(bad.value), bad.value.code) == (502, "clerk_api_error")

    async def main() -> None:
        async with AsyncClerkClient("sk_test_x", transport=httpx.MockTransport(answer), budget=budget) as aclerk:
            with pytest.raises(ClerkAPIError, match=refused):
                await JitUsers(store, aclerk=aclerk, metrics=metrics).aget_auth_user("user_new")

    anyio.run(main)
    assert rows(store) == 0
    assert metrics.registry.get_sample_value("clerk_sync_jit_fetches_total", {"outcome": "error"}) == 2


def test_one_user_refreshing_in_a_loop_costs_one_clerk_call_an_interval(store: Store, emu: EmulatorServer) -> None:
    """Review finding: ``POST /sync/me`` is any signed-in user's to call, and every call was a Clerk request
    from the budget every user and ``reconcile`` share. Now one fetch per user per ``refresh_interval_s``;
    within it the stored row (what webhooks keep fresh), and other users are not held back."""
    clock = FakeClock()
    ada, bob = emu.create_user(email="ada@example.com"), emu.create_user(email="bob@example.com")
    with clerk_client(emu) as clerk:
        jit = JitUsers(store, clerk=clerk, timeout_s=2.0, refresh_interval_s=10.0, clock=clock)
        first = jit.refresh_user(ada["id"])
        emu.request("PATCH", f"/v1/users/{ada['id']}", json={"first_name": "Ada"})
        for _ in range(20):
            assert jit.refresh_user(ada["id"]) == first  # the stored row, no Clerk call
        assert clerk.stats.requests == 1
        assert jit.refresh_user(bob["id"]).email == "bob@example.com"  # another user: fetched at once
        assert clerk.stats.requests == 2
        clock.t += 10.0
        assert jit.refresh_user(ada["id"]).first_name == "Ada"  # the interval over: fetched again
        assert clerk.stats.requests == 3
        with pytest.raises(UserDeleted):
            jit.refresh_user("user_never_existed")
        with pytest.raises(UserDeleted):  # Clerk said 404 a moment ago: 410 again, without asking
            jit.refresh_user("user_never_existed")
        assert clerk.stats.requests == 4
        unthrottled = JitUsers(store, clerk=clerk, timeout_s=2.0, refresh_interval_s=0, clock=clock)
        unthrottled.refresh_user(ada["id"])
        unthrottled.refresh_user(ada["id"])
        assert clerk.stats.requests == 6


@pytest.mark.anyio
async def test_async_refresh_is_throttled_per_user_too(store: Store, emu: EmulatorServer) -> None:
    clock = FakeClock()
    data = emu.create_user(email="ada@example.com")
    async with AsyncClerkClient(emu.secret_key, api_url=emu.url, retry=RETRY) as aclerk:
        jit = JitUsers(store, aclerk=aclerk, timeout_s=2.0, clock=clock)
        first = await jit.arefresh_user(data["id"])
        emu.request("PATCH", f"/v1/users/{data['id']}", json={"first_name": "Ada"})
        assert await jit.arefresh_user(data["id"]) == first and aclerk.stats.requests == 1
        clock.t += jit.refresh_interval_s
        assert (await jit.arefresh_user(data["id"])).first_name == "Ada" and aclerk.stats.requests == 2


def test_a_failed_fetch_does_not_start_the_interval(store: Store, emu: EmulatorServer) -> None:
    """Only a fetch that ended counts: an outage's 503 must not leave the user unsynced for the interval,
    and the users remembered are bounded (the oldest forgotten first)."""
    clock = FakeClock()
    data = emu.create_user(email="ada@example.com")
    with clerk_client(emu) as clerk:
        jit = JitUsers(store, clerk=clerk, timeout_s=2.0, clock=clock)
        emu.set_faults(outage=True)
        with pytest.raises(ClerkAPIError):
            jit.refresh_user(data["id"])
        emu.set_faults(outage=False)
        assert jit.refresh_user(data["id"]).email == "ada@example.com"
        jit.max_tracked_users = 2
        for n in range(3):
            with pytest.raises(UserDeleted):
                jit.refresh_user(f"user_gone_{n}")
        assert list(jit._fetched_at) == ["user_gone_1", "user_gone_2"]
    with pytest.raises(ValueError, match="refresh_interval_s"):
        JitUsers(store, clerk=None, refresh_interval_s=-1)


def test_the_interval_is_a_setting_the_faces_pass_on(tmp_path: Any) -> None:
    from flask import Flask

    from clerk_sync.config import Settings
    from clerk_sync.integrations.flask import ClerkSync

    settings = Settings(DATABASE_URL=f"sqlite:///{tmp_path}/t.db", CLERK_SECRET_KEY="sk_test_x",
                        CLERK_SYNC_JIT_REFRESH_INTERVAL_S="2.5")
    assert settings.jit_refresh_interval_s == 2.5
    with pytest.raises(ValueError, match="CLERK_SYNC_JIT_REFRESH_INTERVAL_S"):
        Settings(CLERK_SYNC_JIT_REFRESH_INTERVAL_S="-1")
    app = Flask(__name__)
    users = ClerkSync(app, settings=settings, webhook_path=None).state(app).users
    assert users is not None and users.refresh_interval_s == 2.5
