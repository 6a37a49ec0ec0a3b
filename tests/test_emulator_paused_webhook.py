"""The emulator's pause, ``set_webhook_url(None)``: "the webhook is late" (adopter walkthrough, session 2026-12-05).

Messages created while paused were logged ``no_endpoint`` and never sent once the URL came back, and
``wait_for_deliveries()`` said nothing: a ban made in the pause never reached the app. The README promises a
pause: the messages are held, then delivered in order (their own ``svix-id``, signed when sent) at the next
``set_webhook_url``; ``reset()`` drops them; the wait raises while they are held with no URL.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from clerk_sync import migrations
from clerk_sync.auth.users import read_user
from clerk_sync.config import Settings
from clerk_sync.integrations.starlette import build_processor, create_app
from clerk_sync.store import create_engine
from clerk_sync.testing import EmulatorServer, serve_app
from clerk_sync.webhooks import WebhookVerifier
from tests.emulator.support import Received, Receiver, served_receiver

#: The three ways to set the webhook URL: the test helper, the admin endpoint by hand, the in-process emulator.
WAYS = ["helper", "http", "in_process"]


def _setter(clerk: EmulatorServer, way: str) -> Callable[[str | None], None]:
    if way == "helper":
        return clerk.set_webhook_url
    if way == "http":
        def post(url: str | None) -> None:
            clerk.request("POST", "/_emulator/webhook", json={"url": url})

        return post
    return clerk.emulator.set_webhook_url


def _wait(clerk: EmulatorServer, way: str) -> Callable[..., None]:
    return clerk.emulator.wait_for_deliveries if way == "in_process" else clerk.wait_for_deliveries


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with served_receiver() as recv:
        yield recv


def _email(body: dict[str, object]) -> str:
    data = body["data"]
    assert isinstance(data, dict)
    return str(data["email_addresses"][0]["email_address"])


@pytest.mark.parametrize("way", WAYS)
def test_messages_made_in_a_pause_arrive_in_order_when_the_url_is_set_again(receiver: Receiver, way: str) -> None:
    with EmulatorServer(seed=1, time_scale=1000.0) as clerk:
        set_url, wait = _setter(clerk, way), _wait(clerk, way)
        set_url(receiver.url)
        clerk.create_user("on-time@example.com")
        wait()
        set_url(None)  # the webhook is late
        late = clerk.create_user("late@example.com")
        clerk.request("POST", f"/v1/users/{late['id']}/ban")
        time.sleep(0.3)
        assert len(receiver.received) == 1  # nothing goes out in the pause
        set_url(receiver.url)
        wait()
        log = clerk.deliveries()
    assert [m["status"] for m in log] == ["succeeded"] * 3
    assert receiver.types() == ["user.created", "user.created", "user.updated"]  # in order
    assert receiver.ids() == [m["id"] for m in log]  # each message's own svix-id, once
    assert _email(receiver.received[1].json()) == "late@example.com"
    ban = receiver.received[2].json()
    assert ban["data"]["id"] == late["id"] and ban["data"]["banned"] is True
    verifier = WebhookVerifier(clerk.webhook_secret)
    for item in receiver.received:  # signed as any delivery: at send time, with the webhook secret
        assert verifier.verify(item.headers, item.body) == item.headers["svix-id"]


@pytest.mark.parametrize("way", WAYS)
def test_waiting_while_messages_are_held_raises_and_says_what_to_do(receiver: Receiver, way: str) -> None:
    with EmulatorServer(seed=1, time_scale=1000.0, webhook_url=receiver.url) as clerk:
        set_url, wait = _setter(clerk, way), _wait(clerk, way)
        set_url(None)
        wait()  # nothing held yet: a pause alone is no error
        late = clerk.create_user("late@example.com")
        clerk.request("POST", f"/v1/users/{late['id']}/ban")
        started = time.monotonic()
        with pytest.raises(RuntimeError) as info:
            wait(timeout=10)
        assert time.monotonic() - started < 5  # at once, not after the timeout
        held = clerk.deliveries()
        assert [m["type"] for m in held] == ["user.created", "user.updated"]
        assert [m["status"] for m in held] == ["pending", "pending"] and all(not m["attempts"] for m in held)
        message = str(info.value)
        assert "2 webhook message(s) are held" in message and "deliveries are paused" in message
        assert all(f"{m['id']} ({m['type']})" in message for m in held)
        assert "set_webhook_url(" in message and "reset() drops them" in message
        with pytest.raises(RuntimeError, match="are held"):
            wait()  # every time, while they are held
        set_url(receiver.url)
        wait()
    assert receiver.types() == ["user.created", "user.updated"]


def test_the_state_says_whether_deliveries_are_paused(receiver: Receiver) -> None:
    with EmulatorServer(seed=1, webhook_url=receiver.url) as clerk:
        assert clerk.request("GET", "/_emulator/state")["webhook_paused"] is False
        clerk.set_webhook_url(None)
        state = clerk.request("GET", "/_emulator/state")
        assert (state["webhook_paused"], state["webhook_url"]) == (True, None)
        clerk.reset()
        state = clerk.request("GET", "/_emulator/state")
        assert (state["webhook_paused"], state["webhook_url"]) == (False, receiver.url)


@pytest.mark.parametrize("way", WAYS)
def test_reset_drops_the_messages_a_pause_held_and_ends_it(receiver: Receiver, way: str) -> None:
    with EmulatorServer(seed=1, time_scale=1000.0, webhook_url=receiver.url) as clerk:
        set_url, wait = _setter(clerk, way), _wait(clerk, way)
        set_url(None)
        clerk.create_user("dropped@example.com")
        with pytest.raises(RuntimeError, match="1 webhook message"):
            wait()
        if way == "http":
            clerk.request("POST", "/_emulator/reset")
        elif way == "helper":
            clerk.reset()
        else:
            clerk.emulator.reset()
        wait()  # nothing held any more
        assert clerk.deliveries() == []
        user = clerk.create_user("next-test@example.com")
        wait()
        assert [m["status"] for m in clerk.deliveries()] == ["succeeded"]
    assert [r.json()["data"]["id"] for r in receiver.received] == [user["id"]]  # the dropped one never came


def test_a_retry_that_comes_due_in_a_pause_is_held_then_sent_to_the_new_url(receiver: Receiver) -> None:
    """A retry is held with the rest: same svix-id, the next attempt number, after the URL comes back."""
    now = [1_700_000_000.0]
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}/webhooks/clerk"
        with EmulatorServer(seed=1, webhook_url=dead, clock=lambda: now[0]) as clerk:
            clerk.create_user("paused-retry@example.com")
            deadline = time.monotonic() + 10
            while not clerk.deliveries()[0]["attempts"]:  # the first attempt's outcome, not a time threshold
                assert time.monotonic() < deadline, "the first delivery attempt was never made"
                time.sleep(0.01)
            clerk.set_webhook_url(None)
            now[0] += 60  # the retry (5 s after the failure) is due, in the pause
            clerk.create_user("made-in-the-pause@example.com")
            with pytest.raises(RuntimeError, match="2 webhook message"):
                clerk.wait_for_deliveries(timeout=10)
            clerk.set_webhook_url(receiver.url)
            clerk.wait_for_deliveries(timeout=10)
            log = clerk.deliveries()
    assert [m["status"] for m in log] == ["succeeded", "succeeded"]
    assert [a["outcome"] for a in log[0]["attempts"]] == ["error", "succeeded"]
    assert receiver.ids() == [m["id"] for m in log]  # the retried one first: the order they were made in


def test_a_pause_holds_with_several_workers_and_faults(receiver: Receiver) -> None:
    """delivery_concurrency=4 with duplicates and a first failure each: held in the pause, then the same
    faults and retries as any message."""
    seen: dict[str, int] = {}

    def first_fails(item: Received) -> int:
        svix_id = item.headers["svix-id"]
        seen[svix_id] = seen.get(svix_id, 0) + 1
        return 500 if seen[svix_id] == 1 else 204

    receiver.status_for = first_fails
    with EmulatorServer(seed=3, time_scale=1000.0, webhook_url=receiver.url, delivery_concurrency=4,
                        duplicate_rate=1.0) as clerk:
        clerk.set_webhook_url(None)
        for i in range(6):
            clerk.create_user(f"p{i}@example.com")
        with pytest.raises(RuntimeError, match="6 webhook message"):
            clerk.wait_for_deliveries(5)
        assert receiver.received == []
        clerk.set_webhook_url(receiver.url)
        clerk.wait_for_deliveries(20)
        log = clerk.deliveries()
    assert len(log) == 6
    for message in log:
        assert message["status"] == "succeeded"
        assert [a["outcome"] for a in message["attempts"]] == ["failed", "succeeded", "succeeded"]
        assert [a["duplicate"] for a in message["attempts"]] == [False, False, True]
    assert sorted(seen.values()) == [3] * 6


def test_without_any_url_messages_still_go_nowhere_and_the_wait_says_so() -> None:
    """Unchanged: no URL ever set is no pause. Those messages are logged ``no_endpoint``, reported once,
    not sent by a later URL (replay sends them)."""
    with EmulatorServer(seed=1) as clerk:
        clerk.create_user("nowhere@example.com")
        with pytest.raises(RuntimeError, match="not delivered: no webhook URL is set"):
            clerk.wait_for_deliveries()
        assert [m["status"] for m in clerk.deliveries()] == ["no_endpoint"]


def test_a_ban_made_in_the_pause_reaches_the_app_when_the_webhook_comes(tmp_path: Path) -> None:
    """The walkthrough's case, end to end: clerk-sync's own webhook service on loopback, its database."""
    url = f"sqlite:///{tmp_path / 'clerk_sync.db'}"
    engine = create_engine(url)
    migrations.upgrade(engine)
    engine.dispose()
    with EmulatorServer(seed=1, time_scale=1000.0) as clerk:
        settings = Settings.from_env({"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": clerk.webhook_secret,
                                      "CLERK_SYNC_PRUNE_INTERVAL_S": "0"})
        processor = build_processor(settings)
        try:
            with serve_app(create_app(settings, processor)) as app_url:
                clerk.set_webhook_url(f"{app_url}/webhooks/clerk")
                user = clerk.create_user("banned-late@example.com")
                clerk.wait_for_deliveries()
                row = read_user(processor.store, user["id"])
                assert row is not None and not row.banned

                clerk.set_webhook_url(None)  # the webhook is late
                clerk.request("POST", f"/v1/users/{user['id']}/ban")
                time.sleep(0.3)
                row = read_user(processor.store, user["id"])
                assert row is not None and not row.banned  # not yet: it is late

                clerk.set_webhook_url(f"{app_url}/webhooks/clerk")
                clerk.wait_for_deliveries()
                row = read_user(processor.store, user["id"])
                assert row is not None and row.banned  # it arrived
                assert {m["status"] for m in clerk.deliveries()} == {"succeeded"}
        finally:
            processor.store.dispose()
