"""Hooks for the Clerk event types clerk-sync stores but does not mirror (Clerk Billing's ``subscription.*``,
``subscriptionItem.*``, ``paymentAttempt.*``, ``waitlistEntry.*``...): named by a hook, a new delivery of one
queues one job per hook in the transaction that stores it, runs at least once, in order per subject
(``data.id``), never again for a duplicate delivery; ``"*"`` keeps meaning the mirrored changes only.

Real deliveries (Clerk's own examples, tests/fixtures/clerk/examples) through ``WebhookProcessor`` and the
group committer, on SQLite, PostgreSQL and MariaDB; the dispatcher's clock is moved by hand."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import sqlalchemy as sa
from standardwebhooks.webhooks import Webhook

from clerk_sync import outbox
from clerk_sync._mentions import Mentions
from clerk_sync.changes import EVENT_TYPES, Change, Event, Hook
from clerk_sync.events import parse_envelope
from clerk_sync.hooks import Backoff, Dispatcher
from clerk_sync.hooks.sinks import RedisStreamSink, StandardWebhookSink, change_message
from clerk_sync.ingest import WebhookProcessor, replay_deliveries, replay_delivery, replay_if_failed
from clerk_sync.integrations._committer import GroupCommitter
from clerk_sync.metrics import KNOWN_EVENT_TYPES
from clerk_sync.outbox import claim, redact_jobs
from clerk_sync.retention import Retention
from clerk_sync.store import Store
from clerk_sync.tables import hook_jobs
from clerk_sync.webhooks import WebhookVerifier
from tests import _hook_worker
from tests import factories as f
from tests import test_hooks_rabbitmq_sink as amqp
from tests._server import free_port, wait_for_http
from tests.conftest import CLERK_FIXTURES
from tests.test_cli import run
from tests.test_forwarding_doc import SECRET, receiver
from tests.test_hooks import B, Clock, deliver, hooked, jobs

EXAMPLES = CLERK_FIXTURES / "examples"


def example(event_type: str, **data: Any) -> dict[str, Any]:
    """Clerk's example delivery of ``event_type`` (its data updated with ``data``), timestamped in ms."""
    event = json.loads((EXAMPLES / f"{event_type}.json").read_text())
    event["data"] = copy.deepcopy(event["data"]) | data
    event["timestamp"] = data.get("updated_at", B)
    return event


class Events:
    """A handler recording the events it got (and failing its first ``failures`` calls)."""

    def __init__(self, failures: int = 0) -> None:
        self.seen: list[Event] = []
        self.failures = failures

    def __call__(self, event: Event) -> None:
        assert isinstance(event, Event)
        self.seen.append(event)
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("billing API down")


def send(store: Store, event: dict[str, Any], svix_id: str) -> str:
    headers, body = f.signed(event, svix_id)
    return str(WebhookProcessor(store, WebhookVerifier([f.SECRET])).process(headers, body).status)


def drain(dispatcher: Dispatcher) -> None:
    while dispatcher.run_once():
        pass


# -- which types a hook may name --------------------------------------------------------------------------

def test_a_hook_may_name_the_unmirrored_types_clerk_documents_and_their_families() -> None:
    examples = {p.stem for p in EXAMPLES.glob("*.json")}
    assert examples <= KNOWN_EVENT_TYPES  # the list the hooks accept is Clerk's (the examples, the facts sheet)
    assert {"subscriptionItem.active", "subscription.pastDue", "paymentAttempt.updated",
            "waitlistEntry.created", "organizationInvitation.accepted", "session.created"} <= EVENT_TYPES
    assert not EVENT_TYPES & {"user.created", "organizationMembership.deleted", "session.revoked"}
    assert {"subscriptionItem.created", "invitation.accepted"} <= EVENT_TYPES  # listed by Clerk outside its spec
    hook = Hook("billing", print, on=["subscriptionItem.active", "subscription.*", "paymentAttempt.*"])
    assert [t for t in sorted(EVENT_TYPES) if hook.wants_event(t)] == [
        "paymentAttempt.created", "paymentAttempt.updated", "subscription.active", "subscription.created",
        "subscription.pastDue", "subscription.updated", "subscriptionItem.active"]
    assert hook.wants_event("subscription.resumed")  # a type of a named family Clerk adds later
    # "*" means the mirrored changes, as before: no billing event for an existing "*" hook or sink
    assert not any(Hook("all", print).wants_event(t) for t in EVENT_TYPES)
    assert not Hook("users", print, on=["user.*"]).wants_event("userSomething.created")
    # a type Clerk adds to a mirrored family is stored ignored, and no "user.*" hook gets an Event for it
    assert not Hook("users", print, on=["user.*", "organization.*"]).wants_event("user.createdAtEdge")


@pytest.mark.parametrize(("on", "says"), [
    (["subscriptionItem.activated"], "unknown change type(s) ['subscriptionItem.activated']"),
    (["billing.*"], "'subscription.*'"),
    (["session.revoked"], "applied by clerk-sync"),
])
def test_an_unknown_or_applied_type_is_refused_with_what_to_name(on: list[str], says: str) -> None:
    with pytest.raises(ValueError, match="hook 'h'") as refused:
        Hook("h", print, on=on)
    assert says in str(refused.value)


