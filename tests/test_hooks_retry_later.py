"""A receiver's own pause: a hook handler raising ``HookRetryLater``, and the forwarding sink reading a
429/503's ``Retry-After``. Before, every failure waited only for the backoff's next step (2 s, 4 s, ...):
a receiver that said "come back in 5 minutes" was sent the job again within seconds, for ~15 minutes of
attempts, and after an outage every queued job hammered it at once."""

from __future__ import annotations

import email.utils
import math
from datetime import timedelta
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from clerk_sync._http_deadline import retry_after
from clerk_sync.changes import Change, Hook
from clerk_sync.errors import HookRetryLater
from clerk_sync.hooks import Backoff, Dispatcher
from clerk_sync.hooks.sinks import StandardWebhookSink
from tests import factories as f
from tests._server import running
from tests.test_hooks import B, Clock, deliver, hooked, jobs
from tests.test_hooks_sinks import FORWARD_SECRET


class Later:
    """A handler that asks for ``after_s`` more seconds on each of its first ``times`` calls."""

    def __init__(self, after_s: float, times: int = 1) -> None:
        self.after_s, self.times, self.calls = after_s, times, 0

    def __call__(self, change: Change) -> None:
        self.calls += 1
        if self.calls <= self.times:
            raise HookRetryLater("the CRM is rate limiting us", after_s=self.after_s)


def run_at(dispatcher: Dispatcher, clock: Clock, start: Any, seconds: float) -> int:
    clock.t = start + timedelta(seconds=seconds)
    return dispatcher.run_once()


def test_backoff_waits_for_what_the_receiver_asked_within_max_s() -> None:
    backoff = Backoff(base_s=2.0, max_s=3600.0)
    assert backoff.delay(1) == timedelta(seconds=2)  # nothing asked: the schedule
    assert backoff.delay(1, asked_s=300) == timedelta(seconds=300)  # longer than the schedule: waited for
    assert backoff.delay(5, asked_s=3) == timedelta(seconds=32)  # shorter: never earlier than the schedule
    assert backoff.delay(1, asked_s=10**9) == timedelta(hours=1)  # capped at max_s
    assert backoff.delay(1, asked_s=math.inf) == timedelta(hours=1)
    assert HookRetryLater("x", after_s=math.nan).after_s == 0.0  # a handler's NaN is no pause
    assert HookRetryLater("x", after_s=-5).after_s == 0.0


def test_a_handler_asking_for_later_is_not_run_before_then(db_url: str) -> None:
    clock, handler = Clock(), Later(after_s=120)
    store = hooked(db_url, Hook("crm", handler), now=clock)
    deliver(store, f.envelope("user.created", f.user("user_1", B + 1000)))
    dispatcher = Dispatcher(store, backoff=Backoff(base_s=2.0), now=clock)
    start = clock.t
    assert dispatcher.run_once() == 1
    (job,) = jobs(store)
    assert (job["status"], job["attempts"], handler.calls) == ("pending", 1, 1)
    assert job["last_error"] == "HookRetryLater: the CRM is rate limiting us"
    assert run_at(dispatcher, clock, start, 3) == 0  # the backoff's 2 s are past: not the receiver's 120 s
    assert run_at(dispatcher, clock, start, 119) == 0
    assert run_at(dispatcher, clock, start, 120) == 1
    assert handler.calls == 2 and jobs(store) == []
    store.dispose()


def test_a_receiver_that_always_says_later_still_ends_dead(db_url: str) -> None:
    """The attempt counts: Retry-After forever is not retried forever."""
    clock, handler = Clock(), Later(after_s=30, times=10)
    store = hooked(db_url, Hook("crm", handler), now=clock)
    deliver(store, f.envelope("user.created", f.user("user_1", B + 1000)))
    dispatcher = Dispatcher(store, backoff=Backoff(max_attempts=2, base_s=1.0), now=clock)
    start = clock.t
    assert dispatcher.run_once() == 1
    assert run_at(dispatcher, clock, start, 30) == 1
    (job,) = jobs(store)
    assert (job["status"], job["attempts"], handler.calls) == ("dead", 2, 2)
    store.dispose()


def answering(status: int, headers: dict[str, str]) -> Starlette:
    async def endpoint(request: Request) -> Response:
        return Response(status_code=status, headers=headers)

    return Starlette(routes=[Route("/in", endpoint, methods=["POST"])])


@pytest.mark.parametrize(("status", "header", "asked"), [
    (429, "90", 90),
    (503, "in-a-date", 300),  # an HTTP date 300 s ahead
    (503, None, 0),  # no Retry-After: the schedule (a plain failure)
    (429, "inf", 0),  # unreadable: the schedule
])
def test_the_forwarding_sink_reads_a_429_or_503s_retry_after(db_url: str, status: int, header: str | None,
                                                             asked: int) -> None:
    clock = Clock()
    if header == "in-a-date":
        header = email.utils.format_datetime(clock.t + timedelta(seconds=asked), usegmt=True)
    with running(answering(status, {"retry-after": header} if header else {})) as url:
        sink = StandardWebhookSink(f"{url}/in", FORWARD_SECRET)
        store = hooked(db_url, Hook("forward", sink, on=["user.*"]), now=clock)
        deliver(store, f.envelope("user.created", f.user("user_1", B + 1000)))
        dispatcher = Dispatcher(store, backoff=Backoff(base_s=10.0), now=clock)
        start = clock.t
        assert dispatcher.run_once() == 1
        (job,) = jobs(store)
        assert job["last_error"].startswith(
            f"{'HookRetryLater' if asked else 'RuntimeError'}: {url}/in answered {status}")
        wait = max(asked, 10)  # never earlier than the backoff's 10 s
        # (a date has whole seconds, read against the wall clock: the pause is within a second below it)
        assert run_at(dispatcher, clock, start, wait - 2) == 0
        assert run_at(dispatcher, clock, start, wait + 1) == 1
        sink.close()
    store.dispose()


def test_retry_after_is_read_as_seconds_or_a_date_within_its_cap() -> None:
    def read(value: str | None) -> float:
        return retry_after(httpx.Headers({"retry-after": value} if value is not None else {}), default=7.0, cap=600.0)

    assert (read(None), read("12"), read("-3"), read("nan"), read("1e12"), read("soon")) == (7.0, 12.0, 0.0, 7.0,
                                                                                            600.0, 7.0)
    assert read("Fri, 31 Dec 9999 23:59:59 GMT") == 600.0
    assert read("Thu, 01 Jan 1970 00:00:00 GMT") == 0.0
