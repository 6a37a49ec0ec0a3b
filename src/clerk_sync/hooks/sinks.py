"""Built-in hook handlers that forward each applied change to an app that is not in Python.

Both run after the commit, from the outbox: when a change arrives, the database already holds it.
Delivery is at least once (a retry after a timeout may repeat one), so receivers deduplicate on the
idempotency key (the ``webhook-id`` header, or the stream entry's ``idempotency_key`` field).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook

from clerk_sync._http_deadline import attempt_until, install
from clerk_sync.changes import Change
from clerk_sync.config import _webhook_key
from clerk_sync.errors import ConfigError, HookGaveUp

if TYPE_CHECKING:
    import redis

__all__ = ["RedisStreamSink", "StandardWebhookSink", "change_message"]


def change_message(change: Change) -> dict[str, Any]:
    """The JSON both sinks send: ``{"type", "idempotency_key", "data": {entity, clerk_id, kind, version,
    values, previous}}``."""
    return {"type": change.type, "idempotency_key": change.idempotency_key, "data": change.to_json()}


class StandardWebhookSink:
    """POSTs each change to ``url``, signed per Standard Webhooks (``webhook-id``/``-timestamp``/
    ``-signature``); any answer but 2xx is a failure the dispatcher retries, except 410 Gone or a
    ``webhook-delivery: disable`` / ``abort-message`` header (Svix's delivery control), after which the job
    is dead at once (:class:`~clerk_sync.errors.HookGaveUp`).

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
    asked for uncompressed (``accept-encoding: identity``): a small compressed one could inflate to far more
    in memory. A ``client`` of your own keeps its own per-wait timeouts, within ``timeout_s``.

    A refusal's message names the URL without its ``user:password@``, query or fragment (where tokens
    go) and quotes the start of the answer: it is the job's last error, which erasure redacts. It is
    raised from an :class:`httpx.HTTPStatusError`, whose status the dispatcher's log line shows.
    """

    def __init__(self, url: str, secret: str | SecretStr | Sequence[str | SecretStr], *,
                 client: httpx.Client | None = None, timeout_s: float = 10.0,
                 now: Callable[[], float] = time.time) -> None:
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
        self.timeout_s = timeout_s
        self._client = client or httpx.Client(timeout=timeout_s)
        install(self._client)  # its sockets wait no longer than what is left of an attempt's timeout_s
        self._now = now

    def __call__(self, change: Change) -> None:
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
                  self._client.stream("POST", self.url, content=body.encode(), headers=headers) as response):
                if response.is_success:  # its body is read (a short one, the usual) only so the connection is kept
                    _read_start(response, deadline, limit=_KEEP_ALIVE_BODY)
                    return
                start = _read_start(response, deadline)
        except httpx.TimeoutException as exc:
            # httpx's message says which wait ("timed out", or the attempt's deadline cut it): the job's last
            # error says whose answer and which bound, and the dispatcher retries the job.
            raise TimeoutError(f"{_without_secrets(self.url)} gave no answer within timeout_s={self.timeout_s:g}s "
                               f"({type(exc).__name__}: {str(exc) or 'timed out'})") from exc
        answered = f"{_without_secrets(self.url)} answered {response.status_code}"
        refused = httpx.HTTPStatusError(answered, request=response.request, response=response)
        said = f"{answered}: {start}"
        control = response.headers.get("webhook-delivery", "").strip().lower()
        if response.status_code == 410 or control in ("disable", "abort-message"):
            # Standard Webhooks: 410 Gone means "stop sending"; Svix's receivers may say the same with
            # ``webhook-delivery: disable`` (the endpoint) or ``abort-message`` (this change). Retrying for
            # hours would only repeat it: dead now, ``clerk-sync hooks retry`` once the receiver is back.
            raise HookGaveUp(f"{said} (the receiver asked not to be sent this again: the job is dead, not "
                             "retried; fix the receiver, then `clerk-sync hooks retry`)") from refused
        raise RuntimeError(said) from refused

    def close(self) -> None:
        self._client.close()


def _without_secrets(url: str) -> str:
    """``scheme://host[:port]/path`` of ``url``: no ``user:password@``, query (``?token=``) or fragment."""
    parsed = httpx.URL(url)
    path = parsed.raw_path.split(b"?", 1)[0].decode("ascii")
    return f"{parsed.scheme}://{parsed.netloc.decode('ascii')}{path}"


_KEEP_ALIVE_BODY = 64 * 1024  # a success's body read to its end up to this, so its connection is reused
_KEY_HELP = ("Pass the receiver's Standard Webhooks secret: 'whsec_' + the standard base64 of its key (e.g. "
             "'whsec_' + base64.b64encode(secrets.token_bytes(32)).decode()), the same string the receiver "
             "verifies with.")


def _read_start(response: httpx.Response, deadline: float, limit: int = 200) -> str:
    """The first ``limit`` bytes of an answer's body (an error's, for the job's last error), read until
    ``deadline`` at most (what came by then: the socket's wait is cut there too, a timeout that ends the read,
    not the answer); a body read to its end leaves the connection reusable. Never raises for the body: the
    status is in and decides the outcome."""
    got = b""
    try:
        for chunk in response.iter_bytes():
            got += chunk
            if len(got) >= limit or time.monotonic() >= deadline:
                break
    except httpx.HTTPError:  # slow, cut short, or not decodable: it neither undoes a success nor hides a 410
        pass
    try:
        return got[:limit].decode(response.encoding or "utf-8", errors="replace")
    except LookupError:  # a charset Python knows only as a bytes codec (rot13, base64): not a text encoding
        return got[:limit].decode("utf-8", errors="replace")


class RedisStreamSink:
    """Appends each change to a Redis Stream (``XADD``), trimmed to about ``maxlen`` entries if set.

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
        self.client = client
        self.stream = stream
        self.maxlen = maxlen

    def __call__(self, change: Change) -> None:
        fields: dict[Any, Any] = {  # redis' own FieldT/EncodableT aliases are not public
            "type": change.type, "idempotency_key": change.idempotency_key,
            "change": json.dumps(change_message(change), separators=(",", ":")),
        }
        self.client.xadd(self.stream, fields, maxlen=self.maxlen, approximate=self.maxlen is not None)