# -- queued with the delivery, once ------------------------------------------------------------------------

def test_a_delivery_queues_one_job_per_hook_naming_it_and_a_duplicate_none(db_url: str) -> None:
    billing, forward, everything = Events(), Events(), Events()
    store = hooked(db_url, Hook("billing", billing, on=["subscriptionItem.active"]),
                   Hook("forward", forward, on=["subscriptionItem.*", "paymentAttempt.*"]),
                   Hook("all", everything, on=["*"]))
    event = example("subscriptionItem.active", updated_at=B + 5)
    assert send(store, event, "msg_sub_1") == "ignored"  # stored and answered as before
    assert send(store, event, "msg_sub_1") == "duplicate"  # Svix's retry of the same message: nothing queued
    assert send(store, example("waitlistEntry.created"), "msg_wait_1") == "ignored"  # no hook names it
    queued = jobs(store)
    assert [(j["hook"], j["type"], j["idempotency_key"]) for j in queued] == [
        ("billing", "subscriptionItem.active", "subscriptionItem.active:msg_sub_1"),
        ("forward", "subscriptionItem.active", "subscriptionItem.active:msg_sub_1")]
    assert queued[0]["entity_key"] == "billing|subscriptionItem:csub_item_2g7np7Hrk0SN6kj5EDMLDaKNL0S"
    drain(Dispatcher(store))
    (got,) = billing.seen
    assert (got.type, got.svix_id, got.timestamp_ms, got.idempotency_key, got.subject) == (
        "subscriptionItem.active", "msg_sub_1", B + 5, "subscriptionItem.active:msg_sub_1",
        "csub_item_2g7np7Hrk0SN6kj5EDMLDaKNL0S")
    assert got.data == event["data"] and not got.redacted  # Clerk's data, as received
    assert forward.seen == [got] and everything.seen == []
    assert jobs(store) == []
    store.dispose()


def test_a_type_clerk_adds_later_to_a_named_family_is_queued_and_one_of_no_family_is_not(db_url: str) -> None:
    handler = Events()
    store = hooked(db_url, Hook("subs", handler, on=["subscription.*", "user.*"]))
    later = example("subscription.active") | {"type": "subscription.resumed"}
    assert send(store, later, "msg_new") == "ignored"
    assert send(store, later | {"type": "subscriptionPlan.created"}, "msg_other") == "ignored"
    assert send(store, f.envelope("user.createdAtEdge", f.user("user_1", B)), "msg_user") == "ignored"  # "user.*":
    # the mirrored changes only
    drain(Dispatcher(store))
    assert [(e.type, e.svix_id) for e in handler.seen] == [("subscription.resumed", "msg_new")]
    store.dispose()


def test_the_group_committer_queues_them_in_the_batch_with_the_mirrored_changes(
        db_url: str, verifier: WebhookVerifier) -> None:
    seen: list[Change | Event] = []
    store = hooked(db_url, Hook("plans", seen.append, on=["user.created", "subscription.*"]))
    parsed = [(svix_id, parse_envelope(f.body_of(event))) for svix_id, event in [
        ("m_1", f.envelope("user.created", f.user("user_1", B))),
        ("m_2", example("subscription.active", updated_at=B + 1)),
        ("m_3", example("subscription.pastDue", updated_at=B + 2)),
        ("m_2", example("subscription.active", updated_at=B + 1)),  # the same svix id twice in a batch
        ("m_4", example("paymentAttempt.created")),  # not named
    ]]
    committer = GroupCommitter(WebhookProcessor(store, verifier))
    assert [str(o.status) for o in committer.write(parsed)] == [
        "applied", "ignored", "ignored", "duplicate", "ignored"]
    assert committer.batches == 1
    assert [(j["type"], j["idempotency_key"]) for j in jobs(store)] == [
        ("user.created", "user.created:user_1:" + str(B)), ("subscription.active", "subscription.active:m_2"),
        ("subscription.pastDue", "subscription.pastDue:m_3")]
    drain(Dispatcher(store))
    assert [x.type for x in seen] == ["user.created", "subscription.active", "subscription.pastDue"]
    assert isinstance(seen[0], Change) and isinstance(seen[1], Event)
    store.dispose()


def test_concurrent_deliveries_queue_one_job_each_and_none_for_their_duplicates(db_url: str) -> None:
    store = hooked(db_url, Hook("billing", Events(), on=["subscriptionItem.*"]))
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    signed = [f.signed(example("subscriptionItem.updated", id=f"csub_item_{n}", updated_at=B + n), f"msg_{n}")
              for n in range(6)]
    statuses: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(12)

    def post(headers: dict[str, str], body: bytes) -> None:
        start.wait()
        try:
            statuses.append(str(processor.process(headers, body).status))
        except BaseException as exc:  # (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=post, args=pair) for pair in signed * 2]  # each delivered twice at once
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(statuses) == ["duplicate"] * 6 + ["ignored"] * 6
    assert sorted(j["idempotency_key"] for j in jobs(store)) == [f"subscriptionItem.updated:msg_{n}"
                                                                 for n in range(6)]
    store.dispose()


