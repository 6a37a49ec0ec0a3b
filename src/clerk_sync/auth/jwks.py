"""Where session-token keys come from: a PEM (networkless) or Clerk's JWKS, cached.

Rotation versus flooding: a token with an unknown ``kid`` refetches the JWKS once the last fetch is
``min_refetch_s`` old (a few seconds), so a key Clerk has just rotated in verifies almost at once even
right after start-up. A refetch that does *not* find the kid (a forged or random kid, a token of another
Clerk instance) counts as a miss: after ``misses_per_cooldown`` (3) misses within ``cooldown_s``, no unknown
kid fetches again until the oldest of them is that old, so a flood of random kids costs at most three
fetches per cooldown (PyJWT refetches for every unknown kid, which lets an unauthenticated client turn each
request into an upstream call), while a stray one (a developer's token of another instance, a bot) no longer
holds a rotated key's tokens at 401 for the whole cooldown (a soak test: ~70 valid requests refused after a
rotation behind one forged token). Requests whose kid is cached never wait on a fetch; one whose
kid is not held waits for a fetch already in flight that can find it: while no key is held at all (the
first fetch after start-up above all), or a refetch for an unknown kid (a key rotated in). The async path
waits in a worker thread of its own small limiter (:mod:`~clerk_sync.auth.sessions`), never in the
default one the app's threaded work shares; during a TTL refresh, an unknown kid is answered at once from
the keys held. A caller that waited for a fetch takes that fetch's outcome (its keys, or none: 503 at
once) and does not fetch again, and the floor counts from a fetch's *end*: with the JWKS unreachable,
requests arriving during a fetch all answer when it fails, and the endpoint is hit once per floor, not
once per request in a queue each waiting a timeout longer. ``fetch_timeout_s`` bounds a fetch as a whole
(connecting, the answer's headers and its body; :mod:`clerk_sync._http_deadline` cuts each socket wait to what is
left of it), so a JWKS answer dripping in a byte every few seconds cannot hold the lock, and every request
waiting on it, for minutes; a body of more than 1 MiB is refused.

While no key is loaded at all (the JWKS unreachable since start-up, or empty), every token is refused
with :class:`~clerk_sync.errors.TokenKeysUnavailable` (503, retry), not only the one whose fetch
failed: a 401 in between would tell front ends their users are signed out during an outage.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import httpx
import structlog
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt import PyJWK
from jwt.exceptions import PyJWTError

from clerk_sync._http_deadline import attempt_until, install
from clerk_sync._limits import show
from clerk_sync._urls import masked_url
from clerk_sync.errors import ConfigError, TokenKeysUnavailable, TokenKeyUnknown
from clerk_sync.metrics import Metrics

log = structlog.get_logger("clerk_sync.auth")

__all__ = ["JWKSKeySource", "KeySource", "NeedsFetch", "StaticKeySource"]

_MAX_JWKS_BYTES = 1024 * 1024  # 1 MiB, the most of a JWKS answer read: Clerk's is a few KB, more is not held


class NeedsFetch(Exception):
    """The kid is unknown and a fetch is allowed, or one that can find it is in flight; or the keys are past
    their TTL: the async caller should retry off the event loop (where it fetches, or waits for the fetch in
    flight). ``waits``: the retry may wait on the key source's lock (an unknown kid, a rotated key), so the
    caller runs it on a small limiter of its own; not so a TTL refresh (the lock is only tried)."""

    def __init__(self, *, waits: bool = True) -> None:
        super().__init__()
        self.waits = waits


class KeySource(Protocol):
    """Finds the RSA public key for a ``kid``."""

    def get(self, kid: str | None, *, allow_fetch: bool = True) -> RSAPublicKey: ...


class StaticKeySource:
    """``CLERK_JWT_KEY``: the PEM public key from the Dashboard; no network at all."""

    def __init__(self, pem: str) -> None:
        try:
            key = load_pem_public_key(_normalise_pem(pem).encode())
        except ValueError as exc:
            raise ConfigError(
                "CLERK_JWT_KEY is not a PEM public key (Clerk Dashboard -> API keys -> JWKS Public Key)"
            ) from exc
        if not isinstance(key, RSAPublicKey):
            raise ConfigError("CLERK_JWT_KEY must be an RSA public key")
        self._key = key

    def get(self, kid: str | None, *, allow_fetch: bool = True) -> RSAPublicKey:
        return self._key


def _normalise_pem(pem: str) -> str:
    # Env vars often carry the PEM on one line with literal "\n" sequences.
    return pem.replace("\\n", "\n").strip()


class JWKSKeySource:
    """Keys by kid from a JWKS URL, cached ``ttl_s``.

    An unknown kid refetches when the last fetch is ``min_refetch_s`` old, unless ``misses_per_cooldown``
    unknown kids missed within the last ``cooldown_s`` (see the module docstring). ``fetch_timeout_s`` is a
    fetch's whole time, from connecting to the body's last byte: the sockets of ``client``'s own transports wait
    no longer than what is left of it (:func:`clerk_sync._http_deadline.install`). ``metrics``: each fetch's
    outcome counts in ``clerk_sync_jwks_fetches_total`` (an :class:`~clerk_sync.auth.Authenticator` given
    metrics sets it on its verifier's key source).
    """

    def __init__(
        self,
        url: str,
        *,
        client: httpx.Client,
        headers: dict[str, str] | None = None,
        ttl_s: float = 300.0,
        cooldown_s: float = 30.0,
        min_refetch_s: float = 5.0,
        misses_per_cooldown: int = 3,
        fetch_timeout_s: float = 5.0,
        now: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        self.url = url
        self._shown = masked_url(url)  # (in messages and logs: credentials a proxy takes in the URL masked)
        self.metrics = metrics
        self._client = client
        install(client)  # its sockets wait no longer than what is left of a fetch's fetch_timeout_s
        self._headers = headers or {}
        # Which setting names the URL: the Backend API's /v1/jwks is fetched with the secret key (from
        # CLERK_API_URL), a CLERK_JWKS_URL is public and fetched without one.
        self._keyed = any(name.lower() == "authorization" for name in self._headers)
        self._url_setting = "CLERK_API_URL" if self._keyed else "CLERK_JWKS_URL"
        self._ttl = ttl_s
        self._cooldown = cooldown_s
        self._floor = min_refetch_s
        self._timeout = fetch_timeout_s
        self._now = now
        self._keys: dict[str, RSAPublicKey] = {}
        self._fetched_at: float | None = None
        self._last_attempt: float | None = None
        # when the last unknown-kid fetches that did not find their kid ended (the oldest first)
        self._misses: deque[float] = deque(maxlen=max(1, misses_per_cooldown))
        self._problem = f"the JWKS from {url} is not fetched yet"  # why there are no keys, while none
        self._lock = threading.Lock()
        self._ended = 0  # fetches ended (under the lock): a caller that waited on the lock sees whether one ran
        self._for_unknown = False  # the fetch in flight is an unknown kid's (or a rotated key's) refetch
        self.fetches = 0

    def get(self, kid: str | None, *, allow_fetch: bool = True) -> RSAPublicKey:
        key = self._keys.get(kid or "")
        if key is not None:
            if self._is_stale() and self._may_refresh():
                # Past the TTL: refresh so a key Clerk has withdrawn stops being trusted. Async callers
                # do it off the event loop (NeedsFetch); concurrent callers keep using the cached key.
                if not allow_fetch:
                    raise NeedsFetch(waits=False)
                self._refresh(wait=False, allowed=self._may_refresh)
                key = self._keys.get(kid or "")
                if key is None:
                    raise TokenKeyUnknown(f"key {show(kid)} is no longer in {self._shown}")
            return key
        if not allow_fetch:
            # A fetch in flight that can find the kid (the first one after start-up, above all: no key held
            # yet) is waited for off the event loop, as the sync path waits for it on the lock: refusing
            # meanwhile answered the first requests of an async worker 503 (no keys yet) or 401 (a kid just
            # rotated in). During a TTL refresh an unknown kid is answered from the keys held, at once.
            if self._off_the_loop():
                raise NeedsFetch
            key = self._keys.get(kid or "")  # a fetch that ended since the first look (keys set, lock released)
            if key is not None:
                return key
            raise self._unknown(f"no key with kid {show(kid)} (JWKS refetch on cooldown)")
        # An unknown kid (rotation) waits for a fetch already in flight.
        self._refresh(wait=True, allowed=self._may_fetch_unknown, kid=kid or "")
        key = self._keys.get(kid or "")
        if key is None:
            raise self._unknown(f"no key with kid {show(kid)} in {self._shown}")
        return key

    def renewed(self, kid: str | None, key: RSAPublicKey, *, allow_fetch: bool = True) -> RSAPublicKey | None:
        """The key now published for ``kid`` when it is no longer ``key``, whose signature did not verify; else
        None. Clerk's ``kid`` is the instance id, so a rotated key comes under the kid already cached: the JWKS
        is refetched once, on the same floor and cooldown as an unknown kid (a forged signature that finds the
        same key starts the cooldown: a flood of them costs one fetch per cooldown)."""
        current = self._keys.get(kid or "")
        if current is not None and not same_key(current, key):
            return current  # another request refetched meanwhile
        if not allow_fetch:
            if not self._off_the_loop():
                current = self._keys.get(kid or "")  # (a fetch that ended since the first look)
                return current if current is not None and not same_key(current, key) else None
            raise NeedsFetch  # a fetch allowed, or one in flight to wait for: off the event loop
        # The sync path waits on the lock for any fetch in flight (a TTL refresh may bring the rotated key), as
        # get() does for an unknown kid; the counter keeps it from fetching a second time.
        ended = self._ended
        with self._lock:  # (waits for a fetch in flight, then looks again)
            current = self._keys.get(kid or "")
            if current is None or same_key(current, key):
                if self._ended != ended or not self._may_fetch_unknown():
                    return None  # a fetch ran while we waited: its outcome stands, no second one
                self._fetch(for_unknown=True)
                current = self._keys.get(kid or "")
        if current is None or same_key(current, key):
            self._misses.append(self._now())
            return None
        return current

    def prefetch(self) -> int:
        """Fetch the JWKS now (at start-up, or from ``clerk-sync doctor``); returns how many keys it holds."""
        self._refresh(wait=True, allowed=lambda: True, reuse=False)
        return len(self._keys)

    def _unknown(self, message: str) -> TokenKeyUnknown:
        """401 for a kid missing from the keys we hold; 503 while we hold none (see the module docstring)."""
        return TokenKeyUnknown(message) if self._keys else self._unavailable()

    def _unavailable(self) -> TokenKeysUnavailable:
        # (read in the log of a 503 and on `clerk-sync doctor`'s line: each problem says what to check)
        return TokenKeysUnavailable(f"no signing keys yet: {self._problem}")

    def _is_stale(self) -> bool:
        return self._fetched_at is None or self._now() - self._fetched_at >= self._ttl

    def _since(self, moment: float | None) -> float:
        return float("inf") if moment is None else self._now() - moment

    def _may_refresh(self) -> bool:
        """A TTL refresh: at most one attempt per cooldown (a failing endpoint is not hammered)."""
        return self._since(self._last_attempt) >= self._cooldown

    def _may_fetch_unknown(self) -> bool:
        """An unknown kid: past the short floor (from the last fetch's end), and fewer than
        ``misses_per_cooldown`` unknown kids missed within the cooldown."""
        full = len(self._misses) == self._misses.maxlen and self._since(self._misses[0]) < self._cooldown
        return self._since(self._last_attempt) >= self._floor and not full

    def _off_the_loop(self) -> bool:
        """Whether an async caller with a kid not held (or a key whose signature failed) goes off the event loop:
        to wait for the fetch in flight when it may bring that kid (no key held at all, or an unknown kid's
        refetch; not a TTL refresh, during which the keys held answer), else to fetch when one is allowed."""
        if self._lock.locked():
            return not self._keys or self._for_unknown
        return self._may_fetch_unknown()

    def _refresh(self, *, wait: bool, allowed: Callable[[], bool], kid: str | None = None,
                 reuse: bool = True) -> None:
        ended = self._ended  # (before the lock: a fetch in flight now ends before we hold it)
        if not self._lock.acquire(blocking=wait):
            return  # another thread is fetching; serve what we have
        try:
            if (kid is not None and kid in self._keys) or (reuse and self._ended != ended) or not allowed():
                # fetched meanwhile by the thread we waited for (its keys, or none: its outcome stands, not
                # a fetch more per waiter), or not allowed yet
                return
            self._fetch(for_unknown=kid is not None)
            if kid is not None and kid not in self._keys:
                self._misses.append(self._now())
        finally:
            self._lock.release()

    def _fetch(self, *, for_unknown: bool = False) -> None:
        """One fetch, under the lock. ``_last_attempt`` is set at its start (the fetch in flight is inside the
        floor) and again at its end: the floor counts from there, so a fetch that took as long as the floor
        (a timeout) is not followed at once by another."""
        self._last_attempt = self._now()
        self.fetches += 1
        self._for_unknown = for_unknown
        try:
            self._fetch_keys()
        finally:
            self._for_unknown = False
            self._last_attempt = self._now()
            self._ended += 1

    def _fetch_keys(self) -> None:
        unsendable = False
        deadline = time.monotonic() + self._timeout  # (real time, as the sockets wait it; not the injected clock)
        try:
            with (attempt_until(deadline),
                  self._client.stream("GET", self.url, headers=self._headers, timeout=self._timeout,
                                      follow_redirects=False) as response):  # (whatever client was given)
                refusal = self._refusal(response)
                body = _read_body(response, deadline) if refusal is None else b""
        except (httpx.LocalProtocolError, UnicodeEncodeError):  # never sent; the error's text quotes the header
            unsendable = True
        except httpx.InvalidURL as exc:  # (not an HTTPError: a URL httpx refuses to send, a newline in it)
            return self._failed("unreachable", f"the JWKS URL {self._shown!r} cannot be fetched ({exc}): set "
                                f"{self._url_setting} again, without spaces or line breaks", exc)
        except (httpx.HTTPError, ValueError) as exc:  # (ValueError: a URL or header httpx refuses to build)
            return self._failed("unreachable", self._unreachable(exc), exc)
        if unsendable:  # raised here, outside the handler: no context, so no trace of the key in a traceback
            return self._failed("unreachable", f"the JWKS fetch could not send its request to {self._shown}: a header "
                                "value holds a character HTTP cannot carry, most likely CLERK_SECRET_KEY (a newline, a "
                                "space or a non-ASCII character inside it): set it again", None)
        if refusal is not None:
            return self._failed("unavailable" if response.status_code >= 500 else "refused", refusal, None)
        if body is None:
            return self._failed("invalid", f"{self._shown} answered a body of more than 1 MiB, the most read (a JWKS "
                                f"is a few KB): {self._url_setting} should name the instance's JWKS", None)
        try:
            keys = _parse_jwks(json.loads(body))
        except ValueError as exc:
            return self._failed("invalid", f"{self._shown} answered 200 but not with JSON: {self._url_setting} should "
                                "name the instance's JWKS", exc)
        if keys or not self._keys:  # an empty answer is a misconfiguration, not "trust nothing"
            # A key published again is kept as the object held: verifiers' caches compare keys by identity
            # (a token cached under a key since replaced under its kid is verified again).
            held = self._keys
            self._keys = {kid: held[kid] if kid in held and same_key(held[kid], key) else key
                          for kid, key in keys.items()}
        if not keys:
            self._problem = f"the JWKS from {self._shown} holds no RSA signing key: {self._url_setting} should name " \
                            "the instance's JWKS"
        self._fetched_at = self._now()
        self._count("ok" if keys else "empty")

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.jwks_fetched(outcome)

    def _failed(self, outcome: str, problem: str, cause: Exception | None) -> None:
        """A fetch that brought no keys (counted as ``outcome``): while none are held, every token is answered 503
        saying why (raised here); else the keys held keep serving (the floor and cooldown limit the retries)."""
        self._count(outcome)
        if not self._keys:
            self._problem = problem
            raise self._unavailable() from cause

    def _refusal(self, response: httpx.Response) -> str | None:
        """What a JWKS answer other than 200 says, in Clerk's terms (not httpx's text, whose link explains the
        status code in general); None for a 200."""
        status = response.status_code
        if status == 200:
            return None
        if status in (401, 403) and self._keyed:
            return (f"Clerk refused CLERK_SECRET_KEY ({status}) at {self._shown}: it is not this instance's secret key "
                    "(Clerk Dashboard -> API keys)")
        if status in (401, 403):
            return (f"{self._shown} refused the request ({status}): CLERK_JWKS_URL should be the instance's public "
                    "JWKS (Clerk Dashboard -> API keys -> JWKS URL), or leave it unset to fetch with CLERK_SECRET_KEY")
        if status == 404:
            should = ("CLERK_API_URL should be the Backend API's base URL (default https://api.clerk.com)"
                      if self._keyed else "CLERK_JWKS_URL is wrong (Clerk Dashboard -> API keys -> JWKS URL)")
            return f"{self._shown} answered 404 (no JWKS there): {should}"
        if 300 <= status < 400:
            to = f" (to {response.headers['location']})" if "location" in response.headers else ""
            return f"{self._shown} answered {status}{to}: redirects are not followed, {self._url_setting} should " \
                   "name the JWKS itself"
        return f"{self._shown} answered {status}" + (": Clerk is unavailable, retry later" if status >= 500 else "")

    def _unreachable(self, exc: Exception) -> str:
        if isinstance(exc, httpx.TimeoutException):
            return f"the JWKS fetch from {self._shown} got no full answer within its total time of " \
                   f"{self._timeout:g} s (fetch_timeout_s: connecting, the answer and its body): check " \
                   f"{self._url_setting} and the network"
        return f"the JWKS fetch could not connect to {self._shown} ({str(exc) or type(exc).__name__}): check " \
               f"{self._url_setting} and the network"


def _read_body(response: httpx.Response, deadline: float) -> bytes | None:
    """The body of a 200, read by ``deadline`` (``time.monotonic()``); None past ``_MAX_JWKS_BYTES``. A
    transport with no socket of ours (``MockTransport``) is held to the deadline between its chunks."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > _MAX_JWKS_BYTES:
        return None
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > _MAX_JWKS_BYTES:
            return None
        if time.monotonic() >= deadline:
            raise httpx.ReadTimeout("the fetch's total time ran out while its body came in", request=response.request)
    return bytes(body)


def same_key(a: RSAPublicKey, b: RSAPublicKey) -> bool:
    """One RSA public key, whichever objects hold it."""
    return a is b or a.public_numbers() == b.public_numbers()


def _parse_jwks(document: Any) -> dict[str, RSAPublicKey]:
    keys: dict[str, RSAPublicKey] = {}
    for jwk in document.get("keys", []) if isinstance(document, dict) else []:
        if not isinstance(jwk, dict) or jwk.get("kty") != "RSA" or jwk.get("use", "sig") != "sig":
            continue
        try:
            key = PyJWK(jwk, algorithm="RS256").key
        # One malformed entry is skipped, not the whole answer: PyJWT raises InvalidKeyError (not a PyJWKError)
        # for an RSA key it cannot load, and letting it out answered 500 and froze the keys held (a key Clerk
        # had withdrawn kept verifying). The keys loaded from the rest serve; none loaded: the "empty" answer.
        except (PyJWTError, ValueError, TypeError) as exc:
            log.warning("jwks_key_skipped", kid=str(jwk.get("kid", ""))[:100], reason=show(str(exc), 200))
            continue
        if isinstance(key, RSAPublicKey):
            keys[str(jwk.get("kid", ""))] = key
    return keys
