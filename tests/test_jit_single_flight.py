"""One Clerk call per new user however many requests ask at once: threads, tasks, both faces in one process.

Clerk is an httpx ``MockTransport`` handler that holds its first answer until the test releases it, and the
fetch's upsert is held at its COMMIT (written, not yet visible), so that requests arrive on purpose in each
moment of a fetch: before Clerk answered, and between the answer and the stored row.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa

from clerk_sync.auth.users import AuthUser, JitUsers
from clerk_sync.clerk_api import AsyncClerkClient, ClerkClient, RetryPolicy
from clerk_sync.clerk_api.ratelimit import LocalBudget, RateLimit
from clerk_sync.errors import ClerkUnavailable
from clerk_sync.store import Store
from tests import factories
from tests.test_jit import rows

WAIT = 30.0  # a bound on a broken run, not a race: every wait below ends when what it waits for happens


class HeldClerk:
    """Clerk's ``GET /users/{id}`` for both faces: counts the calls per user, and holds the first one for
    ``held`` (answered ``status``) until ``release`` is set."""

    def __init__(self, users: list[dict[str, Any]], held: str, status: int = 200) -> None:
        self.users = {u["id"]: u for u in users}
        self.held = held
        self.status = status
        self.calls: Counter[str] = Counter()
        self.asked = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()

    def _arrived(self, request: httpx.Request) -> tuple[str, bool]:
        user_id = request.url.path.rsplit("/", 1)[-1]
        with self._lock:
            self.calls[user_id] += 1
            first = user_id == self.held and self.calls[user_id] == 1
        if first:
            self.asked.set()
        return user_id, first

    def _answer(self, user_id: str, first: bool) -> httpx.Response:
        if first and self.status != 200:
            return httpx.Response(self.status, json={"errors": [{"code": "unavailable", "message": "down"}]})
        return httpx.Response(200, json=self.users[user_id])

    def answer(self, request: httpx.Request) -> httpx.Response:
        user_id, first = self._arrived(request)
        if first:
            self.release.wait(WAIT)
        return self._answer(user_id, first)

    async def aanswer(self, request: httpx.Request) -> httpx.Response:
        user_id, first = self._arrived(request)
        if first:
            await anyio.to_thread.run_sync(self.release.wait, WAIT)
        return self._answer(user_id, first)


class HeldStore:
    """Watches ``engine``: counts the reads of ``users``, and once ``armed`` holds the first COMMIT (the
    fetch's upsert, written but not visible to other requests) until ``release`` is set."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.reads = 0
        self.armed = False
        self.writing = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        sa.event.listen(engine, "before_cursor_execute", self._statement)
        sa.event.listen(engine, "commit", self._commit)

    def _statement(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().startswith("SELECT users.id"):
            with self._lock:
                self.reads += 1

    def _commit(self, conn: Any) -> None:
        with self._lock:
            hold = self.armed and not self.writing.is_set()
            if hold:
                self.writing.set()
        if hold:
            self.release.wait(WAIT)

    def close(self) -> None:
        """Once every request is over (removing a listener while it runs is an error of its own)."""
        sa.event.remove(self.engine, "before_cursor_execute", self._statement)
        sa.event.remove(self.engine, "commit", self._commit)


@pytest.fixture
def held(store: Store) -> Iterator[HeldStore]:
    watcher = HeldStore(store.engine)
    yield watcher
    watcher.release.set()
    watcher.close()


def sharing(jit: JitUsers, user_id: str) -> int:
    """How many requests wait for (or lead) the user's fetch under way."""
    fetch = getattr(jit, "_fetches", {}).get(user_id)
    return 0 if fetch is None else int(fetch.callers)


def until(condition: Callable[[], object], *alive: threading.Thread) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert all(t.is_alive() for t in alive) and time.monotonic() < deadline, "never got there"
        time.sleep(0.01)


async def auntil(condition: Callable[[], object]) -> None:
    with anyio.fail_after(WAIT):
        while not condition():
            await anyio.sleep(0.01)


def started(target: Callable[[], None], n: int) -> list[threading.Thread]:
    threads = [threading.Thread(target=target) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def budget() -> LocalBudget:
    return LocalBudget(RateLimit(1000, 1.0))


def test_requests_between_clerks_answer_and_the_stored_row_share_the_fetch(store: Store, held: HeldStore) -> None:
    """Review finding: 20 concurrent first requests for one new user made 3 Clerk calls, not one. The shared
    request ended at Clerk's answer and the fetch was recorded after the upsert: a request in between found
    neither the fetch nor its outcome, and asked Clerk again. Now a fetch ends once its outcome is recorded;
    another user's fetch is not held up meanwhile."""
    new, other = factories.user("user_new", 5), factories.user("user_other", 5)
    clerk = HeldClerk([new, other], held="user_new")
    seen: list[AuthUser] = []
    with ClerkClient("sk_test_x", transport=httpx.MockTransport(clerk.answer), budget=budget()) as client:
        jit = JitUsers(store, clerk=client, timeout_s=WAIT)

        def ask() -> None:
            seen.append(jit.get_auth_user("user_new"))

        first = started(ask, 10)
        assert clerk.asked.wait(WAIT)
        until(lambda: held.reads >= 10, *first)  # every first request found no row: all wait for Clerk
        assert jit.get_auth_user("user_other").clerk_id == "user_other"  # not held up by user_new's fetch
        held.armed = True
        clerk.release.set()
        assert held.writing.wait(WAIT)  # Clerk answered; the row is written, not yet committed
        gap = started(ask, 10)
        until(lambda: clerk.calls["user_new"] > 1 or sharing(jit, "user_new") == 20, *first, *gap)
        held.release.set()
        for t in first + gap:
            t.join(WAIT)
    assert clerk.calls == {"user_new": 1, "user_other": 1}
    assert len(seen) == 20 and {u.clerk_id for u in seen} == {"user_new"} and rows(store) == 2
    assert len({id(u.public_metadata) for u in seen}) == 20  # each its own copy


@pytest.mark.anyio
async def test_async_requests_between_clerks_answer_and_the_stored_row_share_the_fetch(
        store: Store, held: HeldStore) -> None:
    new, other = factories.user("user_new", 5), factories.user("user_other", 5)
    clerk = HeldClerk([new, other], held="user_new")
    seen: list[AuthUser] = []
    transport = httpx.MockTransport(clerk.aanswer)
    async with AsyncClerkClient("sk_test_x", transport=transport, budget=budget()) as aclient:
        jit = JitUsers(store, aclerk=aclient, timeout_s=WAIT)

        async def ask() -> None:
            seen.append(await jit.aget_auth_user("user_new"))

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(ask)
            assert await anyio.to_thread.run_sync(clerk.asked.wait, WAIT)
            await auntil(lambda: held.reads >= 10)
            assert (await jit.aget_auth_user("user_other")).clerk_id == "user_other"
            held.armed = True
            clerk.release.set()
            assert await anyio.to_thread.run_sync(held.writing.wait, WAIT)
            for _ in range(10):
                tg.start_soon(ask)
            await auntil(lambda: clerk.calls["user_new"] > 1 or sharing(jit, "user_new") == 20)
            held.release.set()
    assert clerk.calls == {"user_new": 1, "user_other": 1}
    assert len(seen) == 20 and {u.clerk_id for u in seen} == {"user_new"} and rows(store) == 2


@pytest.mark.anyio
@pytest.mark.parametrize("leader", ["thread", "task"])
async def test_threads_and_tasks_of_one_process_share_one_fetch(store: Store, held: HeldStore, leader: str) -> None:
    """The blocking and the async face have a Clerk client each, so each client's own single-flight made a
    call of its own; the fetch is shared across both faces now, whichever leads it."""
    clerk = HeldClerk([factories.user("user_new", 5)], held="user_new")
    seen: list[AuthUser] = []
    with ClerkClient("sk_test_x", transport=httpx.MockTransport(clerk.answer), budget=budget()) as client:
        transport = httpx.MockTransport(clerk.aanswer)
        async with AsyncClerkClient("sk_test_x", transport=transport, budget=budget()) as aclient:
            jit = JitUsers(store, clerk=client, aclerk=aclient, timeout_s=WAIT)

            def ask() -> None:
                seen.append(jit.get_auth_user("user_new"))

            async def aask() -> None:
                seen.append(await jit.aget_auth_user("user_new"))

            threads: list[threading.Thread] = []
            async with anyio.create_task_group() as tg:
                if leader == "thread":
                    threads += started(ask, 1)
                else:
                    tg.start_soon(aask)
                assert await anyio.to_thread.run_sync(clerk.asked.wait, WAIT)
                threads += started(ask, 5)
                for _ in range(5):
                    tg.start_soon(aask)
                await auntil(lambda: held.reads >= 11)
                held.armed = True
                clerk.release.set()
                assert await anyio.to_thread.run_sync(held.writing.wait, WAIT)
                threads += started(ask, 5)
                for _ in range(5):
                    tg.start_soon(aask)
                await auntil(lambda: clerk.calls["user_new"] > 1 or sharing(jit, "user_new") == 21)
                held.release.set()
                for t in threads:
                    await anyio.to_thread.run_sync(t.join, WAIT)
    assert clerk.calls == {"user_new": 1}
    assert len(seen) == 21 and {u.clerk_id for u in seen} == {"user_new"} and rows(store) == 1


def test_a_failed_fetch_is_shared_and_not_remembered(store: Store) -> None:
    """The requests waiting for a fetch that failed get its error (503), not a fetch each; the failure is
    not remembered as a fetch: the next request asks Clerk again."""
    clerk = HeldClerk([factories.user("user_new", 5)], held="user_new", status=503)
    errors: list[BaseException] = []
    once = RetryPolicy(attempts=1, deadline_s=WAIT)
    with ClerkClient("sk_test_x", transport=httpx.MockTransport(clerk.answer), budget=budget(), retry=once) as client:
        jit = JitUsers(store, clerk=client, timeout_s=WAIT)

        def ask() -> None:
            try:
                jit.get_auth_user("user_new")
            except ClerkUnavailable as exc:
                errors.append(exc)

        first = started(ask, 5)
        assert clerk.asked.wait(WAIT)
        until(lambda: sharing(jit, "user_new") == 5, *first)
        clerk.release.set()
        for t in first:
            t.join(WAIT)
        assert len(errors) == 5 and clerk.calls["user_new"] == 1
        assert jit.get_auth_user("user_new").clerk_id == "user_new" and clerk.calls["user_new"] == 2


def test_a_request_waits_for_the_fetch_under_way_no_longer_than_its_timeout(store: Store) -> None:
    """``timeout_s`` (and a second for the upsert) bounds the wait for another request's fetch too: 503."""
    clerk = HeldClerk([factories.user("user_new", 5)], held="user_new")
    with ClerkClient("sk_test_x", transport=httpx.MockTransport(clerk.answer), budget=budget()) as client:
        jit = JitUsers(store, clerk=client, timeout_s=0.1)
        leader: list[BaseException] = []

        def ask() -> None:
            try:
                jit.get_auth_user("user_new")
            except ClerkUnavailable as exc:  # (the answer came after the leader's own deadline)
                leader.append(exc)

        lead = started(ask, 1)
        assert clerk.asked.wait(WAIT)
        until(lambda: sharing(jit, "user_new") == 1, *lead)
        try:
            with pytest.raises(ClerkUnavailable, match=re.escape("waited 1.1s for user user_new's fetch from Clerk "
                                                                 "(another request's, still under way)")) as waited:
                jit.get_auth_user("user_new")
        finally:
            clerk.release.set()
            lead[0].join(WAIT)
    assert waited.value.retry_after == 1.0 and clerk.calls["user_new"] == 1


@pytest.mark.anyio
async def test_a_leader_cancelled_mid_fetch_hands_it_to_a_waiting_request(store: Store) -> None:
    """A request given up while it led the fetch (its client went away) ends it unfinished; one of the requests
    waiting for it fetches instead, and the others share that one."""
    clerk = HeldClerk([factories.user("user_new", 5)], held="user_new")
    seen: list[AuthUser] = []
    scopes: list[anyio.CancelScope] = []
    async with AsyncClerkClient("sk_test_x", transport=httpx.MockTransport(clerk.aanswer), budget=budget()) as aclient:
        jit = JitUsers(store, aclerk=aclient, timeout_s=WAIT)

        async def lead() -> None:
            with anyio.CancelScope() as scope:
                scopes.append(scope)
                await jit.aget_auth_user("user_new")

        async def ask() -> None:
            seen.append(await jit.aget_auth_user("user_new"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(lead)
            assert await anyio.to_thread.run_sync(clerk.asked.wait, WAIT)
            for _ in range(5):
                tg.start_soon(ask)
            await auntil(lambda: sharing(jit, "user_new") == 6)
            scopes[0].cancel()
            clerk.release.set()
    assert scopes[0].cancelled_caught and len(seen) == 5 and {u.clerk_id for u in seen} == {"user_new"}
    assert clerk.calls["user_new"] == 2 and rows(store) == 1


@pytest.mark.anyio
async def test_a_blocking_call_on_the_loop_leading_the_fetch_does_not_wait_for_it(store: Store) -> None:
    """The blocking face called in a task (holding its event loop up) cannot wait for a fetch that loop leads:
    it fetches alone, at once, rather than hold the loop up until its timeout and answer 503."""
    clerk = HeldClerk([factories.user("user_new", 5)], held="user_new")
    with ClerkClient("sk_test_x", transport=httpx.MockTransport(clerk.answer), budget=budget()) as client:
        transport = httpx.MockTransport(clerk.aanswer)
        async with AsyncClerkClient("sk_test_x", transport=transport, budget=budget()) as aclient:
            jit = JitUsers(store, clerk=client, aclerk=aclient, timeout_s=WAIT)
            async with anyio.create_task_group() as tg:
                tg.start_soon(jit.aget_auth_user, "user_new")
                assert await anyio.to_thread.run_sync(clerk.asked.wait, WAIT)
                assert jit.get_auth_user("user_new").clerk_id == "user_new"  # (blocking, on the loop)
                clerk.release.set()
    assert clerk.calls["user_new"] == 2 and rows(store) == 1


@pytest.mark.anyio
async def test_blocking_requests_waiting_in_anyios_threads_leave_the_async_leader_a_thread(store: Store) -> None:
    """Final review: blocking requests waiting for an async request's fetch (a sync route, run in anyio's worker
    threads) could hold every thread of anyio's default pool, and the leader's upsert, queued for one of those,
    waited until they gave up: 503s for all, Clerk having answered at once. Its database work has threads of its
    own now. (The pool is cut to 4 tokens here, standing for the 40 of a busy app.)"""
    clerk = HeldClerk([factories.user("user_new", 5)], held="user_new")
    anyio.to_thread.current_default_thread_limiter().total_tokens = 4
    results: dict[str, str] = {}
    with ClerkClient("sk_test_x", transport=httpx.MockTransport(clerk.answer), budget=budget()) as client:
        transport = httpx.MockTransport(clerk.aanswer)
        async with AsyncClerkClient("sk_test_x", transport=transport, budget=budget()) as aclient:
            jit = JitUsers(store, clerk=client, aclerk=aclient, timeout_s=WAIT)

            async def lead() -> None:
                results["leader"] = (await jit.aget_auth_user("user_new")).clerk_id

            async def follow(i: int) -> None:
                results[f"follower {i}"] = (await anyio.to_thread.run_sync(jit.get_auth_user, "user_new")).clerk_id

            async with anyio.create_task_group() as tg:
                tg.start_soon(lead)
                assert await anyio.to_thread.run_sync(clerk.asked.wait, WAIT)  # (a thread, given back)
                for i in range(4):  # three, and the held Clerk answer's: every token; the fourth queued for one
                    tg.start_soon(follow, i)
                pool = anyio.to_thread.current_default_thread_limiter()
                await auntil(lambda: sharing(jit, "user_new") == 4 and pool.statistics().tasks_waiting == 1)
                clerk.release.set()  # the answer's token goes to the queued follower, first in line
    assert results == {"leader": "user_new", **{f"follower {i}": "user_new" for i in range(4)}}
    assert clerk.calls["user_new"] == 1 and rows(store) == 1