# -- run in order per subject, at least once ----------------------------------------------------------------

def test_jobs_of_one_subject_run_in_arrival_order_and_wait_for_a_failed_one(db_url: str) -> None:
    clock = Clock()
    handler = Events(failures=1)
    store = hooked(db_url, Hook("plans", handler, on=["subscriptionItem.*"]), now=clock)
    # Clerk sent active (B+2) then canceled (B+3); Svix delivers the later first: arrival order is kept,
    # and the handler sees each one's timestamp to leave the stale one alone
    send(store, example("subscriptionItem.canceled", id="item_a", updated_at=B + 3), "msg_a2")
    send(store, example("subscriptionItem.active", id="item_a", updated_at=B + 2), "msg_a1")
    send(store, example("subscriptionItem.active", id="item_b", updated_at=B + 4), "msg_b1")
    dispatcher = Dispatcher(store, now=clock)
    drain(dispatcher)  # item_a's first job fails: its second waits; item_b's runs
    assert [(e.subject, e.svix_id) for e in handler.seen] == [("item_a", "msg_a2"), ("item_b", "msg_b1")]
    clock.advance(3600)
    drain(dispatcher)
    assert [(e.subject, e.svix_id, e.timestamp_ms) for e in handler.seen[2:]] == [
        ("item_a", "msg_a2", B + 3), ("item_a", "msg_a1", B + 2)]
    assert handler.seen[0].idempotency_key == handler.seen[2].idempotency_key  # the retry: the same key
    store.dispose()


def test_a_dispatcher_killed_after_its_claim_leaves_the_event_to_the_next_with_the_same_key(db_url: str) -> None:
    clock = Clock()
    handler = Events()
    store = hooked(db_url, Hook("plans", handler, on=["paymentAttempt.*"]), now=clock)
    send(store, example("paymentAttempt.updated"), "msg_pay_1")
    with store.transaction() as writer:  # a worker claims the job, then dies before running it
        (lost,) = claim(writer.conn, clock(), lease=timedelta(seconds=30), limit=10, max_attempts=5)
    assert isinstance(lost.change, Event)
    dispatcher = Dispatcher(store, lease_s=30, now=clock)
    assert dispatcher.run_once() == 0  # still leased
    clock.advance(31)
    assert dispatcher.run_once() == 1
    assert [e.idempotency_key for e in handler.seen] == [lost.change.idempotency_key]
    assert jobs(store) == []
    store.dispose()


# -- replay, erasure ---------------------------------------------------------------------------------------

def test_replay_queues_them_only_with_hooks(db_url: str) -> None:
    handler = Events()
    store = hooked(db_url, Hook("plans", handler, on=["subscription.active"]))
    with store.transaction() as writer:  # stored before the hook existed (or by a release without it)
        writer.record_delivery("msg_old", f.body_of(example("subscription.active")).decode(),
                               event_type="subscription.active", instance_id=None, event_timestamp=B,
                               status="ignored")
    assert replay_deliveries(store, status="ignored").left == {"ignored": 1}
    assert jobs(store) == []
    report = replay_deliveries(store, status="ignored", with_hooks=True)
    assert report.left == {"ignored": 1} and report.events == 1  # its status stays; the hook's job is queued
    assert report.summary() == "replayed 1 deliveries: 1 ignored; 1 queued for the hooks naming their event types"
    drain(Dispatcher(store))
    assert [(e.svix_id, e.idempotency_key) for e in handler.seen] == [("msg_old", "subscription.active:msg_old")]
    store.dispose()


def test_an_event_about_an_erased_payer_reaches_the_hook_without_their_data(db_url: str) -> None:
    handler = Events()
    store = hooked(db_url, Hook("plans", handler, on=["subscriptionItem.*"]))
    payer = "user_34D368EufHwugfYh4yyGNEheM0S"  # the example's payer
    deliver(store, f.envelope("user.created", f.user(payer, B)), f.envelope("user.deleted", f.deleted("user", payer)))
    send(store, example("subscriptionItem.active"), "msg_late")  # after the payer's deletion: stored redacted
    send(store, example("subscriptionItem.ended", id="item_2", payer={"user_id": "user_2", "email": "bo@x.org"}),
         "msg_other")
    (queued, other) = [j for j in jobs(store) if j["hook"] == "plans"]
    assert "test@example.com" not in json.dumps(queued["payload"])
    with store.transaction() as writer:  # retention's prune redacts a dead job
        writer.conn.execute(sa.update(hook_jobs).where(hook_jobs.c.id == other["id"]).values(status="dead"))
        assert redact_jobs(writer.conn, ids=[other["id"]]) == 1
    drain(Dispatcher(store))
    (late,) = handler.seen
    assert late.redacted and late.subject == "csub_item_2g7np7Hrk0SN6kj5EDMLDaKNL0S"
    assert "email" not in json.dumps(late.data)
    (dead,) = jobs(store)
    assert dead["payload"] == {"event": "subscriptionItem.ended", "svix_id": "msg_other", "timestamp": B,
                               "subject": "item_2", "data": {"id": "item_2"}, "redacted": True}
    store.dispose()


