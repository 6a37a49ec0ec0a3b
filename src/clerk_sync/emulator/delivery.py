"""Svix-style webhook delivery: signing, a background worker, retries, faults and a log.

Every event becomes a *message* with a ``msg_`` id.  Worker threads send due attempts, so the
API never waits for the receiver: one by default (messages go one at a time, in order), or
the ``delivery_concurrency`` fault knob's number of them (changeable at run time), as Svix delivers a regular
endpoint's messages independently and concurrently (never one message twice at once).  A failed attempt
(non-2xx, timeout, connection error, injected failure) is retried on the Svix schedule divided by
``time_scale``, with the same ``svix-id`` and a new ``svix-timestamp`` and signature. As Svix's worker does, a
timeout or a 429 waits at least :data:`OVERLOAD_PENALTY_S`, and a ``Retry-After`` answer (seconds or an HTTP
date) is honoured within [the scheduled delay, twice it]: it can lengthen a retry, never shorten it. Svix's
±20 % jitter is the ``jitter`` knob (``EmulatorConfig.retry_jitter``; off by default, so the schedule is exact).

:meth:`Deliverer.rotate_secret` is the Dashboard's "rotate signing secret": for ``grace_s`` (Svix: 24 h) every
attempt is signed with the new secret and the previous one, ``svix-signature: v1,<new> v1,<old>``.

``set_url(None)`` pauses deliveries ("the webhook is late"): messages are queued as usual (faults rolled,
retries kept) but no attempt is made; the next ``set_url(url)`` sends them, in order, as it would have;
:meth:`Deliverer.clear` (``reset()``) drops them.  While paused, :meth:`Deliverer.wait_idle` raises
instead of waiting for messages that cannot go anywhere.  Without a URL ever set (no pause), a message
is logged ``no_endpoint`` and not sent (replayable).

Injected faults, decided per message from the seeded generator when it is queued:

* ``duplicate``: after the first successful attempt the message is sent once more.
* ``reorder``: the message is held back and sent right after the next message (or after
  ``reorder_hold_s`` if no other message comes).
* ``drop_then_redeliver``: the first attempt is not sent and counts as a failure.
* ``fail`` (rolled per attempt): the attempt is not sent and counts as a failure.

Not emulated: ``webhook-delivery: disable`` disabling the endpoint (it aborts the message, as ``abort-message``).
"""

from __future__ import annotations

import heapq
import json
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from standardwebhooks.webhooks import Webhook

from .config import webhook_signer
from .faults import Faults

__all__ = ["OVERLOAD_PENALTY_S", "SECRET_ROTATION_GRACE_S", "Attempt", "Deliverer", "Message", "sign_headers"]

JSON = dict[str, Any]
_USER_AGENT = "Svix-Webhooks/1.0 (clerk-sync emulator)"
#: Svix's least delay after an attempt that timed out or was answered 429 (``OVERLOAD_PENALTY_SECS``).
OVERLOAD_PENALTY_S = 60.0
#: How long a rotated-out webhook secret still signs (Svix: "valid for the next 24 hours").
SECRET_ROTATION_GRACE_S = 86400.0


def sign_headers(secret: str, msg_id: str, timestamp: int, body: str) -> dict[str, str]:
    """The three ``svix-*`` headers for one attempt, signed with standardwebhooks' HMAC."""
    return _signed(webhook_signer(secret), msg_id, timestamp, body)


def _signed(signer: Webhook | list[Webhook], msg_id: str, timestamp: int, body: str) -> dict[str, str]:
    """One ``v1,<sig>`` per signer, space-separated (Svix signs with every valid endpoint secret)."""
    when = datetime.fromtimestamp(timestamp, tz=UTC)
    signature = " ".join(s.sign(msg_id, when, body) for s in (signer if isinstance(signer, list) else [signer]))
    return {"svix-id": msg_id, "svix-timestamp": str(timestamp), "svix-signature": signature}


