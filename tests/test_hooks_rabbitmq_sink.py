"""RabbitMQSink against the local RabbitMQ broker: what a consumer's queue receives, a change no queue is
bound for (kept and retried, never dropped), a connection the broker cut while idle, a broker that is down
or refuses, and an exchange that is missing or of another kind. The store-backed tests run on SQLite,
PostgreSQL and MariaDB (the ``db_url`` fixture)."""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest

from clerk_sync.changes import Change, Hook
from clerk_sync.engine import Entity
from clerk_sync.errors import ConfigError
from clerk_sync.hooks import Dispatcher
from clerk_sync.hooks.sinks import RabbitMQSink, change_message
from tests import factories as f
from tests._proxy import TcpProxy
from tests.test_hooks import B, Clock, deliver, hooked, jobs

AMQP_URL = os.environ.get("CLERK_SYNC_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def _broker_problem() -> str | None:
    try:
        pika.BlockingConnection(pika.URLParameters(AMQP_URL)).close()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


@pytest.fixture(scope="module")
def admin() -> Iterator[Any]:
    """A channel of the test's own, to declare, bind and read what the sink published."""
    problem = _broker_problem()
    if problem is not None:
        if os.environ.get("CLERK_SYNC_REQUIRE_RABBITMQ") == "1":
            pytest.fail(f"RabbitMQ required but unreachable at {AMQP_URL}: {problem}")
        pytest.skip(f"RabbitMQ unreachable: {problem}")
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    yield connection.channel()
    connection.close()


@pytest.fixture
def exchange(admin: Any) -> Iterator[str]:
    name = f"clerk-sync-test-{uuid.uuid4().hex[:12]}"
    yield name
    admin.exchange_delete(name)


def _queue(admin: Any, exchange: str, pattern: str = "#") -> str:
    """A queue of the test's, bound to ``exchange`` (declared here if the sink has not yet)."""
    admin.exchange_declare(exchange, exchange_type="topic", durable=True)
    queue = admin.queue_declare("", exclusive=True).method.queue
    admin.queue_bind(queue, exchange, routing_key=pattern)
    return str(queue)


def _read(admin: Any, queue: str) -> list[tuple[Any, Any, bytes]]:
    got = []
    while True:
        method, properties, body = admin.basic_get(queue, auto_ack=True)
        if method is None:
            return got
        got.append((method, properties, body))


def _change(clerk_id: str = "user_1", version: int = B + 1000, kind: str = "created") -> Change:
    return Change(Entity.USER, clerk_id, kind, version, {"clerk_id": clerk_id, "email": f"{clerk_id}@example.com"})


def test_each_applied_change_reaches_a_bound_queue_once_in_order(db_url: str, admin: Any, exchange: str) -> None:
    queue = _queue(admin, exchange, "user.*")
    sink = RabbitMQSink(AMQP_URL, exchange, now=lambda: 1_800_000_000.5)
    store = hooked(db_url, Hook("amqp", sink))
    try:
        deliver(store, f.envelope("user.created", f.user("user_1", B + 1000)),
                f.envelope("user.updated", f.user("user_1", B + 2000, role="admin")),
                f.envelope("user.updated", f.user("user_1", B + 2000, role="admin")))  # stale: nothing published
        assert Dispatcher(store, heartbeat_s=0).drain() == 2
        got = _read(admin, queue)
    finally:
        sink.close()
        store.dispose()
    assert [(m.routing_key, p.message_id, p.type) for m, p, _ in got] == [
        ("user.created", f"user.created:user_1:{B + 1000}", "user.created"),
        ("user.updated", f"user.updated:user_1:{B + 2000}", "user.updated")]
    for _, properties, body in got:
        assert (properties.delivery_mode, properties.content_type, properties.app_id, properties.timestamp) == (
            2, "application/json", "clerk-sync", 1_800_000_000)
        message = json.loads(body)
        assert message["idempotency_key"] == properties.message_id
    updated = json.loads(got[1][2])
    assert (updated["data"]["values"]["role"], updated["data"]["previous"]["role"]) == ("admin", "user")
    assert jobs(store) == []  # both done (a finished job leaves the outbox)


def test_a_change_no_queue_is_bound_for_is_kept_and_delivered_once_one_is(db_url: str, admin: Any,
                                                                           exchange: str) -> None:
    """``mandatory``: the broker returns a message it routes nowhere. Without it the job would be done and
    the change gone; with it the job fails, is retried, and arrives once a consumer has bound its queue."""
    clock = Clock()
    sink = RabbitMQSink(AMQP_URL, exchange)
    store = hooked(db_url, Hook("amqp", sink), now=clock)
    try:
        deliver(store, f.envelope("user.created", f.user("user_1", B + 1000)))
        assert Dispatcher(store, now=clock, heartbeat_s=0).run_once() == 1
        (job,) = jobs(store)
        assert (job["status"], job["attempts"]) == ("pending", 1)
        assert "routed no queue" in job["last_error"] and exchange in job["last_error"]
        assert "bind a queue" in job["last_error"]
        queue = _queue(admin, exchange)
        clock.advance(3600)
        assert Dispatcher(store, now=clock, heartbeat_s=0).run_once() == 1
        got = _read(admin, queue)
    finally:
        sink.close()
        store.dispose()
    assert [p.message_id for _, p, _ in got] == [f"user.created:user_1:{B + 1000}"]
    assert jobs(store) == []


def test_a_connection_cut_while_idle_is_opened_again_before_the_next_publish(admin: Any, exchange: str) -> None:
    queue = _queue(admin, exchange)
    params = pika.URLParameters(AMQP_URL)
    proxy = TcpProxy((params.host, params.port))
    sink = RabbitMQSink(f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F", exchange)
    try:
        sink(_change("user_1"))
        proxy.cut()
        sink(_change("user_2"))  # not a failure: the cut was noticed before publishing, and a new connection made
        assert proxy.accepted == 2
        sink(_change("user_3"))  # and kept
        assert proxy.accepted == 2
    finally:
        sink.close()
        proxy.close()
    assert [json.loads(b)["data"]["clerk_id"] for _, _, b in _read(admin, queue)] == ["user_1", "user_2", "user_3"]


def _closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])