def test_an_erasure_reduces_the_queued_events_naming_the_person_to_ids(db_url: str) -> None:
    handler = Events()
    store = hooked(db_url, Hook("plans", handler, on=["paymentAttempt.*", "subscriptionItem.*"]))
    payer = {"user_id": "user_pay", "email": "pay@example.com", "first_name": "Pat"}
    deliver(store, f.envelope("user.created", f.user("user_pay", B, email="pay@example.com")))
    send(store, example("paymentAttempt.updated", payer=payer), "msg_pay")
    send(store, example("subscriptionItem.active", id="item_other"), "msg_other")  # another payer: kept whole
    Retention(store).erase_user("user_pay", reason="DSR")
    drain(Dispatcher(store))
    other, erased = sorted(handler.seen, key=lambda e: e.svix_id)
    assert erased.redacted and erased.svix_id == "msg_pay" and erased.type == "paymentAttempt.updated"
    assert erased.data == {"id": example("paymentAttempt.updated")["data"]["id"]}
    assert not other.redacted and other.data["payer"]["email"] == "test@example.com"
    store.dispose()


# -- forwarded by the sinks --------------------------------------------------------------------------------

def test_the_sinks_forward_a_named_event_with_the_documented_shape(store: Store) -> None:
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    stream = f"clerk-sync:events-test:{uuid.uuid4().hex}"
    try:
        with receiver() as (url, got):
            webhook = StandardWebhookSink(url, SECRET)
            hooks = [Hook("webhook", webhook, on=["subscription.*"]),
                     Hook("stream", RedisStreamSink(client, stream), on=["subscription.*"]),
                     Hook("all", StandardWebhookSink(url, SECRET), on=["*"])]  # gets no billing event
            hooked_store = Store(store.engine, hooks=hooks)
            event = example("subscription.pastDue", updated_at=B + 9)
            send(hooked_store, event, "msg_past_due")
            drain(Dispatcher(hooked_store))
            webhook.close()
            ((_, fields),) = client.xrange(stream)
    finally:
        client.delete(stream)
        client.close()
    ((headers, body),) = got
    message = Webhook(SECRET).verify(body, headers)
    assert headers["webhook-id"] == message["idempotency_key"] == "subscription.pastDue:msg_past_due"
    assert message == {"type": "subscription.pastDue", "idempotency_key": "subscription.pastDue:msg_past_due",
                       "data": {"event": "subscription.pastDue", "svix_id": "msg_past_due", "timestamp": B + 9,
                                "subject": event["data"]["id"], "data": event["data"]}}
    assert json.loads(fields[b"change"]) == message
    assert fields[b"type"] == b"subscription.pastDue"
    assert change_message(Event("subscription.pastDue", "msg_past_due", B + 9, event["data"])) == message
    # docs/FORWARDING.md shows that shape
    doc = (Path(__file__).resolve().parents[1] / "docs" / "FORWARDING.md").read_text()
    shown = json.loads(re.search(r"## Events clerk-sync does not mirror\n.*?```json\n(.*?)```", doc, re.S)
                       .group(1))  # type: ignore[union-attr]
    assert set(shown) == set(message) and set(shown["data"]) == set(message["data"])
    assert shown["idempotency_key"] == f"{shown['type']}:{shown['data']['svix_id']}"



admin, exchange = amqp.admin, amqp.exchange  # (the RabbitMQ tests' fixtures: a channel of the test's, an exchange)


def test_rabbitmq_routes_a_named_event_by_its_type_and_no_event_to_a_star_hook(
        db_url: str, admin: Any, exchange: str) -> None:
    queue = amqp._queue(admin, exchange, "subscription.*")
    everything = amqp._queue(admin, exchange, "#")
    sink = amqp.RabbitMQSink(amqp.AMQP_URL, exchange)
    star = amqp.RabbitMQSink(amqp.AMQP_URL, exchange)
    store = hooked(db_url, Hook("amqp", sink, on=["subscription.*"]), Hook("star", star))  # "*": changes only
    try:
        send(store, example("subscription.active", updated_at=B + 1), "msg_active")
        send(store, example("subscription.pastDue", updated_at=B + 2), "msg_past_due")
        send(store, example("subscriptionItem.active"), "msg_item")  # not named
        assert Dispatcher(store, heartbeat_s=0).drain() == 2
        got = amqp._read(admin, queue)
        assert len(amqp._read(admin, everything)) == 2  # the "*" hook published none of them
    finally:
        sink.close()
        star.close()
        store.dispose()
    assert [(m.routing_key, p.message_id, p.type) for m, p, _ in got] == [
        ("subscription.active", "subscription.active:msg_active", "subscription.active"),
        ("subscription.pastDue", "subscription.pastDue:msg_past_due", "subscription.pastDue")]
    message = json.loads(got[0][2])
    assert message["data"]["svix_id"] == "msg_active" and message["data"]["timestamp"] == B + 1


