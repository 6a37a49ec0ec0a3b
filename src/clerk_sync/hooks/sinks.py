"""Built-in hook handlers that forward each applied change to an app that is not in Python.

They run after the commit, from the outbox: when a change arrives, the database already holds it.
Delivery is at least once (a retry after a timeout may repeat one), so receivers deduplicate on the
idempotency key (the ``webhook-id`` header, the stream entry's ``idempotency_key`` field, or the AMQP
message's ``message_id``).

A sink's hook that names Clerk event types clerk-sync does not mirror (``on=["subscription.*"]``) forwards
those events too, as ``{"type", "idempotency_key", "data": {"event", "svix_id", "timestamp", "subject",
"data"}}`` (:func:`change_message`; docs/FORWARDING.md). ``"*"`` forwards the mirrored changes only.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import httpx
from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook

from clerk_sync._http_deadline import attempt_until, install, retry_after
from clerk_sync.changes import Change, Event
from clerk_sync.config import _webhook_key
from clerk_sync.errors import ConfigError, HookGaveUp, HookRetryLater

if TYPE_CHECKING:
    import pika
    import redis

__all__ = ["RabbitMQSink", "RedisStreamSink", "StandardWebhookSink", "change_message"]


def change_message(change: Change | Event) -> dict[str, Any]:
    """The JSON the sinks send: ``{"type", "idempotency_key", "data": {entity, clerk_id, kind, version,
    values, previous}}`` for a change (``redacted: true`` beside them when an erasure emptied them); for an
    unmirrored event (:class:`~clerk_sync.changes.Event`) ``"data": {event, svix_id, timestamp, subject, data}``
    (``data``: Clerk's payload ``data``)."""
    return {"type": change.type, "idempotency_key": change.idempotency_key, "data": change.to_json()}


class StandardWebhookSink:
    """POSTs each change to ``url``, signed per Standard Webhooks (``webhook-id``/``-timestamp``/
    ``-signature``); any answer but 2xx is a failure the dispatcher retries, except 410 Gone or a
    ``webhook-delivery: disable`` / ``abort-message`` header (Svix's delivery control), after which the job
    is dead at once (:class:`~clerk_sync.errors.HookGaveUp`). A 429 or 503 with ``Retry-After`` is retried
    no earlier than the receiver asked (:class:`~clerk_sync.errors.HookRetryLater`).

    ``secret`` is a ``whsec_…`` key the receiver verifies with (any Standard Webhooks library): ``whsec_`` +
    standard base64; one with other characters (URL-safe ``-``/``_``, spaces) is a
    :class:`~clerk_sync.errors.ConfigError` here, where the library would sign with a different key. While
    rotating, pass a list of secrets: each delivery carries one signature per secret (space-separated in
    ``webhook-signature``, as the spec allows), so a receiver holding either the old or the new one verifies.
    ``timeout_s`` bounds each network wait and the attempt as a whole, from connecting to the answer's
    status and headers: every socket wait is cut to what is left of it (``clerk_sync._http_deadline``), so
    a receiver that drips its header block byte by byte, or sends ``100 Continue`` forever, is cut off there
    and the attempt fails with a :class:`TimeoutError` naming ``timeout_s`` (the dispatcher retries it). A
    success's body is read for at most what is left (to keep the connection), an error's start for the
    job's last error. The outcome is the status's alone: a body that cannot be read or decoded (a bad gzip,
    a connection cut mid-body, an unknown charset) neither undoes a success nor hides a 410. Answers are
    asked for uncompressed (``accept-encoding: identity``) and their bodies are read as sent, never decoded:
    a receiver that compresses anyway (``Content-Encoding: gzip, gzip``: a few hundred bytes that inflate to
    hundreds of MB) is quoted as such, not inflated. A ``client`` of your own keeps its own per-wait
    timeouts, within ``timeout_s``. A ``url`` that is not http(s) with a host, or a ``timeout_s`` that is not
    more than 0 and at most a day, is refused here (:class:`~clerk_sync.errors.ConfigError`,
    :class:`ValueError`), not by every delivery for hours.

    A refusal's message names the URL without its ``user:password@``, query or fragment (where tokens
    go) and quotes the start of the answer: it is the job's last error, which erasure redacts. It is
    raised from an :class:`httpx.HTTPStatusError`, whose status the dispatcher's log line shows.
    """

    def __init__(self, url: str, secret: str | SecretStr | Sequence[str | SecretStr], *,
                 client: httpx.Client | None = None, timeout_s: float = 10.0,
                 now: Callable[[], float] = time.time) -> None:
        _check_timeout(timeout_s)
        # a typo here would fail every delivery, each retried for hours: refused now (a path on a client's base_url
        # as that client sends it)
        resolved = str(client.base_url.join(url)) if client is not None and client.base_url else url
        _check_url(resolved)
        secrets = [secret] if isinstance(secret, str | SecretStr) else list(secret)  # one secret, not its characters
        if not secrets:
            raise ConfigError(f"StandardWebhookSink's secret is an empty list. {_KEY_HELP}")
        names = ["StandardWebhookSink's secret" + (f" #{i}" if len(secrets) > 1 else "")
                 for i in range(1, len(secrets) + 1)]
        # Webhook(str) would decode leniently (dropping what is not base64): each gets the strictly checked key.
        self._signers = [Webhook(_webhook_key(s.get_secret_value() if isinstance(s, SecretStr) else s,
                                              name=name, fix=_KEY_HELP))
                         for s, name in zip(secrets, names, strict=True)]
        self.url = url
        self._shown = _without_secrets(resolved)  # (whose answer, in the job's last error: the whole URL)
        self.timeout_s = timeout_s
        self._client = client or httpx.Client(timeout=timeout_s)
        install(self._client)  # its sockets wait no longer than what is left of an attempt's timeout_s
        self._now = now

    def __call__(self, change: Change | Event) -> None:
        body = json.dumps(change_message(change), separators=(",", ":"))
        stamp = datetime.fromtimestamp(int(self._now()), UTC)
        headers = {
            "content-type": "application/json",
            "webhook-id": change.idempotency_key,
            "webhook-timestamp": str(int(stamp.timestamp())),
            # one signature per secret, space-separated: the receiver accepts the delivery if any matches
            "webhook-signature": " ".join(signer.sign(change.idempotency_key, stamp, body) for signer in self._signers),
            "accept-encoding": "identity",  # httpx asks for gzip: a small answer could inflate to far more
        }
        deadline = time.monotonic() + self.timeout_s
        try:
            with (attempt_until(deadline),
                  self._client.stream("POST", self.url, content=body.encode(), headers=headers,
                                     follow_redirects=False) as response):  # (whatever client was given)
                if response.is_success:  # its body is read (a short one, the usual) only so the connection is kept
                    _read_start(response, deadline, limit=_KEEP_ALIVE_BODY)
                    return
                start = _read_start(response, deadline)
        except httpx.TimeoutException as exc:
            # httpx's message says which wait ("timed out", or the attempt's deadline cut it): the job's last
            # error says whose answer and which bound, and the dispatcher retries the job.
            raise TimeoutError(f"{self._shown} gave no answer within timeout_s={self.timeout_s:g}s "
                               f"({type(exc).__name__}: {str(exc) or 'timed out'})") from exc
        except httpx.TransportError as exc:  # refused, reset, unresolvable: whose, in the job's last error too
            raise ConnectionError(f"{self._shown} could not be reached ({type(exc).__name__}: "
                                  f"{str(exc) or 'no detail'}); the job is retried") from exc
        answered = f"{self._shown} answered {response.status_code}"
        refused = httpx.HTTPStatusError(answered, request=response.request, response=response)
        said = f"{answered}: {start}"
        control = response.headers.get("webhook-delivery", "").strip().lower()
        if response.status_code == 410 or control in ("disable", "abort-message"):
            # Standard Webhooks: 410 Gone means "stop sending"; Svix's receivers may say the same with
            # ``webhook-delivery: disable`` (the endpoint) or ``abort-message`` (this change). Retrying for
            # hours would only repeat it: dead now, ``clerk-sync hooks retry`` once the receiver is back.
            raise HookGaveUp(f"{said} (the receiver asked not to be sent this again: the job is dead, not "
                             "retried; fix the receiver, then `clerk-sync hooks retry`)") from refused
        after = retry_after(response.headers, default=0.0, cap=_MAX_RETRY_AFTER_S)
        if response.status_code in (429, 503) and after > 0:
            # The receiver's own pause (overloaded, rate limited, deploying): the next attempt waits for it,
            # not only for the backoff's next step, which after an outage is seconds (Dispatcher, Backoff).
            raise HookRetryLater(f"{said} (Retry-After: {after:g} s)", after_s=after) from refused
        raise RuntimeError(said) from refused

    def close(self) -> None:
        self._client.close()


_MAX_RETRY_AFTER_S = 86400.0  # a day: longer is the receiver's mistake (the job's backoff caps it again)


def _without_secrets(url: str) -> str:
    """``scheme://host[:port]/path`` of ``url``: no ``user:password@``, query (``?token=``) or fragment."""
    parsed = httpx.URL(url)
    path = parsed.raw_path.split(b"?", 1)[0].decode("ascii")
    return f"{parsed.scheme}://{parsed.netloc.decode('ascii')}{path}"


def _check_url(url: str) -> None:
    """Refuse a URL no delivery could be sent to, saying why."""
    why = _unsendable(url)
    if why:
        raise ConfigError(f"StandardWebhookSink: not a URL a webhook can be sent to ({why}); expected the "
                          "receiver's http or https URL, e.g. 'https://example.com/clerk-hooks'")


def _unsendable(url: str) -> str:
    """Why ``url`` is not an http(s) URL with a host (never quoting it: it may hold a password), or ``""``."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:  # names the bad part (a port, a character), not a password
        return f"{type(exc).__name__}: {exc}"
    if "://" not in url:  # "localhost:8080/hook" reads as the scheme "localhost"
        return "no scheme: it starts with neither 'https://' nor 'http://'"
    if parsed.scheme not in ("http", "https"):
        return f"the scheme is {parsed.scheme!r}, not http or https"
    if not parsed.host:
        return "it names no host"
    if parsed.port is not None and not 0 < parsed.port < 65536:
        return f"the port {parsed.port} is not 1-65535"
    if any(c.isspace() for c in url):
        return "it contains whitespace"
    return ""


def _check_timeout(timeout_s: object) -> None:
    if not (isinstance(timeout_s, int | float) and 0 < timeout_s <= _MAX_TIMEOUT_S):  # NaN and None too
        raise ValueError(f"timeout_s must be a number of seconds more than 0 and at most {_MAX_TIMEOUT_S:g} (a "
                         f"day), not {timeout_s!r}")


_MAX_TIMEOUT_S = 86400.0  # a day; sockets cannot wait past about 292 years (nanoseconds in 64 bits), inf at all
_KEEP_ALIVE_BODY = 64 * 1024  # a success's body read to its end up to this, so its connection is reused
_KEY_HELP = ("Pass the receiver's Standard Webhooks secret: 'whsec_' + the standard base64 of its key (e.g. "
             "'whsec_' + base64.b64encode(secrets.token_bytes(32)).decode()), the same string the receiver "
             "verifies with.")


def _read_start(response: httpx.Response, deadline: float, limit: int = 200) -> str:
    """The first ``limit`` bytes of an answer's body (an error's, for the job's last error), read until
    ``deadline`` at most (what came by then: the socket's wait is cut there too, a timeout that ends the read,
    not the answer); a body read to its end leaves the connection reusable. Never raises for the body: the
    status is in and decides the outcome.

    Read raw (as sent): httpx would decode any ``Content-Encoding`` in full, stacked ones too, so a
    compressed answer (though ``identity`` was asked for) is named, not inflated."""
    if response.is_stream_consumed:  # built in memory (a client of yours with a mock transport): read already
        got = response.content[:limit]
    else:
        got = b""
        try:
            for chunk in response.iter_raw():  # the network's chunks (64 KiB at most), however it is encoded
                got += chunk
                if len(got) >= limit or time.monotonic() >= deadline:
                    break
        except httpx.HTTPError:  # slow or cut short: it neither undoes a success nor hides a 410
            pass
        encoding = response.headers.get("content-encoding", "").strip()
        if encoding.lower() not in ("", "identity"):
            return f"(a body in Content-Encoding {encoding[:100]!r}, not decoded)"
    try:
        return got[:limit].decode(response.encoding or "utf-8", errors="replace")
    except LookupError:  # a charset Python knows only as a bytes codec (rot13, base64): not a text encoding
        return got[:limit].decode("utf-8", errors="replace")


class RedisStreamSink:
    """Appends each change to a Redis Stream (``XADD``), trimmed to about ``maxlen`` entries if set, through a
    synchronous ``client`` (``redis.Redis``; a ``redis.asyncio`` one is a :class:`~clerk_sync.errors.ConfigError`).

    Fields: ``type``, ``idempotency_key`` and ``change`` (the JSON of :func:`change_message`).

    Entries may be duplicated (at least once): a retried job appends again, and so can redis-py itself,
    retrying an ``XADD`` whose reply was lost; consumers deduplicate on ``idempotency_key``. The handler
    runs in the dispatcher's thread and waits as long as the client does: with redis-py's defaults (socket
    timeouts times retries with backoff) a Redis that stops answering holds the dispatcher up to about a
    minute per job, so build the client for it, e.g. ``redis.Redis.from_url(url, socket_timeout=2,
    socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))`` (``redis.retry``, ``redis.backoff``): the job
    fails fast, and the dispatcher's backoff retries it.

    ``maxlen`` trims the oldest entries whether or not every consumer has read them (a consumer that lags
    past it misses changes: size it for your slowest one). Without it the stream keeps every change,
    personal data included (e-mail addresses, names), until you trim it: ``clerk-sync users erase`` does
    not remove entries (with ``--hooks`` it queues a ``user.deleted`` for the consumers to act on).
    """

    def __init__(self, client: redis.Redis, stream: str = "clerk-sync:changes", *, maxlen: int | None = None) -> None:
        if maxlen is not None and maxlen < 1:  # 0 would trim the stream to (about) nothing
            raise ValueError(f"maxlen must be None (no trimming) or at least 1, not {maxlen}")
        if inspect.iscoroutinefunction(getattr(client, "execute_command", None)):
            # redis.asyncio: xadd would return a coroutine nobody awaits, the job done and the change lost
            raise ConfigError(f"RedisStreamSink needs a synchronous Redis client, not {type(client).__module__}."
                              f"{type(client).__qualname__} (hooks run in the dispatcher's thread, which awaits "
                              "nothing): pass redis.Redis.from_url(url), not redis.asyncio's")
        self.client = client
        self.stream = stream
        self.maxlen = maxlen

    def __call__(self, change: Change | Event) -> None:
        fields: dict[Any, Any] = {  # redis' own FieldT/EncodableT aliases are not public
            "type": change.type, "idempotency_key": change.idempotency_key,
            "change": json.dumps(change_message(change), separators=(",", ":")),
        }
        self.client.xadd(self.stream, fields, maxlen=self.maxlen, approximate=self.maxlen is not None)


class RabbitMQSink:
    """Publishes each change to a RabbitMQ exchange (AMQP 0-9-1, through pika: the ``rabbitmq`` extra), as a
    persistent JSON message (:func:`change_message`) with publisher confirms: a job is done only once the
    broker has confirmed the message, and routed it to at least one queue.

    The routing key is the change type (``user.created``, ``organizationMembership.deleted``,
    ``subscriptionItem.active`` for an unmirrored event the hook names; or ``routing_key(change)``, which then
    gets a :class:`~clerk_sync.changes.Event` for those), so consumers bind their queue to the topic exchange
    with a pattern (``user.*``, ``subscription.*``, ``#``). Message properties: ``message_id`` is the
    idempotency key (deduplicate on it: a job retried after a lost confirm publishes again), ``type`` the
    change type, ``content_type`` ``application/json``, ``app_id`` ``clerk-sync``, ``timestamp`` the publish
    time (seconds).

    ``declare`` (default) declares the exchange, durable and of type ``topic``, on each new connection;
    with ``declare=False`` it must exist (an exchange an operator owns). A message no queue is bound for is
    returned by the broker (``mandatory``) and the job fails, so a change is never dropped for want of a
    consumer: bind a queue and the dispatcher's retry delivers it.

    One connection and channel are kept between jobs, and the one the broker closed while idle (its
    heartbeat timeout, a restart) is opened again before the next publish. A failure (broker down,
    refused, unroutable, not confirmed) is raised for the dispatcher to retry, its message naming the
    broker without the password. ``timeout_s`` bounds connecting (``socket_timeout``, ``stack_timeout``)
    and a broker that blocks publishers (``blocked_connection_timeout``: a memory or disk alarm), unless the
    URL's query sets them; a broker that stops answering mid-publish is noticed by the AMQP heartbeat
    (the broker's proposal, 60 s by default; ``?heartbeat=`` in the URL), so give the hook a
    ``timeout_s`` too if the dispatcher's other jobs must not wait that long. Safe to call from several
    threads (one publish at a time).
    """

    def __init__(self, url: str = "amqp://guest:guest@127.0.0.1:5672/%2F", exchange: str = "clerk-sync", *,
                 routing_key: Callable[[Any], str] | None = None, declare: bool = True,
                 timeout_s: float = 10.0, now: Callable[[], float] = time.time) -> None:
        try:
            import pika  # (the rabbitmq extra: imported here, so the module loads without it)
        except ImportError as exc:
            raise ConfigError("RabbitMQSink needs pika: pip install 'clerk-sync[rabbitmq]'") from exc
        _check_timeout(timeout_s)
        self._pika = pika
        try:
            if urlsplit(url).scheme not in ("amqp", "amqps"):
                raise ValueError("the scheme must be amqp or amqps")
            params = pika.URLParameters(url)
        except Exception as exc:  # pika raises ValueError, TypeError.. naming the bad part, never the password
            raise ConfigError(f"RabbitMQSink: not an AMQP URL ({type(exc).__name__}: {exc}); expected e.g. "
                              "'amqp://user:password@host:5672/%2F'") from None
        given = parse_qs(urlsplit(url).query)
        for name in ("socket_timeout", "stack_timeout", "blocked_connection_timeout"):
            if name not in given:
                setattr(params, name, timeout_s)
        if "client_properties" not in given:  # how the connection is named in the broker's own UI and logs
            params.client_properties = {"connection_name": f"clerk-sync {exchange}"}
        self._params = params
        self.where = f"amqp://{params.host}:{params.port}/{params.virtual_host.lstrip('/') or '%2F'}"
        self.exchange = exchange
        self.timeout_s = timeout_s
        self._routing_key = routing_key or _change_type
        self._declare = declare
        self._now = now
        self._lock = threading.Lock()
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None  # pika's BlockingChannel, confirms on

    def __call__(self, change: Change | Event) -> None:
        pika = self._pika
        errors = pika.exceptions
        key = self._routing_key(change)
        body = json.dumps(change_message(change), separators=(",", ":")).encode()
        properties = pika.BasicProperties(
            content_type="application/json", delivery_mode=pika.DeliveryMode.Persistent, app_id="clerk-sync",
            message_id=change.idempotency_key, type=change.type, timestamp=int(self._now()))
        what = f"{change.type} {change.idempotency_key!r} (exchange {self.exchange!r}, routing key {key!r})"
        with self._lock:
            try:
                self._open().basic_publish(self.exchange, key, body, properties, mandatory=True)
            except errors.UnroutableError:
                raise RuntimeError(
                    f"{self.where} routed no queue for {what}: bind a queue to the exchange (e.g. with the "
                    "pattern '#'); the change is kept and retried, not dropped") from None
            except errors.NackError:
                raise RuntimeError(f"{self.where} did not confirm {what} (nack: the broker could not take it); "
                                   "retried") from None
            except errors.ChannelClosedByBroker as exc:
                self._channel = None  # the connection stays; a new channel next time
                raise RuntimeError(f"{self.where} refused {what}: {exc.reply_code} {exc.reply_text}"
                                   f"{_AMQP_HINT.get(exc.reply_code, '')}") from None
            except (errors.AMQPError, OSError) as exc:  # down, cut, refused login, blocked past timeout_s
                self._drop()
                said = str(exc) or repr(exc.args[0] if exc.args else "connection lost")  # (pika's str is often empty)
                raise ConnectionError(f"RabbitMQ at {self.where} could not take {what}: {type(exc).__name__}: "
                                      f"{said}; retried") from None

    def _open(self) -> Any:
        """The channel to publish on: the kept one, or a new connection's when the broker closed it."""
        errors = self._pika.exceptions
        if self._connection is not None:
            try:  # what the broker sent while idle: heartbeats, or its close (a restart, a missed heartbeat)
                self._connection.process_data_events(0)
            except (errors.AMQPError, OSError):
                self._drop()
        if self._connection is None or not self._connection.is_open:
            self._drop()
            self._connection = self._pika.BlockingConnection(self._params)
        if self._channel is None or not self._channel.is_open:
            channel = self._connection.channel()
            channel.confirm_delivery()
            if self._declare:
                channel.exchange_declare(self.exchange, exchange_type="topic", durable=True)
            self._channel = channel
        return self._channel

    def _drop(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            with contextlib.suppress(Exception):  # closing what is already broken: nothing more to do
                connection.close()

    def close(self) -> None:
        with self._lock:
            self._drop()


def _change_type(change: Change | Event) -> str:
    return change.type


_AMQP_HINT = {
    404: ": the exchange does not exist (declare=False: create it, or let the sink declare it)",
    403: ": the user may not write to this exchange (its permissions on the vhost)",
    406: ": the exchange exists with another type or durability than a durable topic exchange (pass "
         "declare=False to use it as it is)",
}
