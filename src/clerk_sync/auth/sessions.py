"""Clerk session tokens, verified locally: no network call per request.

Two explicit steps (see joserfc/PyJWT): (1) the signature, with the algorithm allow-listed to RS256
and the key chosen by ``kid`` (so ``alg: none`` and HS256-signed-with-the-public-key are refused
before any key is touched); (2) the claims, by a :class:`~clerk_sync.auth.claims.ClaimsValidator`
with an injectable clock.
A token whose signature already verified is remembered until its ``exp``; expiry, revocation and
``sts`` are still checked on every call.

Each token is parsed once: exactly three segments, each strict base64url (RFC 7515 alphabet, no
padding, canonical trailing bits, so one byte string has one encoding); the header must be a JSON
object with an allow-listed ``alg``, no ``crit``/``b64`` extensions and a string ``kid``; the
signature is checked by PyJWT's ``RSAAlgorithm`` (``cryptography`` underneath); the payload JSON is
parsed only after the signature holds.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import httpx
from anyio import CapacityLimiter, to_thread
from anyio.lowlevel import RunVar
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt.algorithms import RSAAlgorithm

from clerk_sync._limits import show
from clerk_sync._urls import origin as url_origin
from clerk_sync.auth.claims import Auth, ClaimsValidator, normalize_claims
from clerk_sync.auth.jwks import JWKSKeySource, KeySource, NeedsFetch, StaticKeySource, same_key
from clerk_sync.config import Settings
from clerk_sync.errors import (
    ConfigError,
    CrossSiteRequest,
    SessionRevoked,
    TokenAlgorithmNotAllowed,
    TokenError,
    TokenMalformed,
    TokenMissing,
    TokenSignatureInvalid,
)

__all__ = [
    "ALLOWED_ALGORITHMS",
    "SAFE_METHODS",
    "RevocationCheck",
    "SessionVerifier",
    "check_request_origin",
    "check_websocket_origin",
    "cookie_suffix",
    "is_cors_preflight",
    "is_public_path",
    "token_from_request",
    "verifier_from_settings",
]

ALLOWED_ALGORITHMS = ("RS256",)
#: Methods that must not change state (RFC 9110 9.2.1): no cross-site request check for them.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_HTTP_SCHEMES = {"ws": "http", "wss": "https"}  # a websocket's origin is its page's: http(s)
_RS256 = RSAAlgorithm(RSAAlgorithm.SHA256)
_B64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# Canonical base64url: the unused low bits of the last character are zero (4 bits when len % 4 == 2,
# 2 bits when len % 4 == 3), so the last character's alphabet index is a multiple of 16 or 4.
_CANONICAL_LAST = {2: frozenset(_B64URL_ALPHABET[::16]), 3: frozenset(_B64URL_ALPHABET[::4])}
# The ``cat`` header tags a token's category (FACTS 5.1): a session token, or "ignore"; a JWT-template
# (cl_B7d4PD222AAA) or machine (cl_B7d4PD333AAA) token is not a session, whatever claims it carries.
_SESSION_CATEGORIES = frozenset({"cl_B7d4PD111AAA", "cl_I7d4PD111III"})
_HEADER_MEMO_SIZE = 16  # an instance signs every token with one header per kid; rotation adds one


class RevocationCheck(Protocol):
    """A deny list of session ids (fed by session.revoked/ended/removed webhooks)."""

    def is_revoked(self, session_id: str) -> bool: ...


def is_public_path(path: str, paths: Iterable[str], prefixes: Iterable[str], *,
                   slash_twins: Iterable[str] = ()) -> bool:
    """Whether ``path`` is one of ``paths`` or under one of ``prefixes``, a prefix naming a whole path segment:
    ``/public`` covers ``/public`` and ``/public/x``, not ``/publicity-admin``, nor ``/public/../admin``
    (dot segments: a proxy or router that resolves them would serve ``/admin``).

    ``slash_twins``: the exact paths whose trailing-slash twin is public too, because the face serves the
    twin with the same view (the webhook routes: Svix follows no redirect). Any other twin may be a separate
    protected route (``/health`` public, ``/health/`` not): by default no twin is public."""
    if path in paths:
        return True
    twin = path[:-1] if len(path) > 1 and path.endswith("/") else None
    if twin is not None and twin in paths and twin in slash_twins:
        return True
    if any(segment in (".", "..") for segment in path.split("/")):
        return False
    for prefix in prefixes:
        base = prefix.rstrip("/")
        if path == base or path.startswith(base + "/"):
            return True
    return False


def cookie_suffix(publishable_key: str) -> str:
    """The suffix of this app's ``__session_<suffix>`` cookie: the first 8 characters of the URL-safe base64
    SHA-1 of its publishable key, as Clerk JS names it (FACTS 5.3, ``getCookieSuffix``)."""
    digest = hashlib.sha1(publishable_key.encode(), usedforsecurity=False).digest()
    return base64.urlsafe_b64encode(digest).decode()[:8]


def token_from_request(headers: Mapping[str, str], cookies: Mapping[str, str], *, suffix: str | None = None) -> str:
    """``Authorization: Bearer`` first (cross-origin), else the session cookie (same-origin).

    Clerk names the cookie ``__session``, or ``__session_<suffix>`` when several apps share a host (the
    suffix comes from each app's publishable key, and Clerk JS writes both names: ``__session`` then holds
    whichever app refreshed last). With this app's ``suffix`` (:func:`cookie_suffix` of
    ``CLERK_PUBLISHABLE_KEY``), its own suffixed cookie is used when present, as Clerk's backend SDKs do.
    Otherwise the choice does not depend on the order of the ``Cookie`` header: one non-empty candidate is
    used whatever its name; among several, the plain ``__session``; several suffixed ones without it are
    refused (:class:`~clerk_sync.errors.TokenMalformed`), as nothing says which app's is ours.

    One name with two different values in the raw ``Cookie`` header (cookie tossing: a sibling subdomain
    sets a second ``__session``) is refused too, as two Authorization headers are: Starlette and Django
    keep the last, werkzeug the first, so ``cookies`` would mean another session in each framework.
    """
    token = _bearer(headers)
    if token is not None:
        return token
    ours = f"__session_{suffix}" if suffix is not None and cookies.get(f"__session_{suffix}") else None
    # (this app's own cookie present: only its name's duplicates matter, not another app's on the same host)
    tossed = _repeated_session_cookie(headers.get("cookie"), only=ours)
    if tossed is not None:
        raise TokenMalformed(f"two different {tossed} cookies in one request (one set for a parent domain or "
                             "another path?): cannot tell which session is meant; clear this site's cookies and "
                             "sign in again, or send the token as Authorization: Bearer")
    if ours is not None:
        return cookies[ours]
    candidates = {name: value for name, value in cookies.items() if value and is_session_cookie(name)}
    if len(candidates) == 1:
        return next(iter(candidates.values()))
    if "__session" in candidates:
        return candidates["__session"]
    if candidates:
        raise TokenMalformed(f"{len(candidates)} suffixed __session_<suffix> cookies and no __session: cannot "
                             "tell which app's session this is; send the token as Authorization: Bearer")
    raise TokenMissing("no session token (Authorization: Bearer or __session cookie)")


def _repeated_session_cookie(raw: str | None, *, only: str | None = None) -> str | None:
    """The first ``__session*`` name (``only`` that one, when given) the ``Cookie`` header carries with two
    different values, if any."""
    seen: dict[str, str] = {}
    for pair in (raw or "").split(";"):
        name, eq, value = pair.partition("=")
        name, value = name.strip(), value.strip()
        if len(value) > 1 and value[0] == value[-1] == '"':  # a quoted copy is the same value to the frameworks
            value = value[1:-1]
        if not eq or not is_session_cookie(name) or (only is not None and name != only):
            continue
        if seen.setdefault(name, value) != value:
            return name
    return None


def is_cors_preflight(method: str | None, access_control_request_method: str | None) -> bool:
    """A browser's CORS preflight (``OPTIONS`` with an ``Access-Control-Request-Method`` header): it never
    carries the session (no cookie, no Authorization), and a browser needs a 2xx answer before it sends the
    real request. Any client can send those headers, though: Flask's deny-by-default answers every one to what
    is not public with the same bare 200, no view run; ASGI's
    :class:`~clerk_sync.integrations.asgi.ClerkAuthMiddleware` refuses it, saying where the CORS layer goes."""
    return method == "OPTIONS" and bool(access_control_request_method)


def is_session_cookie(name: str) -> bool:
    """Whether a cookie of this name carries a Clerk session: ``__session`` or ``__session_<suffix>``."""
    return name == "__session" or name.startswith("__session_")


def check_websocket_origin(headers: Mapping[str, str], cookies: Mapping[str, str], *, scheme: str,
                           authorized_parties: frozenset[str] | None) -> None:
    """A websocket handshake riding on the ``__session`` cookie must come from an authorized origin
    (``CLERK_AUTHORIZED_PARTIES``), or without that list from the site's own, as a cookie POST must
    (:func:`check_request_origin`): browsers send cookies with cross-site websocket handshakes (a GET, which the
    POST rule lets through), and ``azp`` only says which origin the token was minted for, not which page opened
    the socket. Bearer handshakes carry no ambient credential; a handshake without ``Origin`` comes from no
    browser. ``scheme``: the request's (``ws``/``wss`` or ``http``/``https``). Raises :class:`CrossSiteRequest`;
    a handshake with no session cookie is left to the session check (an anonymous socket is no one's)."""
    if "origin" not in headers or not any(is_session_cookie(name) for name in cookies):
        return
    check_request_origin("WEBSOCKET", headers, scheme="https" if scheme in ("wss", "https") else "http",
                         authorized_parties=authorized_parties)


def check_request_origin(method: str, headers: Mapping[str, str], *, scheme: str | None,
                         authorized_parties: frozenset[str] | None,
                         trusted_origins: Sequence[str] = ()) -> None:
    """Refuse cross-site request forgery: an unsafe request (not GET/HEAD/OPTIONS/TRACE) authenticated
    by the session cookie must say it comes from an allowed origin, else :class:`CrossSiteRequest`.

    Browsers attach the ``__session`` cookie to requests other sites make, and a token's ``azp`` says
    which origin it was minted for, not which page sent this request; ``Authorization: Bearer`` is no
    ambient credential, so those requests pass. The request's ``Origin`` (or, without one, the origin of
    its ``Referer``) must be in ``authorized_parties`` (``CLERK_AUTHORIZED_PARTIES``) when that is set,
    else equal the request's own origin: ``scheme`` (a websocket's ``ws``/``wss`` read as ``http``/``https``)
    plus the ``Host`` header (``scheme=None``: unknown, nothing matches). A request with neither header is
    refused: browsers send ``Origin`` on cross-site POSTs, so its absence cannot be taken for "same site".
    ``headers`` has lower-case names.

    ``trusted_origins`` are allowed as well, written as Django's ``CSRF_TRUSTED_ORIGINS`` are (an origin,
    or ``https://*.example.com`` for its subdomains): the Django face passes that setting, so one list
    serves both its own CSRF check and this one.
    """
    if method.upper() in SAFE_METHODS or _bearer(headers) is not None:
        return
    sent = headers.get("origin")
    header = "Origin"
    if sent is None and headers.get("referer"):
        sent, header = headers["referer"], "Referer"
    if sent is None:
        raise CrossSiteRequest(f"a {method} authenticated by the __session cookie carries neither Origin nor "
                               "Referer, so it cannot be told from a cross-site request (browsers send Origin "
                               "on cross-site POSTs); send the token as Authorization: Bearer from "
                               "non-browser clients")
    origin = url_origin(sent)
    if authorized_parties is not None:
        allowed = {o for o in map(url_origin, authorized_parties) if o is not None}
        expected = "in CLERK_AUTHORIZED_PARTIES (list your front end's origin there)"
    else:
        scheme = _HTTP_SCHEMES.get(scheme, scheme) if scheme else None  # a handshake's ws/wss: same origin
        own = url_origin(f"{scheme}://{headers.get('host', '')}") if scheme else None
        allowed = {own} if own is not None else set()
        expected = (f"this site's own origin {own!r} (behind a proxy, forward the Host and X-Forwarded-Proto "
                    "headers, or list your front end's origin in CLERK_AUTHORIZED_PARTIES)" if own is not None else
                    "this site's own origin, unknown here (the caller passed no scheme=: pass the request's, or "
                    "list your front end's origin in CLERK_AUTHORIZED_PARTIES)")
    if origin is None or (origin not in allowed and not _trusted(origin, trusted_origins)):
        raise CrossSiteRequest(f"cross-site request refused: a {method} authenticated by the __session cookie "
                               f"from {header} {(origin or sent)[:100]!r}, which is not {expected}; a front end on "
                               "another origin sends the token as Authorization: Bearer")


def _trusted(origin: str, trusted_origins: Sequence[str]) -> bool:
    """Whether ``origin`` is one of ``trusted_origins`` (Django's ``CSRF_TRUSTED_ORIGINS`` form: a
    ``scheme://*.domain`` entry matches that domain and its subdomains, as Django's ``is_same_domain`` does)."""
    for entry in trusted_origins:
        scheme, sep, rest = entry.strip().partition("://*.")
        if not sep:
            if url_origin(entry) == origin:
                return True
            continue
        suffix = url_origin(f"{scheme}://{rest}")
        if suffix is None:
            continue
        want_scheme, _, want_host = suffix.partition("://")
        got_scheme, _, got_host = origin.partition("://")
        if got_scheme == want_scheme and (got_host == want_host or got_host.endswith("." + want_host)):
            return True
    return False


def _bearer(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer " and auth[7:].strip():
        return auth[7:].strip()
    return None


class SessionVerifier:
    """Verifies Clerk session JWTs against a key source and a :class:`ClaimsValidator`."""

    def __init__(
        self,
        keys: KeySource,
        claims: ClaimsValidator,
        *,
        revocations: RevocationCheck | None = None,
        now: Callable[[], float] = time.time,
        cache_size: int = 10_000,
        cookie_suffix: str | None = None,
    ) -> None:
        self.keys = keys
        self.claims = claims
        self.revocations = revocations
        self.cookie_suffix = cookie_suffix  # this app's __session_<suffix> cookie (token_from_request)
        self._now = now
        # token -> its Auth, kid and the key that verified it
        self._cache: OrderedDict[str, tuple[Auth, str | None, RSAPublicKey]] = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()  # verify() runs on the loop and in worker threads
        self._headers: dict[bytes, str | None] = {}  # header segment -> kid, for signed headers

    def verify(self, token: str, *, allow_fetch: bool = True) -> Auth:
        """Return the :class:`Auth` of a valid token; raise a :class:`TokenError` leaf otherwise."""
        hit = self._cache.get(token)
        if hit is not None:
            auth, kid, signer = hit
            # The key that signed it must still be held: a key Clerk withdrew (rotated after a leak) ends
            # the tokens it signed, cached ones too (a dict lookup while the key set is fresh). Under the
            # same kid (Clerk's kid is the instance id) the key held now may be another one: then the token
            # is verified again, against it.
            try:
                held = self.keys.get(kid, allow_fetch=allow_fetch)
            except TokenError:
                self._forget(token)
                raise
            if held is not signer:
                if same_key(held, signer):  # the same key, fetched again
                    self._remember(token, auth, kid, held)
                else:
                    self._forget(token)
                    hit = None
        if hit is None:
            auth, kid, signer = self._verify_signature_and_static_claims(token, allow_fetch)
            self._remember(token, auth, kid, signer)
        self._check_dynamic(auth)
        return auth

    async def averify(self, token: str) -> Auth:
        """Async face: verifies on the loop; only a needed JWKS fetch runs in a worker thread. One that may wait on
        the key source's lock (an unknown kid: its refetch, or a fetch in flight) takes a thread of a small limiter
        of its own (:data:`KEY_WAIT_THREADS` per event loop), never anyio's default one, which the app's threaded
        work shares (sync endpoints, role reads, webhooks): a flood of tokens with random kids queues on the loop,
        holding no thread, while a fetch is in flight."""
        try:
            return self.verify(token, allow_fetch=False)
        except NeedsFetch as need:
            return await to_thread.run_sync(self.verify, token, limiter=key_wait_limiter() if need.waits else None)

    def _verify_signature_and_static_claims(self, token: str, allow_fetch: bool
                                            ) -> tuple[Auth, str | None, RSAPublicKey]:
        # Not ``jwt.get_unverified_header`` + ``jwt.decode``: each parses the whole token again, and PyJWT
        # 2.14+ checks every segment's alphabet with a per-character Python generator, together ~3x the
        # RSA verify for a Clerk-sized token. One strict parse here; the crypto is still PyJWT's.
        try:
            raw = token.encode("ascii")
        except UnicodeEncodeError:
            raise TokenMalformed("not a JWT: non-ASCII characters") from None
        segments = raw.split(b".")
        if len(segments) != 3:
            raise TokenMalformed(f"not a JWT: {len(segments)} segments, expected 3")
        head, body, crypto = segments
        try:  # one lookup: another thread may clear the memo
            kid, known = self._headers[head], True
        except KeyError:
            kid, known = _header_kid(head), False
        signature = _b64url_decode(crypto, "signature")
        payload = _b64url_decode(body, "payload")
        key = self.keys.get(kid, allow_fetch=allow_fetch)
        signed = raw[: len(head) + 1 + len(body)]
        if not _RS256.verify(signed, key, signature):
            # A key rotated in under the same kid (Clerk's kid is the instance id): the JWKS once more
            renewed = self.keys.renewed(kid, key, allow_fetch=allow_fetch) \
                if isinstance(self.keys, JWKSKeySource) else None
            if renewed is None or not _RS256.verify(signed, renewed, signature):
                raise TokenSignatureInvalid("signature does not verify")
            key = renewed
        if not known:  # only signed headers, so forged ones cannot churn the memo
            self._remember_header(head, kid)
        claims = _json_object(payload, "payload")
        self.claims.validate_static(claims)
        return normalize_claims(claims), kid, key

    def _remember_header(self, head: bytes, kid: str | None) -> None:
        if len(self._headers) >= _HEADER_MEMO_SIZE:
            self._headers.clear()
        self._headers[head] = kid

    def _check_dynamic(self, auth: Auth) -> None:
        self.claims.validate_live(auth, self._now())
        if self.revocations is not None and self.revocations.is_revoked(auth.session_id):
            raise SessionRevoked("session was revoked")

    def _forget(self, token: str) -> None:
        with self._cache_lock:
            self._cache.pop(token, None)

    def _remember(self, token: str, auth: Auth, kid: str | None, key: RSAPublicKey) -> None:
        with self._cache_lock:
            self._cache[token] = (auth, kid, key)
            if len(self._cache) > self._cache_size:
                self._evict()

    def _evict(self) -> None:
        """Drop expired entries from the oldest end, then FIFO down to ``cache_size``: O(1) amortised
        (each entry is popped once). Clerk tokens share one lifetime, so insertion order is expiry order."""
        now, cache = self._now(), self._cache
        while cache:
            token, (auth, _, _) = next(iter(cache.items()))
            if auth.expires_at > now and len(cache) <= self._cache_size:
                break
            del cache[token]


def verifier_from_settings(settings: Settings, *, http: httpx.Client | None = None,
                           revocations: RevocationCheck | None = None) -> SessionVerifier:
    """``CLERK_JWT_KEY`` (networkless) if set, else JWKS from ``CLERK_JWKS_URL`` or ``CLERK_API_URL``/v1/jwks.

    Pass ``http`` to own the JWKS client's lifetime; without it a client is made that lives as long as
    the verifier (one per application, built at start-up).
    """
    claims = ClaimsValidator(issuer=settings.clerk_issuer, authorized_parties=settings.authorized_parties(),
                             leeway_s=settings.session_leeway_s)
    if settings.clerk_jwt_key is not None:
        keys: KeySource = StaticKeySource(settings.clerk_jwt_key.get_secret_value())
    else:
        headers = {}
        url = settings.clerk_jwks_url
        if url is None:
            if settings.clerk_secret_key is None:
                raise ConfigError(
                    "set CLERK_JWT_KEY (Dashboard -> API keys -> JWKS Public Key) or CLERK_SECRET_KEY "
                    "(to fetch the JWKS from the Backend API) to verify session tokens"
                )
            url = settings.clerk_api_url.rstrip("/") + "/v1/jwks"
            headers["Authorization"] = f"Bearer {settings.clerk_secret_key.get_secret_value()}"
        keys = JWKSKeySource(url, client=http or httpx.Client(), headers=headers,
                             min_refetch_s=settings.jwks_min_refetch_s)
    suffix = cookie_suffix(settings.clerk_publishable_key) if settings.clerk_publishable_key else None
    return SessionVerifier(keys, claims, revocations=revocations, cookie_suffix=suffix)


def _header_kid(segment: bytes) -> str | None:
    """Check a header segment (allow-listed ``alg``, no JWS extensions) and return its ``kid``."""
    header = _json_object(_b64url_decode(segment, "header"), "header")
    alg = header.get("alg")
    if alg not in ALLOWED_ALGORITHMS:
        raise TokenAlgorithmNotAllowed(f"alg {show(alg)} is not allowed (RS256 only)")
    if "crit" in header or "b64" in header:  # Clerk session tokens use no JWS extension (RFC 7515 4.1.11, RFC 7797)
        raise TokenMalformed("unsupported JWS extension header (crit/b64)")
    category = header.get("cat")
    # a string first: an unverified list or object here would raise TypeError (a 500 on every page for a
    # cookie another subdomain planted) where a malformed token is a 401
    if category is not None and (not isinstance(category, str) or category not in _SESSION_CATEGORIES):
        raise TokenMalformed(f"token category {show(category)} is not a session token's (a JWT-template or machine "
                             "token sent as a session token)")
    kid = header.get("kid")
    if "kid" in header and not isinstance(kid, str):
        raise TokenMalformed("kid must be a string")
    return kid


KEY_WAIT_THREADS = 4
"""Threads (per event loop) in which async verifications wait for a JWKS fetch, or run one for an unknown kid."""

_key_wait_limiter: RunVar[CapacityLimiter] = RunVar("clerk_sync_key_wait_limiter")


def key_wait_limiter() -> CapacityLimiter:
    """The current event loop's limiter for :meth:`SessionVerifier.averify`'s JWKS waits (see there)."""
    try:
        return _key_wait_limiter.get()
    except LookupError:
        limiter = CapacityLimiter(KEY_WAIT_THREADS)
        _key_wait_limiter.set(limiter)
        return limiter


def _b64url_decode(segment: bytes, name: str) -> bytes:
    """Strict RFC 7515 base64url: alphabet only, no padding, canonical last character."""
    rem = len(segment) % 4
    if rem == 1 or segment.translate(None, _B64URL_ALPHABET):
        raise TokenMalformed(f"invalid base64url in the {name}")
    if rem and segment[-1] not in _CANONICAL_LAST[rem]:
        raise TokenMalformed(f"non-canonical base64url in the {name}")
    return base64.urlsafe_b64decode(segment + b"=" * (-rem % 4))


def _json_object(raw: bytes, name: str) -> dict[str, Any]:
    try:  # UTF-8 only (RFC 7519 7.2), which also skips json's encoding sniffing
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise TokenMalformed(f"invalid {name}: {exc}") from None
    if not isinstance(value, dict):
        raise TokenMalformed(f"invalid {name}: not a JSON object")
    return value
