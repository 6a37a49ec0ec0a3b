"""The forwarding sinks, against real receivers: a Starlette app verifying Standard Webhooks
signatures on loopback, and the local Redis server's streams."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
import sqlalchemy as sa
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from clerk_sync.changes import Change, Hook
from clerk_sync.engine import Entity
from clerk_sync.errors import ConfigError
from clerk_sync.hooks import Backoff, Dispatcher
from clerk_sync.hooks.sinks import RedisStreamSink, StandardWebhookSink
from clerk_sync.store import Store
from clerk_sync.tables import hook_jobs, users
from tests import factories as f
from tests._server import running
from tests.test_hooks import B, deliver

REDIS_URL = os.environ.get("CLERK_SYNC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
FORWARD_SECRET = "whsec_" + "c2VjcmV0LWZvci10aGUtYXBwLXRoYXQtcmVjZWl2ZXM="


def receiver(store: Store, received: list[dict[str, Any]], answers: list[int]) -> Starlette:
    """The app's own endpoint: verifies the signature and checks the row is already in the database."""

    async def endpoint(request: Request) -> Response:
        body = await request.body()
        try:
            message = Webhook(FORWARD_SECRET).verify(body, dict(request.headers))
        except WebhookVerificationError:
            return Response(status_code=400)
        with store.connect() as conn:
            role = conn.execute(sa.select(users.c.role).where(users.c.clerk_id == message["data"]["clerk_id"])).scalar()
        received.append(message | {"db_role": role, "webhook_id": request.headers["webhook-id"]})
        return Response(status_code=answers.pop(0) if answers else 204)

    return Starlette(routes=[Route("/clerk-changes", endpoint, methods=["POST"])])


def test_standard_webhooks_sink_posts_signed_changes_after_commit(store: Store) -> None:
    received: list[dict[str, Any]] = []
    answers = [500]  # the app is down once: the dispatcher retries
    with running(receiver(store, received, answers)) as url:
        sink = StandardWebhookSink(f"{url}/clerk-changes", FORWARD_SECRET)
        hooked = Store(store.engine, hooks=[Hook("forward", sink, on=["user.*"])])
        deliver(hooked, f.envelope("user.created", f.user("user_1", B + 1000, role="admin")))
        dispatcher = Dispatcher(hooked, backoff=Backoff(base_s=0))
        dispatcher.drain()
        sink.close()
    assert len(received) == 2  # the refused attempt, then the accepted one
    message = received[-1]
    assert (message["type"], message["db_role"], message["webhook_id"]) == (
        "user.created", "admin", f"user.created:user_1:{B + 1000}")
    assert message["data"]["values"]["email"] == "user_1@example.com"
    with store.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(hook_jobs)).scalar() == 0


@pytest.mark.parametrize(("status", "header"), [(410, None), (400, "disable"), (503, "abort-message")])
def test_a_receiver_that_is_gone_leaves_the_job_dead_at_once(store: Store, status: int, header: str | None) -> None:
    """Review finding: a 410 Gone (Standard Webhooks: stop sending) was retried like a 500, ten times over
    about four hours. 410, and Svix's ``webhook-delivery: disable`` / ``abort-message``, leave the job dead
    at once with an error that says what to do (a plain 500 is still retried: the test above)."""
    posts: list[str] = []

    async def endpoint(request: Request) -> Response:
        posts.append(request.headers["webhook-id"])
        return Response(status_code=status, headers={"webhook-delivery": header} if header else None)

    with running(Starlette(routes=[Route("/gone", endpoint, methods=["POST"])])) as url:
        sink = StandardWebhookSink(f"{url}/gone", FORWARD_SECRET)
        hooked = Store(store.engine, hooks=[Hook("forward", sink, on=["user.*"])])
        deliver(hooked, f.envelope("user.created", f.user("user_1", B + 1000)))
        Dispatcher(hooked, backoff=Backoff(base_s=0)).drain()
        sink.close()
    with store.connect() as conn:
        (job,) = conn.execute(sa.select(hook_jobs.c.status, hook_jobs.c.attempts, hook_jobs.c.last_error)).all()
    assert (job.status, job.attempts, len(posts)) == ("dead", 1, 1)
    assert job.last_error.startswith(f"HookGaveUp: {url}/gone answered {status}")
    assert "clerk-sync hooks retry" in job.last_error


@pytest.mark.parametrize("header", ["disable", "abort-message"])
def test_a_success_with_a_delivery_control_header_is_delivered(store: Store, header: str) -> None:
    """What the docs say (README, FORWARDING.md, RUNBOOK): ``webhook-delivery`` gives up on a change only
    on a non-2xx answer; a 2xx has the change kept, so its job is done, not dead."""
    async def endpoint(request: Request) -> Response:
        return Response(status_code=200, headers={"webhook-delivery": header})

    with running(Starlette(routes=[Route("/in", endpoint, methods=["POST"])])) as url:
        sink = StandardWebhookSink(f"{url}/in", FORWARD_SECRET)
        hooked = Store(store.engine, hooks=[Hook("forward", sink, on=["user.*"])])
        deliver(hooked, f.envelope("user.created", f.user("user_1", B + 1000)))
        assert Dispatcher(hooked, backoff=Backoff(base_s=0)).drain() == 1
        sink.close()
    with store.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(hook_jobs)).scalar() == 0