def _retry_after_s(value: str | None, now: float) -> float | None:
    """A ``Retry-After`` header as seconds from ``now`` (delta-seconds or an HTTP date), None if absent or bad."""
    if not value or not value.strip():
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():  # ("²".isdigit() too, which float() refuses)
        return float(text)
    try:
        when = parsedate_to_datetime(text)  # (GMT: the asctime form parses naive, not in the host's zone)
        return max((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp() - now, 0.0)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


@dataclass
class Attempt:
    """One delivery attempt as the log shows it."""

    number: int
    timestamp: int
    outcome: str  # succeeded | failed | timeout | error | dropped | injected_failure
    status_code: int | None = None
    error: str | None = None
    duration_ms: float = 0.0
    duplicate: bool = False
    manual: bool = False


@dataclass
class Message:
    """A webhook message and its delivery history."""

    id: str
    event_type: str
    body: str
    created_at: float
    status: str = "pending"  # pending (also while paused) | held | succeeded | failed | no_endpoint
    attempts: list[Attempt] = field(default_factory=list)
    next_attempt_at: float | None = None
    failures: int = 0
    duplicate: bool = False
    drop_first: bool = False
    duplicated: bool = False
    manual: bool = False
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def summary(self, include_payload: bool = False) -> JSON:
        out: JSON = {
            "id": self.id,
            "type": self.event_type,
            "status": self.status,
            "created_at": self.created_at,
            "next_attempt_at": self.next_attempt_at,
            "attempts": [asdict(a) for a in self.attempts],
            "statuses": [a.status_code for a in self.attempts],
            "faults": [n for n, on in (("duplicate", self.duplicate), ("drop_then_redeliver", self.drop_first)) if on],
        }
        if include_payload:
            out["payload"] = json.loads(self.body)
        return out


@dataclass(order=True)
class _Due:
    at: float
    seq: int
    message_id: str = field(compare=False)
    duplicate: bool = field(default=False, compare=False)


class Deliverer:
    """Queues, signs and sends webhook messages from one background thread."""

    def __init__(
        self,
        *,
        secret: str,
        url: str | None,
        faults: Faults,
        new_id: Callable[[], str],
        schedule: tuple[float, ...],
        timeout_s: float = 15.0,
        reorder_hold_s: float = 0.5,
        clock: Callable[[], float] = time.time,
        jitter: float = 0.0,
    ) -> None:
        self.secret = secret
        self._signer = webhook_signer(secret)  # here, so a bad secret fails at start-up, not in the worker
        self._configured_secret = secret
        self._retired: list[tuple[Webhook, float]] = []  # rotated-out secrets' signers, until when they still sign
        self._jitter = jitter
        self._url = url
        self._endpoint = url  # the last URL deliveries went to: a pause (set_url(None)) keeps it
        self._paused = False  # set_url(None): messages queue up, unsent, until the next set_url(url) or clear()
        self._waited = 0  # messages (in creation order) a wait_idle has already checked for no_endpoint
        self._faults = faults
        self._new_id = new_id
        self._schedule = schedule
        self._timeout_s = timeout_s
        self._reorder_hold_s = reorder_hold_s
        self._clock = clock
        self._cond = threading.Condition()
        self._messages: dict[str, Message] = {}
        self._queue: list[_Due] = []
        self._seq = 0
        self._held: tuple[str, float] | None = None
        self._in_flight = 0
        self._busy: set[str] = set()  # ids of the messages an attempt is in flight for
        self._threads: list[threading.Thread] = []
        self._closing = False
        faults.on_change(self._concurrency_changed)

    def _concurrency_changed(self) -> None:
        """The knobs changed: more workers if ``delivery_concurrency`` grew and messages wait (fewer take
        effect as attempts finish: no worker starts one past the limit)."""
        with self._cond:
            if self._threads or self._queue:
                self._ensure_worker()
            self._cond.notify_all()

    # -- producer side -----------------------------------------------------------------

    @property
    def url(self) -> str | None:
        with self._cond:
            return self._url

    @property
    def endpoint(self) -> str | None:
        """The URL last set (the configured one, or a later :meth:`set_url`); a pause does not forget it."""
        with self._cond:
            return self._endpoint

    @property
    def paused(self) -> bool:
        """``set_url(None)`` is in force: messages are held, unsent, until the next URL."""
        with self._cond:
            return self._paused

    def set_url(self, url: str | None) -> None:
        """Point deliveries at a new endpoint (messages already queued follow it). ``None`` pauses them ("the
        webhook is late"): new messages and due retries are held, unsent, until the next ``set_url(url)``,
        which sends them in order, or until :meth:`clear` drops them."""
        with self._cond:
            self._url = url
            self._paused = url is None
            if url is not None:
                self._endpoint = url
            self._cond.notify_all()  # wake the workers: held messages go now

    def resume(self) -> None:
        """Undo a pause: deliveries go to :attr:`endpoint` again (``POST /_emulator/reset``, after :meth:`clear`
        dropped the held messages)."""
        with self._cond:
            self._resume()

    def _resume(self) -> None:
        self._url = self._endpoint
        self._paused = False
        self._cond.notify_all()

    def rotate_secret(self, secret: str, *, grace_s: float = SECRET_ROTATION_GRACE_S) -> None:
        """Sign with ``secret`` from now on; the current one also signs for ``grace_s`` more seconds (on the
        emulator's clock), as Svix keeps a rotated-out secret valid for 24 hours. A bad secret: ``ValueError``."""
        signer = webhook_signer(secret)
        with self._cond:
            self._retired.append((self._signer, self._clock() + grace_s))
            self.secret, self._signer = secret, signer

    def _signers(self) -> list[Webhook]:
        """The current signer, then every rotated-out one still in its grace (holding the condition)."""
        now = self._clock()
        self._retired = [(s, until) for s, until in self._retired if now < until]
        return [self._signer, *(s for s, _ in reversed(self._retired))]

    def enqueue(self, event_type: str, envelope: JSON) -> Message:
        """Record a message and schedule its first attempt; never blocks on the network."""
        body = json.dumps(envelope, separators=(",", ":"))
        with self._cond:
            message = Message(self._new_id(), event_type, body, self._clock(), rng=self._faults.spawn())
            self._messages[message.id] = message
            if self._url is None and not self._paused:  # no URL was ever set: it goes nowhere (replayable)
                message.status = "no_endpoint"
                return message
            # paused or not, the same faults and the same place in the queue: a pause only delays the sends
            message.duplicate = self._faults.roll("duplicate_rate", message.rng)
            message.drop_first = self._faults.roll("drop_then_redeliver_rate", message.rng)
            reorder = self._faults.roll("reorder_rate", message.rng)
            hold = self._held is None and reorder
            self._schedule_at(message, self._clock())
            self._release_held()
            if hold:
                self._hold(message)
            return message

    def _hold(self, message: Message) -> None:
        self._queue = [d for d in self._queue if d.message_id != message.id]
        heapq.heapify(self._queue)
        message.status = "held"
        message.next_attempt_at = None
        self._held = (message.id, self._clock() + self._reorder_hold_s)
        self._cond.notify_all()

    def _release_held(self) -> None:
        if self._held is not None:
            held = self._messages[self._held[0]]
            self._held = None
            held.status = "pending"
            self._schedule_at(held, self._clock())

    def _schedule_at(self, message: Message, at: float, *, duplicate: bool = False) -> None:
        self._seq += 1
        if not duplicate:
            message.next_attempt_at = at
        heapq.heappush(self._queue, _Due(at, self._seq, message.id, duplicate))
        self._ensure_worker()
        self._cond.notify_all()

    def replay(self, message_ids: Iterable[str] | None = None, *, status: str | None = None) -> list[str]:
        """Send messages again now (one manual attempt each, not retried, as Svix resends)."""
        wanted = None if message_ids is None else set(message_ids)
        with self._cond:
            if self._url is None:
                return []
            chosen = [
                m
                for m in self._messages.values()
                if (wanted is None or m.id in wanted)
                and (status is None or m.status == status)
                and m.status not in {"pending", "held"}
            ]
            for message in chosen:
                message.manual = True
                message.status = "pending"
                self._schedule_at(message, self._clock())
            return [m.id for m in chosen]

    # -- introspection -----------------------------------------------------------------

    def log(self, include_payload: bool = False) -> list[JSON]:
        with self._cond:
            return [m.summary(include_payload) for m in self._messages.values()]

    def message(self, message_id: str) -> Message | None:
        with self._cond:
            return self._messages.get(message_id)

    def is_idle(self) -> bool:
        with self._cond:
            return not self._queue and self._held is None and self._in_flight == 0

    def wait_idle(self, timeout: float) -> None:
        """Block until nothing is queued, held or in flight.

        ``TimeoutError`` otherwise, naming each message still pending: its URL, last attempt and next one.
        ``RuntimeError`` while deliveries are paused (``set_url(None)``) and messages wait for a URL (they
        would never arrive: the wait says to set one, or reset), or if a message created since the previous
        wait was never sent because no webhook URL was ever set.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._held is not None or self._in_flight:
                if self._url is None and not self._in_flight:  # paused: nothing in flight, the rest waits for a URL
                    raise RuntimeError(_paused_report(self._waiting()))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(self._pending_report(timeout))
                self._cond.wait(min(remaining, 0.05))
            fresh = list(self._messages.values())[self._waited:]
            self._waited = len(self._messages)
            unrouted = [m for m in fresh if m.status == "no_endpoint"]
            if unrouted:
                raise RuntimeError(_unrouted_report(unrouted))

    def _waiting(self) -> list[Message]:
        """The messages with an attempt (or the duplicate send) queued or held back, in creation order
        (holding the condition)."""
        ids = {d.message_id for d in self._queue} | ({self._held[0]} if self._held else set())
        return [m for m in self._messages.values() if m.id in ids]

    def _pending_report(self, timeout: float) -> str:
        """Why the wait timed out, one line per message (holding the condition)."""
        now = self._clock()
        duplicates = {d.message_id for d in self._queue if d.duplicate}
        lines = []
        for message in self._messages.values():
            if message.status in {"pending", "held"}:
                lines.append(self._pending_line(message, now))
            elif message.id in duplicates:
                lines.append(f"{message.id} ({message.event_type}) -> {self._url}: the duplicate send "
                             "(duplicate_rate fault) is queued")
        if len(lines) > 20:
            lines[20:] = [f"... and {len(lines) - 20} more (GET /_emulator/deliveries lists them all)"]
        scale = self._faults.settings.time_scale
        schedule = ", ".join(f"{s:g}" for s in self._schedule)
        return (f"webhook deliveries still pending after {timeout:g} s:\n  " + "\n  ".join(lines)
                + f"\nFailed attempts are retried after Svix's delays ({schedule} s) divided by time_scale="
                f"{scale:g}: for tests, EmulatorServer(time_scale=1000) (or set_faults(time_scale=1000)) makes "
                "them milliseconds; or make the URL answer 2xx (is the app served there?)")

    def _pending_line(self, message: Message, now: float) -> str:
        head = f"{message.id} ({message.event_type}) -> {self._url or '(no webhook URL: paused)'}: "
        if message.attempts:
            last = message.attempts[-1]
            answer = f" HTTP {last.status_code}" if last.status_code is not None else ""
            error = f" {last.error}" if last.error else ""
            head += f"attempt {last.number} {last.outcome}{answer}{error}"
        else:
            head += "no attempt yet"
        if message.status == "held":
            return head + "; held back by the reorder fault until the next message (or reorder_hold_s)"
        if message.next_attempt_at is None:
            return head
        when = datetime.fromtimestamp(message.next_attempt_at, tz=UTC).isoformat(timespec="seconds")
        left = message.next_attempt_at - now
        due = f"in {left:.1f} s" if left > 0 else "due now (or in flight)"
        return head + f"; next attempt {due}, at {when} (next_attempt_at={message.next_attempt_at:.3f})"

    def clear(self) -> None:
        """Forget every message, those held by a pause included, and end the pause: deliveries go to
        :attr:`endpoint` again (``POST /_emulator/reset``)."""
        with self._cond:
            self._messages.clear()
            self._queue.clear()
            self._held = None
            self._waited = 0
            self.secret, self._signer = self._configured_secret, webhook_signer(self._configured_secret)
            self._retired = []
            self._resume()

    # -- worker side -------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        """Start the workers (holding the condition), all ``delivery_concurrency`` of them at the first message."""
        while len(self._threads) < self._faults.delivery_concurrency() and not self._closing:
            name = "clerk-emulator-webhooks" + (f"-{len(self._threads)}" if self._threads else "")
            thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the workers (pending messages stay in the log)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0))

    def _next_due(self) -> _Due | None:
        """Wait for the next due attempt of a message no other worker is sending (holding the condition);
        None when closing."""
        while not self._closing:
            now = self._clock()
            if self._held is not None and self._held[1] <= now:
                self._release_held()
            skipped: list[_Due] = []
            found = None
            free = self._in_flight < self._faults.delivery_concurrency()  # lowered at run time: wait for a slot
            while free and self._url is not None and self._queue and self._queue[0].at <= now:  # paused: none goes
                due = heapq.heappop(self._queue)
                if due.message_id in self._busy:
                    skipped.append(due)  # its message is in flight: it waits for that attempt to finish
                    continue
                found = due
                break
            for due in skipped:
                heapq.heappush(self._queue, due)
            if found is not None:
                self._in_flight += 1
                self._busy.add(found.message_id)
                return found
            # the first attempt not yet due (due ones left are busy: their worker's notify wakes this one; while
            # paused, set_url's notify does)
            later = [d.at - now for d in self._queue if d.at > now] if self._url is not None else []
            waits = [min(later)] if later else []
            waits += [self._held[1] - now] if self._held else []
            self._cond.wait(max(min([*waits, 1.0]), 0.001))
        return None

    def _run(self) -> None:
        with httpx.Client(timeout=self._timeout_s, follow_redirects=False) as client:
            while True:
                with self._cond:
                    due = self._next_due()
                    if due is None:
                        return
                    message = self._messages.get(due.message_id)
                    url = self._url  # never None here: a paused worker takes nothing from the queue
                try:
                    if message is not None and url is not None:
                        self._attempt_safely(client, url, message, due.duplicate)
                finally:
                    with self._cond:
                        self._in_flight -= 1
                        self._busy.discard(due.message_id)
                        self._cond.notify_all()

    def _attempt_safely(self, client: httpx.Client, url: str, message: Message, duplicate: bool) -> None:
        """One attempt; a bug in it fails that message (replayable) instead of stopping the worker,
        which would leave every later message pending forever."""
        recorded = len(message.attempts)
        try:
            self._attempt(client, url, message, duplicate)
        except Exception as exc:  # any bug: see the docstring
            with self._cond:
                if len(message.attempts) == recorded:
                    number, now = recorded + 1, int(self._clock())
                    message.attempts.append(Attempt(number, now, "error", duplicate=duplicate, manual=message.manual))
                message.attempts[-1].error = f"emulator error: {exc!r}"
                if not duplicate:
                    message.status, message.next_attempt_at = "failed", None

    def _attempt(self, client: httpx.Client, url: str, message: Message, duplicate: bool) -> None:
        with self._cond:
            number = len(message.attempts) + 1
            timestamp = int(self._clock())
            injected = "dropped" if (message.drop_first and number == 1) else None
        if injected is None and not duplicate and self._faults.roll("fail_rate", message.rng):
            injected = "injected_failure"
        attempt = Attempt(number, timestamp, injected or "failed", duplicate=duplicate, manual=message.manual)
        abort, asked = False, None
        if injected is None:
            abort, asked = self._send(client, url, message, attempt)
        with self._cond:
            message.attempts.append(attempt)
            if not duplicate:
                self._settle(message, attempt, abort, asked)

    def _send(self, client: httpx.Client, url: str, message: Message,
              attempt: Attempt) -> tuple[bool, float | None]:
        """POST one attempt; fills ``attempt``; returns whether the receiver aborted retries, and its
        ``Retry-After`` in seconds (None without one)."""
        with self._cond:
            signers = self._signers()
        headers = _signed(signers, message.id, attempt.timestamp, message.body)
        headers.update({"content-type": "application/json", "user-agent": _USER_AGENT})
        started = time.monotonic()
        try:
            response = client.post(url, content=message.body.encode(), headers=headers)
        except httpx.TimeoutException as exc:
            attempt.outcome, attempt.error = "timeout", repr(exc)
            return False, None
        except httpx.HTTPError as exc:
            attempt.outcome, attempt.error = "error", repr(exc)
            return False, None
        finally:
            attempt.duration_ms = round((time.monotonic() - started) * 1000, 2)
        attempt.status_code = response.status_code
        attempt.outcome = "succeeded" if 200 <= response.status_code < 300 else "failed"
        abort = response.headers.get("webhook-delivery", "") in {"abort-message", "disable"}
        return abort, _retry_after_s(response.headers.get("retry-after"), self._clock())

    def retry_delay(self, failures: int, attempt: Attempt, asked_s: float | None,
                    rng: random.Random | None = None) -> float:
        """Seconds (before ``time_scale``) from the ``failures``-th failed attempt to the next, as Svix's worker
        computes it: the schedule's delay, at least :data:`OVERLOAD_PENALTY_S` after a timeout or a 429, the
        receiver's ``Retry-After`` kept within [that delay, twice it], then the ``jitter`` (± fraction). The
        order of the first two (the penalty raises the delay the clamp starts from) is this emulator's reading:
        the references name both rules, not which comes first."""
        delay = self._schedule[failures]
        if attempt.outcome == "timeout" or attempt.status_code == 429:
            delay = max(delay, OVERLOAD_PENALTY_S)
        if asked_s is not None:
            delay = min(max(asked_s, delay), 2 * delay)
        if self._jitter and rng is not None:
            delay *= rng.uniform(1 - self._jitter, 1 + self._jitter)
        return delay

    def _settle(self, message: Message, attempt: Attempt, abort: bool, asked_s: float | None = None) -> None:
        """Record the result of a regular attempt and schedule what comes next."""
        if attempt.outcome == "succeeded":
            message.status = "succeeded"
            message.next_attempt_at = None
            if message.duplicate and not message.duplicated:
                message.duplicated = True
                self._schedule_at(message, self._clock(), duplicate=True)
            return
        message.failures += 1
        if message.manual or abort or message.failures >= len(self._schedule):
            message.status = "failed"
            message.next_attempt_at = None
            return
        # the jitter's own generator (from the message id), so it draws nothing from the faults' streams
        jitter_rng = random.Random(f"{message.id}/{message.failures}") if self._jitter else None
        delay = self.retry_delay(message.failures, attempt, asked_s, jitter_rng) / self._faults.settings.time_scale
        message.status = "pending"
        self._schedule_at(message, self._clock() + delay)


def _paused_report(messages: list[Message]) -> str:
    shown = ", ".join(f"{m.id} ({m.event_type})" for m in messages[:5])
    more = f" and {len(messages) - 5} more" if len(messages) > 5 else ""
    return (f"{len(messages)} webhook message(s) are held, not sent: deliveries are paused (set_webhook_url(None), "
            f"or POST /_emulator/webhook {{\"url\": null}}), so they cannot arrive while you wait ({shown}{more}). "
            "To have them arrive (\"the webhook is late\"), set the URL again: set_webhook_url(\"http://127.0.0.1:"
            "<port>/webhooks/clerk\") sends them, in order, then call wait_for_deliveries(); reset() drops them. "
            "To check what the app does before they arrive, do it without waiting.")


def _unrouted_report(messages: list[Message]) -> str:
    shown = ", ".join(f"{m.id} ({m.event_type})" for m in messages[:5])
    more = f" and {len(messages) - 5} more" if len(messages) > 5 else ""
    return (f"{len(messages)} webhook message(s) were not delivered: no webhook URL is set ({shown}{more}). "
            "Call set_webhook_url(\"http://127.0.0.1:<port>/webhooks/clerk\") (or pass EmulatorServer("
            "webhook_url=...)) before the events happen; to send these now, replay them: "
            "POST /_emulator/deliveries/replay {\"status\": \"no_endpoint\"}")