# -- the CLI -------------------------------------------------------------------------------------------------

def test_hooks_list_and_retry_show_an_event_job_by_its_subject(db_url: str) -> None:
    def down(event: Event) -> None:
        raise RuntimeError("billing API answered 503")

    store = Store.from_url(db_url, hooks=[Hook("plans", down, on=["subscriptionItem.*"])])
    send(store, example("subscriptionItem.pastDue", id="item_1"), "msg_due")
    Dispatcher(store, backoff=Backoff(max_attempts=1)).drain()
    store.dispose()
    env = {"DATABASE_URL": db_url}
    (dead,) = [line.split("\t") for line in run("hooks", "list", env=env).stdout.splitlines()]
    assert dead[1:] == ["plans", "subscriptionItem.pastDue", "item_1", "attempts=1",
                        "RuntimeError: billing API answered 503", "subscriptionItem.pastDue:msg_due", ""]
    retried = run("hooks", "retry", "--all", env=env)
    assert retried.returncode == 0 and "warning" not in retried.stdout + retried.stderr, retried  # no version to compare
    assert run("hooks", "list", "--status", "pending", env=env).stdout.split("\t")[1] == "plans"


# -- kill -9 between the commit and the dispatch, and mid-handler -----------------------------------------

_INGEST_THEN_DIE = """
import json, os, signal, sys, time
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.store import Store
from clerk_sync.webhooks import WebhookVerifier, sign
from tests import _hook_worker
from tests import test_hooks_rabbitmq_sink as amqp
from tests._server import free_port, wait_for_http
store = Store.from_url(os.environ["DATABASE_URL"], hooks=_hook_worker.event_hooks())
processor = WebhookProcessor(store, WebhookVerifier([sys.argv[2]]))
for svix_id, body in json.load(open(sys.argv[1])):
    processor.process(sign(sys.argv[2], svix_id, int(time.time()), body.encode()), body.encode())
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_kill_9_after_the_commit_and_mid_handler_loses_no_event_and_repeats_no_effect(
        db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = sa.create_engine(db_url)
    _hook_worker.meta.create_all(engine)
    root = Path(__file__).resolve().parents[1]
    env = {"DATABASE_URL": db_url, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    events = [("msg_1", example("subscription.created")), ("msg_2", example("subscriptionItem.active")),
              ("msg_3", example("paymentAttempt.created")), ("msg_4", example("subscription.active")),
              ("msg_5", example("waitlistEntry.created"))]  # not named: no job
    deliveries = [(svix_id, f.body_of(event).decode()) for svix_id, event in events]
    (tmp_path / "deliveries.json").write_text(json.dumps([*deliveries, deliveries[1]]))  # msg_2 delivered twice
    expected = {f"{event['type']}:{svix_id}" for svix_id, event in events[:4]}

    ingest = subprocess.run([sys.executable, "-c", _INGEST_THEN_DIE, str(tmp_path / "deliveries.json"), f.SECRET],
                            env={**os.environ, **env}, cwd=root, capture_output=True, text=True, timeout=120,
                            check=False)
    assert ingest.returncode == -9, ingest.stderr  # killed before any dispatch: the commits hold the jobs
    with engine.connect() as conn:
        assert sorted(conn.execute(sa.select(hook_jobs.c.idempotency_key)).scalars()) == sorted(expected)

    (tmp_path / "crash").touch()  # the worker acts on its first job, then is killed before finishing it
    worker = run("worker", "--hooks", "tests._hook_worker:event_hooks", "--once",
                 env={**env, "HOOK_CRASH_FILE": str(tmp_path / "crash")}, cwd=root)
    assert worker.returncode == -9, worker.stderr
    with engine.connect() as conn:
        (first,) = conn.execute(sa.select(_hook_worker.calls.c.key)).scalars()

    monkeypatch.setenv("DATABASE_URL", db_url)
    calls, effects, left = _hook_worker.resume_after_lease(db_url, engine, _hook_worker.event_hooks())
    assert left == 0
    assert effects == expected  # every event acted on, exactly once
    assert sorted(calls) == sorted([*expected, first])  # only the interrupted one was called twice
    engine.dispose()


def test_an_event_whose_data_no_column_could_hold_is_queued_as_the_inbox_keeps_it(db_url: str) -> None:
    handler = Events()
    store = hooked(db_url, Hook("plans", handler, on=["paymentAttempt.*"]))
    event = example("paymentAttempt.created")
    event["data"]["note"] = "nul\u0000 and a lone \ud800 surrogate"
    body = json.dumps(event).encode()  # (json escapes them: \\u0000, \\ud800)
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    assert processor.process(*f.signed(body, "msg_odd")).status == "ignored"
    drain(Dispatcher(store))
    (got,) = handler.seen
    assert got.data["note"] == "nul\ufffd and a lone \ufffd surrogate"  # as the inbox stores it (README)
    store.dispose()


# -- clerk-sync serve ------------------------------------------------------------------------------------------

def test_serve_with_hooks_queues_and_runs_a_billing_event_it_answers_ignored(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    _hook_worker.meta.create_all(engine)
    root = Path(__file__).resolve().parents[1]
    port = free_port()
    env = {**os.environ, "DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": f.SECRET, "CLERK_SYNC_LOG_LEVEL":
           "WARNING", "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    proc = subprocess.Popen([sys.executable, "-c", "from clerk_sync.cli import main; main()", "serve", "--port",
                             str(port), "--hooks", "tests._hook_worker:event_hooks"], env=env, cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        headers, body = f.signed(example("subscriptionItem.active"), "msg_serve_item")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            first = client.post("/webhooks/clerk", content=body, headers=headers)
            again = client.post("/webhooks/clerk", content=body, headers=headers)  # Svix's retry: nothing more
        assert (first.status_code, again.status_code) == (200, 200), (first.text, again.text)
        assert "ignored" in first.text and "duplicate" in again.text, (first.text, again.text)
        deadline = time.monotonic() + 30  # the dispatcher polls every second: wait for the outcome, not a time
        effects: list[str] = []
        while not effects and time.monotonic() < deadline:
            with engine.connect() as conn:
                effects = list(conn.execute(sa.select(_hook_worker.effects.c.key)).scalars())
            time.sleep(0.05)
        assert effects == ["subscriptionItem.active:msg_serve_item"]
        with engine.connect() as conn:
            assert list(conn.execute(sa.select(_hook_worker.calls.c.key)).scalars()) == effects  # called once
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        engine.dispose()


# -- replays, unreadable jobs, long types --------------------------------------------------------------------

def _stored(store: Store, svix_id: str, event: dict[str, Any], status: str) -> None:
    """A delivery stored ``status`` (by a release before these hooks, or failed by a database error)."""
    with store.transaction() as writer:
        writer.record_delivery(svix_id, f.body_of(event).decode(), event_type=event["type"], instance_id=None,
                               event_timestamp=B, status=status)


def test_a_replay_queues_an_event_again_only_with_hooks_and_a_failed_one_once_it_applies(db_url: str) -> None:
    handler = Events()
    store = hooked(db_url, Hook("plans", handler, on=["subscriptionItem.*"]))
    send(store, example("subscriptionItem.active"), "msg_live")
    drain(Dispatcher(store))
    assert [e.svix_id for e in handler.seen] == ["msg_live"]
    # the Django admin's replay_audited, replay_delivery, the console's replay of the app's (hooked) store:
    # the event was queued when it came, and no replay but `--with-hooks` queues it again
    assert replay_delivery(store, "msg_live") == "ignored"
    assert replay_if_failed(store, "msg_live") == (False, "ignored")
    assert replay_deliveries(store, status="ignored").events == 0
    assert jobs(store) == []
    # a failed delivery (never queued) that now applies as ignored queues, as a failed mirrored delivery's
    # replay queues its change's jobs: by the console or admin (the store's hooks), or replay --with-hooks
    _stored(store, "msg_failed_1", example("subscriptionItem.ended", id="item_1"), "failed")
    _stored(store, "msg_failed_2", example("subscriptionItem.ended", id="item_2"), "failed")
    assert replay_if_failed(store, "msg_failed_1") == (True, "ignored")
    report = replay_deliveries(store, status="failed", with_hooks=True)
    assert (report.by_status, report.left, report.events) == ({"ignored": 1}, {}, 1)  # written and queued
    drain(Dispatcher(store))
    assert [e.svix_id for e in handler.seen] == ["msg_live", "msg_failed_1", "msg_failed_2"]
    _stored(store, "msg_failed_3", example("subscriptionItem.ended", id="item_3"), "failed")
    assert replay_deliveries(store, status="failed").events == 0  # without --with-hooks: none
    assert jobs(store) == []
    store.dispose()


def test_a_replayed_event_about_a_payer_deleted_since_is_reduced_as_a_live_one(db_url: str) -> None:
    payer = "user_34D368EufHwugfYh4yyGNEheM0S"  # the example's payer
    plain = hooked(db_url)  # no hook yet
    deliver(plain, f.envelope("user.created", f.user(payer, B)))
    send(plain, example("subscriptionItem.active"), "msg_before")  # the payer there: stored whole
    deliver(plain, f.envelope("user.deleted", f.deleted("user", payer)))
    plain.dispose()
    handler = Events()
    store = hooked(db_url, Hook("plans", handler, on=["subscriptionItem.*"]))
    assert replay_deliveries(store, status="ignored", with_hooks=True).events == 1
    send(store, example("subscriptionItem.active"), "msg_after")  # the same event arriving now
    drain(Dispatcher(store))
    replayed, live = handler.seen
    assert (replayed.svix_id, live.svix_id) == ("msg_before", "msg_after")
    assert replayed.redacted and live.redacted and replayed.data == live.data
    assert "test@example.com" not in json.dumps(replayed.data)
    with store.connect() as conn:  # and the inbox row is redacted, as the live one
        stored = conn.execute(sa.select(sa.column("payload")).select_from(sa.table("webhook_events"))
                              .where(sa.column("svix_id") == "msg_before")).scalar_one()
    stored = json.loads(stored) if isinstance(stored, str) else stored
    assert "test@example.com" not in json.dumps(stored)
    assert replay_deliveries(store, status="ignored", with_hooks=True).events == 0  # redacted: not replayed
    store.dispose()


def test_a_job_whose_payload_this_release_cannot_read_dies_alone(db_url: str) -> None:
    events, changes = Events(), []
    store = hooked(db_url, Hook("forward", events, on=["subscription.*"]),
                   Hook("all", changes.append, on=["*"]))
    send(store, example("subscription.active", id="sub_1"), "msg_1")
    send(store, example("subscription.active", id="sub_2"), "msg_2")
    send(store, example("subscription.active", id="sub_3"), "msg_3")
    deliver(store, f.envelope("user.created", f.user("user_1", B)))
    first, second, _, _ = jobs(store)
    with store.transaction() as writer:
        # what the previous release's `users erase` left of an event job (it kept a change's keys only) ...
        writer.conn.execute(sa.update(hook_jobs).where(hook_jobs.c.id == first["id"]).values(
            payload={"values": {}, "previous": {}, "redacted": True}))
        # ... and a payload edited by hand
        writer.conn.execute(sa.update(hook_jobs).where(hook_jobs.c.id == second["id"]).values(
            payload={"event": "subscription.active", "timestamp": "soon"}))
    drain(Dispatcher(store))
    assert [e.svix_id for e in events.seen] == ["msg_3"] and [c.type for c in changes] == ["user.created"]
    dead = jobs(store)
    assert [(j["id"], j["status"]) for j in dead] == [(first["id"], "dead"), (second["id"], "dead")]
    assert dead[0]["last_error"].startswith("unreadable payload (KeyError: 'entity'): ")
    assert "older release's `users erase`" in dead[0]["last_error"] and f"hooks purge {first['id']}`" in dead[0]["last_error"]
    assert dead[1]["last_error"].startswith("unreadable payload (KeyError: 'svix_id')")
    store.dispose()
    env = {"DATABASE_URL": db_url}  # the operator sees them, and retry (no version to compare) or purge takes them
    listed = [line.split("\t") for line in run("hooks", "list", env=env).stdout.splitlines()]
    assert [row[1:4] + row[6:7] for row in listed] == [
        ["forward", "subscription.active", "msg_1", "subscription.active:msg_1"],
        ["forward", "subscription.active", "msg_2", "subscription.active:msg_2"]]
    assert all(row[5].startswith("unreadable payload") for row in listed)
    retried = run("hooks", "retry", "--all", env=env)
    assert retried.returncode == 0 and "warning" not in retried.stdout + retried.stderr, retried


@pytest.mark.parametrize("db_url", ["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)], indirect=True)
def test_a_job_whose_payload_is_not_json_dies_alone_and_list_retry_and_erasure_take_it(db_url: str) -> None:
    # (SQLite and MariaDB keep the payload as text, so a hand edit may leave one that is not JSON; PostgreSQL's
    # JSONB refuses it.) Read while the rows were fetched, it failed every claim, `hooks list` and `retry`.
    events = Events()
    store = hooked(db_url, Hook("forward", events, on=["subscription.*"]))
    send(store, example("subscription.active", id="sub_1"), "msg_1")
    send(store, example("subscription.active", id="sub_2"), "msg_2")
    first, _ = jobs_text(store)
    truncated = '{"event": "subscription.active", "data": {"email": "ann@example.com'
    with store.engine.begin() as conn:  # edited by hand, cut short
        conn.execute(sa.text("UPDATE hook_jobs SET payload = :p WHERE id = :id"), {"p": truncated, "id": first[0]})
    drain(Dispatcher(store))
    assert [e.svix_id for e in events.seen] == ["msg_2"]
    (dead,) = jobs_text(store)
    assert dead[:3] == (first[0], "dead", truncated)
    assert dead[3].startswith("unreadable payload (JSONDecodeError: ") and f"hooks purge {first[0]}`" in dead[3]
    env = {"DATABASE_URL": db_url}
    listed = run("hooks", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert [line.split("\t")[1:4] for line in listed.stdout.splitlines()] == [
        ["forward", "subscription.active", "msg_1"]]
    retried = run("hooks", "retry", "--all", env=env)
    assert retried.returncode == 0 and "1 " in retried.stdout, retried
    (again,) = jobs_text(store)
    assert again[1:3] == ("pending", truncated)  # queued again as it was, to die again alone
    with store.transaction() as writer:  # an erasure finds the person in its text and keeps none of it
        assert redact_jobs(writer.conn, Mentions(["ann@example.com"])) == 1
    (erased,) = jobs_text(store)
    assert "ann@" not in erased[2] and json.loads(erased[2])["redacted"] is True
    store.dispose()


def jobs_text(store: Store) -> list[tuple[int, str, str, str | None]]:
    """(id, status, payload as stored, last error) of each job."""
    with store.connect() as conn:
        return [tuple(row) for row in conn.execute(sa.text(
            "SELECT id, status, payload, last_error FROM hook_jobs ORDER BY id"))]


def test_a_type_longer_than_the_jobs_column_is_queued_bounded_and_reaches_the_hook_whole(db_url: str) -> None:
    handler = Events()
    store = hooked(db_url, Hook("subs", handler, on=["subscription.*"]))
    long_type = "subscription." + "x" * 110  # a type Clerk adds later: webhook_events.type holds 128
    svix_id = "msg_" + "9" * 100
    assert send(store, example("subscription.active", id="s" * 150) | {"type": long_type}, svix_id) == "ignored"
    assert send(store, example("subscription.active", id="s" * 150) | {"type": long_type + "y"}, "msg_2") == "ignored"
    queued = jobs(store)
    assert [len(j["type"]) for j in queued] == [64, 64] and queued[0]["type"] != queued[1]["type"]
    assert len(queued[0]["idempotency_key"]) == 200 and queued[0]["entity_key"] == queued[1]["entity_key"]
    drain(Dispatcher(store))
    assert [(e.type, e.idempotency_key) for e in handler.seen] == [
        (long_type, f"{long_type}:{svix_id}"), (long_type + "y", f"{long_type}y:msg_2")]
    store.dispose()


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
@pytest.mark.parametrize("direct", [True, False], ids=["psycopg", "sqlalchemy"])
def test_a_jsonb_payload_that_is_a_json_string_dies_alone_and_retry_writes_it_back_as_it_was(
        db_url: str, direct: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # psycopg decodes JSONB as it fetches it: a payload that is a JSON string came back a Python str, which retry
    # wrote back as JSON text (CAST('user_1 hand-edited' AS JSONB): refused, the whole retry page with it), and
    # one holding a change's JSON text was decoded twice and run. Read as stored text, each is parsed once.
    if not direct:  # the claim's SQLAlchemy statements (another PostgreSQL driver)
        monkeypatch.setattr(outbox, "_direct", lambda conn: None)
    events = Events()
    store = hooked(db_url, Hook("forward", events, on=["subscription.*"]))
    send(store, example("subscription.active", id="sub_1"), "msg_1")
    send(store, example("subscription.active", id="sub_2"), "msg_2")
    with store.engine.begin() as conn:
        (first, readable), (second, _) = conn.execute(
            sa.text("SELECT id, payload::text FROM hook_jobs ORDER BY id")).all()
        conn.execute(sa.text("UPDATE hook_jobs SET payload = to_jsonb(CAST(:p AS TEXT)) WHERE id = :id"),
                     [{"p": "user_1 hand-edited", "id": first}, {"p": readable, "id": second}])

    def stored() -> list[tuple[str, str]]:
        with store.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text("SELECT status, payload::text FROM hook_jobs "
                                                               "ORDER BY id"))]

    was = [payload for _, payload in stored()]
    drain(Dispatcher(store))
    assert events.seen == []  # the JSON text inside a JSON string is no event
    assert stored() == [("dead", was[0]), ("dead", was[1])]
    env = {"DATABASE_URL": db_url}
    listed = run("hooks", "list", env=env)
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 2, listed
    retried = run("hooks", "retry", "--all", env=env)
    assert retried.returncode == 0 and "2 " in retried.stdout, retried
    assert stored() == [("pending", was[0]), ("pending", was[1])]  # queued again as they were
    store.dispose()


@pytest.mark.parametrize("db_url", ["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)], indirect=True)
def test_an_erasure_redacts_a_payload_that_is_not_json_whenever_its_search_matched(db_url: str) -> None:
    # The SQL search matches a JSON escape of the address (zo\u00eb@, as json.dumps writes it); the text of a
    # payload that is not JSON was checked again in Python without escapes, missed it, and kept the address.
    store = hooked(db_url, Hook("forward", Events(), on=["subscription.*"]))
    send(store, example("subscription.active", id="sub_1"), "msg_1")
    (first,) = jobs_text(store)
    truncated = '{"event": "subscription.active", "data": {"email": "zo\\u00eb@example.com'
    with store.engine.begin() as conn:  # edited by hand, cut short
        conn.execute(sa.text("UPDATE hook_jobs SET payload = :p WHERE id = :id"), {"p": truncated, "id": first[0]})
    with store.transaction() as writer:
        assert redact_jobs(writer.conn, Mentions(["zoë@example.com"])) == 1
    (erased,) = jobs_text(store)
    assert "u00eb@" not in erased[2] and json.loads(erased[2])["redacted"] is True
    store.dispose()