def test_a_broker_down_is_a_retried_failure_naming_the_broker_not_the_password(db_url: str) -> None:
    port = _closed_port()
    clock = Clock()
    sink = RabbitMQSink(f"amqp://app:hunter2-secret@127.0.0.1:{port}/billing", "changes", timeout_s=2)
    store = hooked(db_url, Hook("amqp", sink), now=clock)
    try:
        deliver(store, f.envelope("user.created", f.user("user_1", B + 1000)))
        assert Dispatcher(store, now=clock, heartbeat_s=0).run_once() == 1
        (job,) = jobs(store)
    finally:
        store.dispose()
    assert (job["status"], job["attempts"]) == ("pending", 1)
    assert f"amqp://127.0.0.1:{port}/billing" in job["last_error"] and "retried" in job["last_error"]
    assert "Connection refused" in job["last_error"]  # why, not an empty reason
    assert "hunter2" not in job["last_error"]


def test_a_refused_login_says_so_without_the_password(admin: Any) -> None:
    params = pika.URLParameters(AMQP_URL)
    sink = RabbitMQSink(f"amqp://guest:wrong-hunter2@{params.host}:{params.port}/%2F", "changes")
    with pytest.raises(ConnectionError) as caught:
        sink(_change())
    assert "ACCESS_REFUSED" in str(caught.value) and "hunter2" not in str(caught.value)


def test_a_missing_exchange_says_how_to_fix_it_and_the_sink_recovers_once_it_exists(admin: Any,
                                                                                     exchange: str) -> None:
    sink = RabbitMQSink(AMQP_URL, exchange, declare=False)
    try:
        with pytest.raises(RuntimeError) as caught:
            sink(_change("user_1"))
        assert "404" in str(caught.value) and "does not exist" in str(caught.value)
        queue = _queue(admin, exchange)  # the operator creates it (and binds a queue)
        sink(_change("user_2"))  # the same sink: a new channel, no restart
    finally:
        sink.close()
    assert [json.loads(b)["data"]["clerk_id"] for _, _, b in _read(admin, queue)] == ["user_2"]


def test_an_exchange_of_another_type_is_refused_with_a_hint(admin: Any, exchange: str) -> None:
    admin.exchange_declare(exchange, exchange_type="fanout", durable=True)
    sink = RabbitMQSink(AMQP_URL, exchange)
    try:
        with pytest.raises(RuntimeError) as caught:
            sink(_change())
    finally:
        sink.close()
    assert "406" in str(caught.value) and "declare=False" in str(caught.value)


def test_a_custom_routing_key_and_an_existing_fanout_exchange(admin: Any, exchange: str) -> None:
    admin.exchange_declare(exchange, exchange_type="fanout", durable=True)
    queue = admin.queue_declare("", exclusive=True).method.queue
    admin.queue_bind(queue, exchange)
    sink = RabbitMQSink(AMQP_URL, exchange, declare=False, routing_key=lambda c: f"clerk.{c.entity.value}.{c.kind}")
    try:
        sink(_change())
    finally:
        sink.close()
    ((method, _, body),) = _read(admin, queue)
    assert (method.routing_key, json.loads(body)) == ("clerk.users.created", change_message(_change()))


@pytest.mark.parametrize("url", ["http://127.0.0.1:5672/", "amqp://guest:guest@127.0.0.1:5672/%2F?heartbeat=soon"])
def test_a_url_pika_cannot_read_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="not an AMQP URL"):
        RabbitMQSink(url)


@pytest.mark.parametrize("timeout_s", [0, -1, float("nan"), float("inf"), None, 1e12])
def test_timeout_must_be_a_finite_positive_number(timeout_s: float) -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        RabbitMQSink(AMQP_URL, timeout_s=timeout_s)
