"""An async handler is refused, never dropped.

The dispatcher runs handlers in its own thread and does not await what they return. Before: ``Hook`` took an
``async def`` (easy to write beside FastAPI), the dispatcher called it, got a coroutine it never awaited, and
marked the job done: the welcome mail never sent, the job deleted, only a ``RuntimeWarning`` said so. Now
``Hook`` refuses what it can tell is async, and a handler that hands back an awaitable anyway (a plain function
returning a coroutine) fails its job, retried and then dead with the reason, as any failing handler's.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import AsyncIterator

import pytest

from clerk_sync.changes import Change, Hook
from clerk_sync.hooks import Backoff, Dispatcher
from tests import factories as f
from tests.test_hooks import Clock, deliver, hooked, jobs

sent: list[str] = []


async def send_welcome(change: Change) -> None:
    sent.append(change.clerk_id)


class AsyncCallable:
    async def __call__(self, change: Change) -> None:
        sent.append(change.clerk_id)


async def streaming(change: Change) -> AsyncIterator[str]:
    yield change.clerk_id


@pytest.mark.parametrize("handler", [send_welcome, functools.partial(send_welcome), AsyncCallable(), streaming],
                         ids=["async def", "partial", "async __call__", "async generator"])
def test_hook_refuses_an_async_handler_saying_what_to_pass(handler: object) -> None:
    with pytest.raises(TypeError, match=r"async function.*never await.*asyncio.run") as refused:
        Hook("welcome", handler, on=["user.created"])  # type: ignore[arg-type]
    assert "'welcome'" in str(refused.value)


def test_plain_handlers_are_still_taken() -> None:
    class Plain:
        def __call__(self, change: Change) -> None:
            sent.append(change.clerk_id)

    for handler in (lambda change: None, Plain(), functools.partial(sent.append), print):
        assert Hook("ok", handler, on=["user.created"]).handler is handler


@pytest.mark.parametrize("timeout_s", [None, 30.0], ids=["in the dispatcher's thread", "in a run's thread"])
def test_a_handler_returning_a_coroutine_fails_its_job_instead_of_finishing_it(
        db_url: str, timeout_s: float | None) -> None:
    sent.clear()

    def looks_plain(change: Change) -> object:  # what Hook cannot tell: a plain function handing back a coroutine
        return send_welcome(change)

    clock = Clock()
    store = hooked(db_url, Hook("welcome", looks_plain, on=["user.created"],  # type: ignore[arg-type]
                                   timeout_s=timeout_s), now=clock)
    dispatcher = Dispatcher(store, backoff=Backoff(max_attempts=2, base_s=5), now=clock)
    deliver(store, f.envelope("user.created", f.user("user_1", 1_800_000_001_000)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (the coroutine closed, not left "never awaited")
        assert dispatcher.run_once() == 1
        if timeout_s is not None:
            dispatcher.drain()  # (the run's outcome recorded at the next turn)
        clock.advance(5)
        dispatcher.drain()
    (job,) = jobs(store)
    assert (job["status"], job["attempts"]) == ("dead", 2), job
    assert job["last_error"].startswith("TypeError: the handler returned coroutine (an async handler?)"), job
    assert sent == []
