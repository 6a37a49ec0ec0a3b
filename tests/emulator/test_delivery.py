"""Webhook delivery: Svix signatures, the retry schedule, fault knobs, the log and replay."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook as StandardWebhook
from svix.webhooks import Webhook as SvixWebhook

from clerk_sync.emulator import SVIX_RETRY_SCHEDULE_S, EmulatorConfig, FaultSettings, sign_headers
from clerk_sync.emulator.delivery import Deliverer
from clerk_sync.emulator.faults import Faults
from clerk_sync.testing import EmulatorServer

from .support import SHARED, Received, Receiver


def _unbranded(headers: dict[str, str]) -> dict[str, str]:
    return {k.replace("svix-", "webhook-"): v for k, v in headers.items() if k.startswith("svix-")}


def _log_entry(clerk: EmulatorServer, index: int = 0) -> dict[str, Any]:
    return clerk.deliveries()[index]


@pytest.mark.parametrize(
    "vector",
    json.loads((SHARED / "webhook-signature-vectors.json").read_text())["valid"][:3],
    ids=lambda v: v["msg_id"],
)
def test_signer_matches_published_vectors(vector: dict[str, Any]) -> None:
    headers = sign_headers(vector["secret"], vector["msg_id"], vector["timestamp"], vector["payload"])
    assert headers["svix-signature"] == vector["signature"]


def test_deliveries_verify_with_svix_and_standardwebhooks(clerk_hooked: EmulatorServer, receiver: Receiver) -> None:
    clerk_hooked.create_user("sig@example.com")
    clerk_hooked.wait_for_deliveries()
    (delivery,) = receiver.received
    assert delivery.headers["svix-id"].startswith("msg_")
    assert delivery.headers["content-type"] == "application/json"
    assert clerk_hooked.webhook_secret.startswith("whsec_")
    SvixWebhook(clerk_hooked.webhook_secret).verify(delivery.body, delivery.headers)
    StandardWebhook(clerk_hooked.webhook_secret).verify(delivery.body, _unbranded(delivery.headers))
    assert delivery.json()["type"] == "user.created"


def test_configured_secret_is_used(receiver: Receiver) -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    with EmulatorServer(webhook_url=receiver.url, webhook_secret=secret) as clerk:
        assert clerk.webhook_secret == secret
        clerk.create_user("own@example.com")
        clerk.wait_for_deliveries()
    SvixWebhook(secret).verify(receiver.received[0].body, receiver.received[0].headers)


def test_failed_attempts_retry_with_same_id_and_new_timestamp(receiver: Receiver) -> None:
    """time_scale=250: retries after 20 ms and 1.2 s, so the third attempt is a second later."""
    receiver.status_for = lambda item: 500 if len(receiver.received) < 3 else 200
    with EmulatorServer(webhook_url=receiver.url, time_scale=250.0) as clerk:
        started = time.monotonic()
        clerk.create_user("retry@example.com")
        clerk.wait_for_deliveries(timeout=10)
        elapsed = time.monotonic() - started
        entry = _log_entry(clerk)
    assert [a["status_code"] for a in entry["attempts"]] == [500, 500, 200]
    assert entry["status"] == "succeeded"
    assert elapsed >= (5 + 300) / 250
    assert len(set(receiver.ids())) == 1
    stamps = [int(r.headers["svix-timestamp"]) for r in receiver.received]
    assert stamps[0] < stamps[2]
    assert len({r.headers["svix-signature"] for r in receiver.received}) >= 2
    for delivery in receiver.received:
        SvixWebhook(clerk.webhook_secret).verify(delivery.body, delivery.headers)


def test_full_schedule_then_failed(receiver: Receiver) -> None:
    receiver.status_for = lambda item: 503
    with EmulatorServer(webhook_url=receiver.url, time_scale=100_000.0) as clerk:
        clerk.create_user("down@example.com")
        clerk.wait_for_deliveries(timeout=10)
        entry = _log_entry(clerk)
    assert len(entry["attempts"]) == len(SVIX_RETRY_SCHEDULE_S) == 8
    assert entry["status"] == "failed"
    assert entry["statuses"] == [503] * 8
    times = [a["timestamp"] for a in entry["attempts"]]
    assert times == sorted(times)


def test_receiver_3xx_counts_as_failure(receiver: Receiver) -> None:
    receiver.status_for = lambda item: 302 if len(receiver.received) == 1 else 200
    with EmulatorServer(webhook_url=receiver.url, time_scale=100_000.0) as clerk:
        clerk.create_user("redirect@example.com")
        clerk.wait_for_deliveries()
        assert _log_entry(clerk)["statuses"] == [302, 200]


def test_slow_receiver_does_not_block_the_api_and_times_out(receiver: Receiver) -> None:
    first_done = threading.Event()

    def slow(item: Received) -> int:
        if len(receiver.received) == 1:
            time.sleep(0.6)  # three times the delivery timeout: the attempt times out
            first_done.set()
        return 200

    receiver.status_for = slow
    with EmulatorServer(webhook_url=receiver.url, time_scale=100_000.0, delivery_timeout_s=0.2) as clerk:
        clerk.create_user("slow@example.com")
        clerk.create_user("slow2@example.com")
        assert not first_done.is_set()  # the API answered without waiting for the slow delivery
        clerk.wait_for_deliveries(timeout=10)
        outcomes = [a["outcome"] for a in _log_entry(clerk)["attempts"]]
    assert outcomes == ["timeout", "succeeded"]


def test_duplicate_fault_sends_the_same_message_twice(receiver: Receiver) -> None:
    with EmulatorServer(webhook_url=receiver.url, duplicate_rate=1.0) as clerk:
        clerk.create_user("twice@example.com")
        clerk.wait_for_deliveries()
        entry = _log_entry(clerk)
    ids = receiver.ids()
    assert len(ids) == 2
    assert ids[0] == ids[1]
    assert receiver.received[0].body == receiver.received[1].body
    assert [a["duplicate"] for a in entry["attempts"]] == [False, True]
    assert entry["faults"] == ["duplicate"]


def test_reorder_fault_swaps_with_the_next_message(receiver: Receiver) -> None:
    with EmulatorServer(webhook_url=receiver.url, reorder_rate=1.0, reorder_hold_s=5.0) as clerk:
        user = clerk.create_user("order@example.com")
        clerk.request("PATCH", f"/v1/users/{user['id']}", json={"first_name": "Later"})
        clerk.wait_for_deliveries()
    assert receiver.types() == ["user.updated", "user.created"]


def test_reorder_fault_releases_a_lone_message_after_the_hold(receiver: Receiver) -> None:
    with EmulatorServer(webhook_url=receiver.url, reorder_rate=1.0, reorder_hold_s=0.5) as clerk:
        clerk.create_user("alone@example.com")
        assert clerk.deliveries()[0]["status"] == "held"
        clerk.wait_for_deliveries()
    assert receiver.types() == ["user.created"]


def test_drop_then_redeliver(receiver: Receiver) -> None:
    with EmulatorServer(webhook_url=receiver.url, drop_then_redeliver_rate=1.0, time_scale=1000.0) as clerk:
        clerk.create_user("dropped@example.com")
        clerk.wait_for_deliveries()
        entry = _log_entry(clerk)
    assert [a["outcome"] for a in entry["attempts"]] == ["dropped", "succeeded"]
    assert len(receiver.received) == 1
    assert entry["status"] == "succeeded"


def test_fail_fault_exhausts_then_replay_delivers(receiver: Receiver) -> None:
    with EmulatorServer(webhook_url=receiver.url, fail_rate=1.0, time_scale=100_000.0) as clerk:
        clerk.create_user("failing@example.com")
        clerk.wait_for_deliveries()
        entry = _log_entry(clerk)
        assert entry["status"] == "failed"
        assert receiver.received == []
        assert {a["outcome"] for a in entry["attempts"]} == {"injected_failure"}
        clerk.set_faults(fail_rate=0.0)
        replayed = clerk.request("POST", "/_emulator/deliveries/replay", json={"status": "failed"})
        assert replayed == {"replayed": [entry["id"]]}
        clerk.wait_for_deliveries()
        entry = _log_entry(clerk)
    assert entry["status"] == "succeeded"
    assert entry["attempts"][-1]["manual"] is True
    assert receiver.ids() == [entry["id"]]


def test_no_endpoint_then_set_url_and_replay(clerk: EmulatorServer, receiver: Receiver) -> None:
    clerk.create_user("early@example.com")
    assert clerk.deliveries()[0]["status"] == "no_endpoint"
    clerk.set_webhook_url(receiver.url)
    clerk.create_user("later@example.com")
    clerk.request("POST", "/_emulator/deliveries/replay", json={"status": "no_endpoint"})
    clerk.wait_for_deliveries()
    assert sorted(r.json()["data"]["email_addresses"][0]["email_address"] for r in receiver.received) == [
        "early@example.com",
        "later@example.com",
    ]


def test_receiver_can_abort_retries(receiver: Receiver) -> None:
    """Svix delivery control: ``webhook-delivery: abort-message`` stops the retries."""
    receiver.status_for = lambda item: 500
    receiver.response_headers["webhook-delivery"] = "abort-message"
    with EmulatorServer(webhook_url=receiver.url, time_scale=100_000.0) as clerk:
        clerk.create_user("gone@example.com")
        clerk.wait_for_deliveries()
        entry = _log_entry(clerk)
    assert entry["statuses"] == [500]
    assert entry["status"] == "failed"


def test_faults_are_deterministic_with_a_seed(receiver: Receiver) -> None:
    def run() -> list[tuple[list[str], list[str]]]:
        with EmulatorServer(
            webhook_url=receiver.url,
            seed=42,
            duplicate_rate=0.5,
            drop_then_redeliver_rate=0.5,
            fail_rate=0.3,
            time_scale=100_000.0,
        ) as clerk:
            for n in range(8):
                clerk.create_user(f"seeded{n}@example.com")
            clerk.wait_for_deliveries()
            log = clerk.deliveries()
        return [(m["faults"], [a["outcome"] for a in m["attempts"]]) for m in log]

    first, second = run(), run()
    assert first == second
    assert any(faults for faults, _ in first)


def test_worker_survives_an_attempt_that_crashes(receiver: Receiver) -> None:
    """A bug in one attempt (here time_scale=0 dividing the retry delay, once possible through the
    config) fails that message; the worker lives on and later messages are still delivered."""
    receiver.status_for = lambda item: 500 if len(receiver.received) == 1 else 204
    ids = iter(["msg_first", "msg_second"])
    deliverer = Deliverer(
        secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        url=receiver.url,
        faults=Faults(FaultSettings(time_scale=0.0), seed=None),
        new_id=lambda: next(ids),
        schedule=SVIX_RETRY_SCHEDULE_S,
    )
    try:
        first = deliverer.enqueue("user.created", {"type": "user.created"})
        deliverer.wait_idle(5)
        second = deliverer.enqueue("user.updated", {"type": "user.updated"})
        deliverer.wait_idle(5)
    finally:
        deliverer.close()
    assert first.status == "failed"
    assert [(a.outcome, a.status_code) for a in first.attempts] == [("failed", 500)]
    assert "ZeroDivisionError" in (first.attempts[0].error or "")
    assert second.status == "succeeded"
    assert receiver.ids() == ["msg_first", "msg_second"]


@pytest.mark.parametrize("secret", ["whsec_", "whsec_!!!", "whsec_a"])
def test_unusable_webhook_secret_fails_at_start_up(secret: str) -> None:
    """Not at the first delivery, in the worker thread, where it stopped every later delivery."""
    with pytest.raises(ValueError, match=r"webhook signing secret cannot sign .*whsec_"):
        EmulatorConfig(webhook_secret=secret)
    with pytest.raises(ValueError, match="webhook signing secret cannot sign"):
        Deliverer(secret=secret, url=None, faults=Faults(FaultSettings(), None), new_id=str, schedule=(0,))