def test_a_wrong_signature_is_refused_by_the_receiver(store: Store) -> None:
    received: list[dict[str, Any]] = []
    with running(receiver(store, received, [])) as url:
        sink = StandardWebhookSink(f"{url}/clerk-changes", "whsec_" + "b3RoZXItc2VjcmV0LW5vdC10aGUtcmlnaHQtb25l")
        with pytest.raises(RuntimeError, match="answered 400"):
            sink(Change.from_json({"entity": "users", "clerk_id": "user_1", "kind": "created", "version": 1,
                                   "values": {}}))
        sink.close()
    assert received == []


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        if os.environ.get("CLERK_SYNC_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"Redis required but unreachable at {REDIS_URL}: {exc}")
        pytest.skip(f"Redis unreachable: {exc}")
    yield client
    client.close()


@pytest.mark.parametrize("make", [lambda: redis.asyncio.Redis.from_url(REDIS_URL),
                                  lambda: redis.asyncio.RedisCluster(host="127.0.0.1", port=6379)],
                         ids=["Redis", "RedisCluster"])
def test_redis_stream_sink_refuses_an_asyncio_client(make: Any) -> None:
    """Fixed: given a ``redis.asyncio`` client, ``xadd`` returned a coroutine that was never awaited: the
    job was finished and the change lost. The sink refuses it when built, saying what to pass."""
    with pytest.raises(ConfigError, match=r"needs a synchronous Redis client, not redis\.asyncio\..*"
                                          r"pass redis\.Redis\.from_url\(url\)"):
        RedisStreamSink(make(), "clerk-sync-test:never")


def test_redis_stream_sink_appends_each_change(store: Store, redis_client: redis.Redis) -> None:
    stream = f"clerk-sync-test:{uuid.uuid4().hex}"
    hooked = Store(store.engine, hooks=[Hook("stream", RedisStreamSink(redis_client, stream, maxlen=1000))])
    deliver(hooked, f.envelope("user.created", f.user("user_1", B + 1000)),
            f.envelope("user.updated", f.user("user_1", B + 2000, role="admin")),
            f.envelope("user.updated", f.user("user_1", B + 2000, role="admin")))  # stale: not forwarded
    Dispatcher(hooked).drain()
    try:
        entries = redis_client.xrange(stream)
        assert [e[b"type"] for _, e in entries] == [b"user.created", b"user.updated"]
        change = json.loads(entries[1][1][b"change"])
        assert (change["idempotency_key"], change["data"]["previous"]["role"]) == (
            f"user.updated:user_1:{B + 2000}", "user")
    finally:
        redis_client.delete(stream)


@pytest.mark.parametrize("status", [200, 500])
def test_a_receiver_dripping_its_answer_does_not_hold_the_sink(status: int) -> None:
    """Review finding: ``timeout_s`` bounded each read only, and the sink read the whole body, so a
    receiver that answered and then sent a byte every half second held the hook (and ``serve``'s dispatcher
    thread) as long as it liked. A success's body is not read at all; an error's is read until
    ``timeout_s`` at most, for the job's last error. The receiver drips for 12 s; the sink waits 3 s (1 s
    failed once in CI: under a loaded box the answer's head came later than that)."""
    import asyncio
    import threading

    from starlette.responses import StreamingResponse

    finished = threading.Event()

    async def drip() -> Any:
        for n in range(24):
            yield f"{n % 10}".encode()
            await asyncio.sleep(0.5)
        finished.set()

    async def endpoint(request: Request) -> Response:
        return StreamingResponse(drip(), status_code=status)

    with running(Starlette(routes=[Route("/slow", endpoint, methods=["POST"])])) as url:
        sink = StandardWebhookSink(f"{url}/slow", FORWARD_SECRET, timeout_s=3.0)
        change = Change(Entity.USER, "user_1", "created", B, {"id": "user_1"})
        if status == 200:
            sink(change)
        else:
            with pytest.raises(RuntimeError, match=r"/slow answered 500: 0\d*$"):
                sink(change)
        assert not finished.is_set()  # returned while the receiver was still dripping
        sink.close()


def test_the_sink_keeps_its_connection_across_deliveries() -> None:
    """Review finding (of the fix above): returning on a success without reading its body closed the
    connection, so every delivery opened a new TCP (and TLS) connection. A short body is read to its end."""
    ports: list[int] = []

    async def endpoint(request: Request) -> Response:
        client = request.client
        assert client is not None
        ports.append(client.port)
        return Response("ok, thanks", status_code=200)

    with running(Starlette(routes=[Route("/keep", endpoint, methods=["POST"])])) as url:
        sink = StandardWebhookSink(f"{url}/keep", FORWARD_SECRET)
        for version in range(5):
            sink(Change(Entity.USER, "user_1", "created", B + version, {"id": "user_1"}))
        sink.close()
    assert len(ports) == 5 and len(set(ports)) == 1, ports
