"""Session-token verification: the attack matrix, v1/v2 claims, JWKS rotation and its cooldown."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from clerk_sync import errors
from clerk_sync.auth.claims import ClaimsValidator, auth_from_claims
from clerk_sync.auth.jwks import JWKSKeySource, StaticKeySource
from clerk_sync.auth.sessions import SessionVerifier, is_public_path, token_from_request
from clerk_sync.integrations.http import status_for
from tests._server import running

NOW = 1_800_000_000
ISS = "https://clerk.example.test"
AZP = "https://app.example.test"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: rsa.RSAPrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def claims(**over: Any) -> dict[str, Any]:
    base = {"sub": "user_1", "sid": "sess_1", "iss": ISS, "azp": AZP, "iat": NOW - 5, "nbf": NOW - 15,
            "exp": NOW + 55, "v": 2, "metadata": {"role": "admin"}}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def mint(payload: dict[str, Any] | None = None, key: rsa.RSAPrivateKey = KEY, kid: str = "ins_1", alg: str = "RS256") -> str:
    return jwt.encode(payload or claims(), key, algorithm=alg, headers={"kid": kid})


class Revoked:
    def __init__(self) -> None:
        self.ids: set[str] = set()

    def is_revoked(self, session_id: str) -> bool:
        return session_id in self.ids


@pytest.fixture
def clock() -> list[float]:
    return [float(NOW)]


@pytest.fixture
def revoked() -> Revoked:
    return Revoked()


@pytest.fixture
def verifier(clock: list[float], revoked: Revoked) -> SessionVerifier:
    return SessionVerifier(
        StaticKeySource(pem(KEY)),
        ClaimsValidator(issuer=ISS, authorized_parties=frozenset({AZP})),
        revocations=revoked,
        now=lambda: clock[0],
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge_none() -> str:
    return f"{_b64(json.dumps({'alg': 'none', 'kid': 'ins_1'}).encode())}.{_b64(json.dumps(claims()).encode())}."


def _forge_hs256_with_public_key() -> str:
    # The classic confusion attack: HMAC keyed with the public PEM. PyJWT refuses to *create* it, so by hand.
    import hashlib
    import hmac

    head = _b64(json.dumps({"alg": "HS256", "kid": "ins_1", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims()).encode())
    sig = hmac.new(pem(KEY).encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def _tampered() -> str:
    head, _, sig = mint().split(".")
    return f"{head}.{_b64(json.dumps(claims(sub='user_admin')).encode())}.{sig}"


ATTACKS = {
    "alg-none": (_forge_none, errors.TokenAlgorithmNotAllowed),
    "hs256-with-public-key": (_forge_hs256_with_public_key, errors.TokenAlgorithmNotAllowed),
    "other-key": (lambda: mint(key=OTHER_KEY), errors.TokenSignatureInvalid),
    "expired": (lambda: mint(claims(exp=NOW - 6, iat=NOW - 66, nbf=NOW - 76)), errors.TokenExpired),
    "nbf-in-future": (lambda: mint(claims(nbf=NOW + 60, iat=NOW - 1)), errors.TokenNotYetValid),
    "iat-in-future": (lambda: mint(claims(iat=NOW + 60, nbf=None)), errors.TokenIssuedInFuture),
    "wrong-azp": (lambda: mint(claims(azp="https://evil.test")), errors.TokenAuthorizedPartyInvalid),
    "missing-azp": (lambda: mint(claims(azp=None)), errors.TokenAuthorizedPartyInvalid),
    "wrong-iss": (lambda: mint(claims(iss="https://evil.clerk.test")), errors.TokenIssuerInvalid),
    "tampered-payload": (_tampered, errors.TokenSignatureInvalid),
    "missing-sub": (lambda: mint(claims(sub=None)), errors.TokenClaimMissing),
    "missing-sid": (lambda: mint(claims(sid=None)), errors.TokenClaimMissing),
    "pending-session": (lambda: mint(claims(sts="pending")), errors.SessionPending),
    "garbage": (lambda: "not.a.jwt", errors.TokenMalformed),
    "empty": (lambda: "", errors.TokenMalformed),
}


@pytest.mark.parametrize(("forge", "error"), ATTACKS.values(), ids=ATTACKS.keys())
def test_attack_matrix_is_refused(verifier: SessionVerifier, forge: Any, error: type[errors.TokenError]) -> None:
    with pytest.raises(error) as info:
        verifier.verify(forge())
    assert status_for(info.value) == 401


def test_valid_v2_token_normalises(verifier: SessionVerifier) -> None:
    token = mint(claims(o={"id": "org_1", "rol": "admin", "slg": "acme", "per": "manage,read", "fpm": "3,2"},
                        fea="o:dashboard,u:x,o:teams", act={"sub": "user_admin", "sid": "sess_a"}))
    auth = verifier.verify(token)
    assert (auth.user_id, auth.session_id, auth.org_id, auth.org_role, auth.org_slug) == ("user_1", "sess_1", "org_1", "org:admin", "acme")
    assert auth.org_permissions == ("org:dashboard:manage", "org:dashboard:read", "org:teams:read")
    assert auth.is_impersonated and auth.actor_id == "user_admin"
    assert auth.role == "admin" and auth.version == 2


def test_v1_claims_normalise_to_the_same_shape() -> None:
    auth = auth_from_claims({"sub": "u", "sid": "s", "exp": 1, "org_id": "org_1", "org_role": "org:member",
                             "org_slug": "acme", "org_permissions": ["org:posts:read"]})
    assert (auth.version, auth.org_id, auth.org_role, auth.org_permissions) == (1, "org_1", "org:member", ("org:posts:read",))


def test_revocation_and_expiry_apply_to_cached_tokens(verifier: SessionVerifier, clock: list[float], revoked: Revoked) -> None:
    token = mint()
    assert verifier.verify(token).user_id == "user_1"
    assert verifier.verify(token).user_id == "user_1"  # cached signature result
    revoked.ids.add("sess_1")
    with pytest.raises(errors.SessionRevoked):
        verifier.verify(token)
    revoked.ids.clear()
    clock[0] = NOW + 61
    with pytest.raises(errors.TokenExpired):
        verifier.verify(token)


def test_leeway_accepts_small_clock_skew(verifier: SessionVerifier, clock: list[float]) -> None:
    token = mint(claims(exp=NOW - 3))
    assert verifier.verify(token).user_id == "user_1"


def test_pem_with_escaped_newlines_from_env_is_accepted() -> None:
    source = StaticKeySource(pem(KEY).replace("\n", "\\n"))
    assert source.get("anything") is not None
    with pytest.raises(errors.ConfigError, match="CLERK_JWT_KEY"):
        StaticKeySource("not a pem")


def test_token_sources() -> None:
    assert token_from_request({"authorization": "Bearer abc"}, {"__session": "zzz"}) == "abc"
    assert token_from_request({}, {"__session_Ab12Cd34": "cookie"}) == "cookie"
    with pytest.raises(errors.TokenMissing):
        token_from_request({"authorization": "Basic x"}, {})


@pytest.mark.parametrize("cookies", [
    {"__session_Ab12Cd34": "foreign", "__session": "ours"},  # the review's case: a suffixed cookie first
    {"__session": "ours", "__session_Ab12Cd34": "foreign"},
    {"__session_Zz": "one", "__session": "ours", "__session_Ab": "two"},
])
def test_the_plain_session_cookie_wins_whatever_the_cookie_order(cookies: dict[str, str]) -> None:
    """Review finding: the first ``__session*`` cookie was used, whatever its suffix (FACTS 5.3: apps sharing
    a host get ``__session_<suffix>`` cookies besides ``__session``)."""
    assert token_from_request({}, cookies) == "ours"


def test_one_session_cookie_is_used_whatever_its_name_and_several_suffixed_ones_are_refused() -> None:
    assert token_from_request({}, {"__session": "", "__session_Ab12Cd34": "only"}) == "only"  # empty: no candidate
    assert token_from_request({}, {"__sessionx": "not ours", "__session": "ours"}) == "ours"
    with pytest.raises(errors.TokenMalformed, match="which app"):
        token_from_request({}, {"__session_Ab12Cd34": "a", "__session_Zz99Yy88": "b"})
    assert token_from_request({"authorization": "Bearer t"}, {"__session_A": "a", "__session_B": "b"}) == "t"


class _JWKSServer:
    def __init__(self) -> None:
        self.keys = {"ins_1": KEY}
        self.fetches = 0

    def app(self) -> Starlette:
        async def jwks(_: Request) -> JSONResponse:
            self.fetches += 1
            out = []
            for kid, key in self.keys.items():
                jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
                out.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
            return JSONResponse({"keys": out})

        return Starlette(routes=[Route("/v1/jwks", jwks)])


@pytest.fixture
def jwks_server() -> Iterator[tuple[_JWKSServer, str]]:
    server = _JWKSServer()
    with running(server.app()) as url:
        yield server, url


def test_jwks_rotation_without_restart_and_cooldown_on_unknown_kids(jwks_server: tuple[_JWKSServer, str], clock: list[float]) -> None:
    server, url = jwks_server
    mono = [0.0]
    with httpx.Client() as client:
        source = JWKSKeySource(f"{url}/v1/jwks", client=client, cooldown_s=30, now=lambda: mono[0])
        verifier = SessionVerifier(source, ClaimsValidator(issuer=ISS), now=lambda: clock[0])
        assert verifier.verify(mint()).user_id == "user_1"
        assert server.fetches == 1
        for i in range(200):  # a flood of unknown kids
            with pytest.raises(errors.TokenKeyUnknown):
                verifier.verify(mint(kid=f"ins_evil_{i}", key=OTHER_KEY))
        assert server.fetches <= 2  # at most one refetch per cooldown
        server.keys["ins_2"] = OTHER_KEY  # rotation on the Clerk side
        mono[0] += 31
        assert verifier.verify(mint(kid="ins_2", key=OTHER_KEY)).user_id == "user_1"
        assert server.fetches <= 3
        assert verifier.verify(mint()).user_id == "user_1"  # the old key still served


def _retried_until_verified(verifier: SessionVerifier, token: str, mono: list[float]) -> None:
    """The client retries its 401s every half second (of the key source's clock ``mono``) until one passes."""
    while True:
        try:
            assert verifier.verify(token).user_id == "user_1"
            return
        except errors.TokenKeyUnknown:
            mono[0] += 0.5


def test_rotated_key_verifies_within_seconds_of_its_first_token_even_right_after_a_fetch(
    jwks_server: tuple[_JWKSServer, str], clock: list[float]
) -> None:
    """Regression (issue 10 #6): a fetch, the start-up one included, used to block the next one for the
    whole 30 s cooldown, so every token signed with a just-rotated key got 401 for up to 30 s."""
    server, url = jwks_server
    mono = [0.0]
    with httpx.Client() as client:
        source = JWKSKeySource(f"{url}/v1/jwks", client=client, cooldown_s=30, min_refetch_s=3, now=lambda: mono[0])
        verifier = SessionVerifier(source, ClaimsValidator(issuer=ISS), now=lambda: clock[0])
        assert source.prefetch() == 1  # start-up
        server.keys["ins_2"] = OTHER_KEY  # Clerk rotates one second later
        mono[0] = 1.0
        rotated = mint(claims(sid="sess_rot"), key=OTHER_KEY, kid="ins_2")
        first_seen = mono[0]
        _retried_until_verified(verifier, rotated, mono)
        assert mono[0] - first_seen <= 3  # within the floor, not the 30 s cooldown
        assert server.fetches == 2


def test_a_flood_of_random_kids_costs_at_most_three_fetches_per_cooldown(
    jwks_server: tuple[_JWKSServer, str], clock: list[float]
) -> None:
    server, url = jwks_server
    mono = [100.0]
    with httpx.Client() as client:
        source = JWKSKeySource(f"{url}/v1/jwks", client=client, cooldown_s=30, min_refetch_s=3, now=lambda: mono[0])
        verifier = SessionVerifier(source, ClaimsValidator(issuer=ISS), now=lambda: clock[0])
        source.prefetch()
        mono[0] = flood_start = 110.0  # past the floor: the first random kid may fetch
        for i in range(200):  # spread over 20 s, well past the floor, inside one cooldown
            with pytest.raises(errors.TokenKeyUnknown):
                verifier.verify(mint(claims(sid=f"sess_evil_{i}"), key=OTHER_KEY, kid=f"ins_evil_{i}"))
            mono[0] += 0.1
        assert server.fetches == 4  # the start-up fetch and three refetches (misses) for the whole flood
        mono[0] = flood_start + 30  # the oldest miss is a cooldown old: a real rotation is picked up again
        server.keys["ins_3"] = OTHER_KEY
        assert verifier.verify(mint(claims(sid="sess_new"), key=OTHER_KEY, kid="ins_3")).user_id == "user_1"
        assert server.fetches == 5
        assert verifier.verify(mint(claims(sid="sess_old"))).user_id == "user_1"  # no fetch for a cached kid
        assert server.fetches == 5


def test_one_stray_unknown_kid_does_not_hold_a_rotated_key_for_the_cooldown(
    jwks_server: tuple[_JWKSServer, str], clock: list[float]
) -> None:
    """A soak test: one forged token (or a developer's token of another Clerk instance) before a rotation
    started the 30 s cooldown, and every token of the rotated key was refused 401 until it ended (~70 valid
    requests). One miss no longer closes the door: the rotated key verifies within the floor."""
    server, url = jwks_server
    mono = [100.0]
    with httpx.Client() as client:
        source = JWKSKeySource(f"{url}/v1/jwks", client=client, cooldown_s=30, min_refetch_s=3, now=lambda: mono[0])
        verifier = SessionVerifier(source, ClaimsValidator(issuer=ISS), now=lambda: clock[0])
        source.prefetch()
        mono[0] = 110.0
        with pytest.raises(errors.TokenKeyUnknown):  # the stray token: a refetch that misses
            verifier.verify(mint(claims(sid="sess_stray"), key=OTHER_KEY, kid="ins_other_instance"))
        server.keys["ins_2"] = OTHER_KEY  # Clerk rotates two seconds later
        mono[0] = 112.0
        rotated = mint(claims(sid="sess_rot"), key=OTHER_KEY, kid="ins_2")
        _retried_until_verified(verifier, rotated, mono)
        assert mono[0] <= 113.0 + 0.5  # the floor after the stray fetch, not the 30 s cooldown
        assert server.fetches == 3


@pytest.mark.anyio
async def test_async_verify_fetches_off_the_loop(jwks_server: tuple[_JWKSServer, str], clock: list[float]) -> None:
    _, url = jwks_server
    with httpx.Client() as client:
        verifier = SessionVerifier(JWKSKeySource(f"{url}/v1/jwks", client=client), ClaimsValidator(), now=lambda: clock[0])
        assert (await verifier.averify(mint())).user_id == "user_1"


# --- one-pass parser: strict structure (regressions for the hand-rolled split/decode) -----------------------------
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _segment(value: Any) -> str:
    """A base64url segment whose length is not a multiple of 4, so its last character has unused bits."""
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    while len(raw) % 3 == 0:  # JSON tolerates trailing whitespace
        raw += b" "
    return _b64(raw)


def _signed(head: str, body: str, key: rsa.RSAPrivateKey = KEY) -> str:
    """Sign arbitrary segments with the trusted key: a refusal then comes from the parser, not the signature."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    signature = key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{head}.{body}.{_b64(signature)}"


def _noncanonical(segment: str) -> str:
    """Same decoded bytes, different text: set a low bit the last character does not carry."""
    assert len(segment) % 4 in (2, 3)
    return segment[:-1] + _ALPHABET[_ALPHABET.index(segment[-1]) | 1]


HEADER = {"alg": "RS256", "kid": "ins_1", "typ": "JWT"}


def test_signed_hand_built_token_is_accepted(verifier: SessionVerifier) -> None:
    # The control for the cases below: the helpers build tokens the verifier accepts.
    assert verifier.verify(_signed(_segment(HEADER), _segment(claims()))).user_id == "user_1"


def _noncanonical_signature() -> str:
    head, body, sig = mint().split(".")
    return f"{head}.{body}.{_noncanonical(sig)}"


def _impossible_length() -> str:
    body = _segment(claims())
    return _signed(_segment(HEADER), body + "A" * ((1 - len(body)) % 4))  # len % 4 == 1 decodes to nothing


# case -> (token builder, what the refusal names)
STRUCTURE = {
    "noncanonical-signature": (_noncanonical_signature, "non-canonical base64url in the signature"),
    "noncanonical-header": (lambda: _signed(_noncanonical(_segment(HEADER)), _segment(claims())),
                            "non-canonical base64url in the header"),
    "noncanonical-payload": (lambda: _signed(_segment(HEADER), _noncanonical(_segment(claims()))),
                             "non-canonical base64url in the payload"),
    "padded-signature": (lambda: mint() + "==", "invalid base64url in the signature"),
    "padded-payload": (lambda: _signed(_segment(HEADER), _segment(claims()) + "=="), "invalid base64url in the payload"),
    "four-segments": (lambda: mint() + ".x", "4 segments"),
    "trailing-dot": (lambda: mint() + ".", "4 segments"),
    "two-segments": (lambda: mint().rpartition(".")[0], "2 segments"),
    "junk-after-signature": (lambda: mint() + "!!!!", "invalid base64url in the signature"),
    "space-in-signature": (lambda: mint()[:-4] + " " + mint()[-3:], "invalid base64url in the signature"),
    "junk-in-payload": (lambda: _signed(_segment(HEADER), _segment(claims())[:-4] + "+/" + _segment(claims())[-2:]),
                        "invalid base64url in the payload"),
    "impossible-length": (_impossible_length, "invalid base64url in the payload"),
    "non-ascii": (lambda: mint() + "é", "non-ASCII"),
    "crit-header": (lambda: _signed(_segment({**HEADER, "crit": ["exp"], "exp": NOW}), _segment(claims())), "crit"),
    "b64-header": (lambda: _signed(_segment({**HEADER, "b64": False, "crit": ["b64"]}), _segment(claims())), "b64"),
    "int-kid": (lambda: _signed(_segment({**HEADER, "kid": 1}), _segment(claims())), "kid must be a string"),
    "null-kid": (lambda: _signed(_segment({**HEADER, "kid": None}), _segment(claims())), "kid must be a string"),
    "header-not-object": (lambda: _signed(_segment(["RS256"]), _segment(claims())), "header: not a JSON object"),
    "payload-list": (lambda: _signed(_segment(HEADER), _segment([claims()])), "payload: not a JSON object"),
    "payload-string": (lambda: _signed(_segment(HEADER), _segment("user_1")), "payload: not a JSON object"),
    "payload-null": (lambda: _signed(_segment(HEADER), _segment(None)), "payload: not a JSON object"),
    "payload-not-json": (lambda: _signed(_segment(HEADER), _segment(b"{sub: user_1}")), "invalid payload"),
    "payload-not-utf8": (lambda: _signed(_segment(HEADER), _segment(b'{"sub": "\xff"}')), "invalid payload"),
    "int-sub": (lambda: mint(claims(sub=12345)), "'sub' is not a string"),
    "int-jti": (lambda: mint(claims(jti=7)), "'jti' is not a string"),
    # only Clerk's key can sign these; NaN gave a 500 (exp) or passed every comparison (nbf)
    "nan-exp": (lambda: mint(claims(exp=float("nan"))), "'exp' is not a number"),
    "nan-nbf": (lambda: mint(claims(nbf=float("nan"))), "'nbf' is not a number"),
    "infinite-iat": (lambda: mint(claims(iat=float("-inf"))), "'iat' is not a number"),
    "true-exp": (lambda: mint(claims(exp=True)), "'exp' is not a number"),
}


def test_an_exp_too_large_for_a_float_is_still_a_number(verifier: SessionVerifier) -> None:
    """The finiteness check must not raise OverflowError on an integer no float holds (a 500)."""
    assert verifier.verify(mint(claims(exp=10**400))).user_id == "user_1"


@pytest.mark.parametrize(("forge", "reason"), STRUCTURE.values(), ids=STRUCTURE.keys())
def test_malformed_structure_is_refused(verifier: SessionVerifier, forge: Any, reason: str) -> None:
    token = forge()
    with pytest.raises(errors.TokenMalformed, match=re.escape(reason)):
        verifier.verify(token)
    with pytest.raises(errors.TokenMalformed):  # and again: nothing about it was remembered
        verifier.verify(token)


def test_forged_header_does_not_poison_the_header_memo(verifier: SessionVerifier) -> None:
    head = _segment(HEADER)
    forged = _signed(head, _segment(claims(sub="user_admin")), key=OTHER_KEY)
    with pytest.raises(errors.TokenSignatureInvalid):
        verifier.verify(forged)
    assert verifier.verify(_signed(head, _segment(claims()))).user_id == "user_1"
    with pytest.raises(errors.TokenSignatureInvalid):  # the memoised header does not skip the signature
        verifier.verify(forged)


def test_flood_of_distinct_tokens_stays_bounded_and_correct(clock: list[float]) -> None:
    verifier = SessionVerifier(StaticKeySource(pem(KEY)), ClaimsValidator(issuer=ISS), now=lambda: clock[0],
                               cache_size=50)
    tokens = [mint(claims(sub=f"user_{i}", sid=f"sess_{i}")) for i in range(500)]
    for i, token in enumerate(tokens):
        auth = verifier.verify(token)
        assert (auth.user_id, auth.session_id) == (f"user_{i}", f"sess_{i}")
    assert len(verifier._cache) == 50
    assert list(verifier._cache) == tokens[-50:]  # FIFO: the newest survive
    assert verifier.verify(tokens[0]).user_id == "user_0"  # evicted tokens verify again from scratch
    with pytest.raises(errors.TokenSignatureInvalid):  # and forgeries among them are still refused
        verifier.verify(_tampered())


def test_expired_entries_are_evicted_before_live_ones(clock: list[float]) -> None:
    verifier = SessionVerifier(StaticKeySource(pem(KEY)), ClaimsValidator(issuer=ISS), now=lambda: clock[0],
                               cache_size=3)
    short = [mint(claims(sub=f"short_{i}", exp=NOW + 10)) for i in range(2)]
    long = mint(claims(sub="long", exp=NOW + 600))
    for token in [*short, long]:
        verifier.verify(token)
    clock[0] = NOW + 30  # both short tokens are now expired (past their leeway too)
    newcomer = mint(claims(sub="new", iat=NOW + 25, nbf=NOW + 20, exp=NOW + 600))
    verifier.verify(newcomer)
    assert list(verifier._cache) == [long, newcomer]
    with pytest.raises(errors.TokenExpired):
        verifier.verify(short[0])


def test_v2_permissions_tolerate_odd_claim_types() -> None:
    base = {"sub": "u", "sid": "s", "exp": 1, "v": 2}
    auth = auth_from_claims({**base, "o": {"id": "org_1", "per": ["read"], "fpm": [1]}, "fea": {"o": 1}})
    assert (auth.org_id, auth.org_permissions) == ("org_1", ())
    # an fpm entry that is not a decimal keeps its place and grants nothing (Clerk's parser: an empty slot)
    auth = auth_from_claims({**base, "o": {"id": "org_1", "per": "read,²", "fpm": "²,3"}, "fea": "o:x,o:y"})
    assert auth.org_permissions == ("org:y:read", "org:y:²")


@pytest.mark.parametrize(("fea", "fpm", "expected"), [
    # Review finding: "uo:"/"ou:" features (user and org) are org-scoped too; dropping them handed their
    # permissions to the next feature (a member got org:teams:manage)
    ("uo:dashboard,o:teams", "3,2", ("org:dashboard:manage", "org:dashboard:read", "org:teams:read")),
    ("ou:dashboard, u:profile ,o:teams", "3,2", ("org:dashboard:manage", "org:dashboard:read", "org:teams:read")),
    # an entry that is not a decimal was skipped, shifting the next one onto this feature
    ("o:billing,o:teams", "x,2", ("org:teams:read",)),
    ("o:billing,o:teams", " 1 , 2 ", ("org:billing:manage", "org:teams:read")),
    # a feature without a scope: Clerk's parser refuses the claim; no permission at all here
    ("dashboard,o:teams", "3,2", ()),
])
def test_v2_permissions_follow_clerks_parser(fea: str, fpm: str, expected: tuple[str, ...]) -> None:
    base = {"sub": "u", "sid": "s", "exp": 1, "v": 2}
    auth = auth_from_claims({**base, "o": {"id": "org_1", "rol": "member", "per": "manage, read", "fpm": fpm},
                             "fea": fea})
    assert auth.org_permissions == expected


def test_auth_from_claims_does_not_alias_the_callers_dict() -> None:
    raw = {"sub": "u", "sid": "s", "exp": 1}
    auth = auth_from_claims(raw)
    raw["sub"] = "someone_else"
    assert auth.claims["sub"] == "u"


@pytest.mark.anyio
async def test_async_path_refreshes_a_stale_key_and_drops_a_withdrawn_one(
    jwks_server: tuple[_JWKSServer, str], clock: list[float]
) -> None:
    server, url = jwks_server
    mono = [0.0]
    with httpx.Client() as client:
        source = JWKSKeySource(f"{url}/v1/jwks", client=client, ttl_s=300, cooldown_s=30, now=lambda: mono[0])
        verifier = SessionVerifier(source, ClaimsValidator(), now=lambda: clock[0])
        assert (await verifier.averify(mint(claims(sid="sess_a")))).user_id == "user_1"
        server.keys = {"ins_2": OTHER_KEY}  # Clerk withdraws ins_1
        mono[0] += 100
        assert (await verifier.averify(mint(claims(sid="sess_b")))).user_id == "user_1"  # still fresh: cached
        mono[0] += 300
        with pytest.raises(errors.TokenKeyUnknown, match="no longer"):
            await verifier.averify(mint(claims(sid="sess_c")))
        assert server.fetches == 2


def test_a_token_of_another_category_is_not_a_session(verifier: SessionVerifier) -> None:
    """Clerk tags tokens with ``cat``: a JWT-template (or machine) token is refused in the session slot, as
    Clerk's own SDKs refuse it, whatever claims it carries; session and "ignore" tokens pass."""
    for category in ("cl_B7d4PD111AAA", "cl_I7d4PD111III"):
        token = jwt.encode(claims(), KEY, algorithm="RS256", headers={"kid": "ins_1", "cat": category})
        assert verifier.verify(token).user_id == "user_1"
    for category in ("cl_B7d4PD222AAA", "cl_B7d4PD333AAA", "anything"):
        token = jwt.encode(claims(), KEY, algorithm="RS256", headers={"kid": "ins_1", "cat": category})
        with pytest.raises(errors.TokenMalformed, match="not a session token"):
            verifier.verify(token)


@pytest.mark.parametrize("act", ["user_admin", ["user_admin"], 7, True])
def test_an_actor_claim_that_is_not_an_object_is_refused_not_read_as_no_impersonation(
        verifier: SessionVerifier, act: Any) -> None:
    with pytest.raises(errors.TokenMalformed, match="'act'"):
        verifier.verify(mint(claims(act=act)))
    assert verifier.verify(mint(claims(act={"sub": "user_admin"}))).is_impersonated


def test_public_paths_and_prefixes_match_whole_segments() -> None:
    assert is_public_path("/", {"/"}, ())
    assert is_public_path("/public", (), ("/public",))
    assert is_public_path("/public/a/b", (), ("/public",))
    assert is_public_path("/public/a", (), ("/public/",))
    assert not is_public_path("/publicity-admin", (), ("/public",))
    assert not is_public_path("/admin", {"/"}, ("/public",))
    assert is_public_path("/anything", (), ("/",))  # "/" as a prefix: everything


def test_a_path_with_dot_segments_is_never_under_a_public_prefix() -> None:
    """Review finding: ``/public/../admin`` counted as under ``/public``; a proxy that resolves dot segments
    (or a router that does) then serves ``/admin`` without a session check."""
    for path in ("/public/../admin", "/public/./x", "/public/a/.."):
        assert not is_public_path(path, (), ("/public",)), path
    assert is_public_path("/public/..well-named", (), ("/public",))


def test_no_keys_yet_and_the_jwks_unreachable_is_a_503_to_retry_not_a_sign_out(clock: list[float]) -> None:
    from clerk_sync.integrations.http import error_response

    with httpx.Client() as client:
        source = JWKSKeySource("http://127.0.0.1:9/v1/jwks", client=client)  # port 9: nothing listens
        verifier = SessionVerifier(source, ClaimsValidator(issuer=ISS), now=lambda: clock[0])
        with pytest.raises(errors.TokenKeysUnavailable, match="JWKS fetch") as caught:
            verifier.verify(mint())
    answer = error_response(caught.value)
    assert answer.status == 503
    assert answer.headers == {"Retry-After": "5"}  # no WWW-Authenticate: the client is not signed out
    assert isinstance(caught.value, errors.TokenKeyUnknown)  # public pages still treat it as anonymous


def _jwks_answering(answers: list[httpx.Response], calls: list[httpx.Request]) -> httpx.Client:
    """A JWKS endpoint answering the last of ``answers`` (append to change it), recording each call."""
    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return answers[-1]

    return httpx.Client(transport=httpx.MockTransport(handler))


def _jwks_document(**keys: rsa.RSAPrivateKey) -> dict[str, Any]:
    return {"keys": [{**json.loads(RSAAlgorithm.to_jwk(key.public_key())), "kid": kid, "use": "sig"}
                     for kid, key in keys.items()]}


@pytest.mark.parametrize("answer", [httpx.Response(503, text="down"), httpx.Response(200, json={"keys": []})],
                         ids=["jwks-503", "jwks-empty"])
def test_no_keys_loaded_is_a_503_for_every_request_not_a_sign_out_after_the_first(
        clock: list[float], answer: httpx.Response) -> None:
    """Review finding: with the JWKS unreachable and no key cached, the first request got 503 but the next
    ones, inside the refetch floor, got 401 ``token_key_unknown``: front ends read that as signed out."""
    mono, calls = [0.0], []
    with _jwks_answering([answer], calls) as client:
        source = JWKSKeySource("https://clerk.example.test/v1/jwks", client=client, now=lambda: mono[0])
        verifier = SessionVerifier(source, ClaimsValidator(issuer=ISS), now=lambda: clock[0])
        for _ in range(3):
            with pytest.raises(errors.TokenKeysUnavailable, match="no signing keys yet"):
                verifier.verify(mint())
            with pytest.raises(errors.TokenKeysUnavailable):  # the async face's first, fetchless try
                source.get("ins_1", allow_fetch=False)
            mono[0] += 1
    assert len(calls) == 1  # still one fetch per floor, not one per request


@pytest.mark.anyio
async def test_no_keys_loaded_is_a_503_on_the_async_path_too_and_keys_end_it(clock: list[float]) -> None:
    mono, calls, answers = [0.0], [], [httpx.Response(503, text="down")]
    with _jwks_answering(answers, calls) as client:
        source = JWKSKeySource("https://clerk.example.test/v1/jwks", client=client, now=lambda: mono[0])
        verifier = SessionVerifier(source, ClaimsValidator(issuer=ISS), now=lambda: clock[0])
        for _ in range(3):
            with pytest.raises(errors.TokenKeysUnavailable):
                await verifier.averify(mint())
            mono[0] += 1
        assert len(calls) == 1
        answers.append(httpx.Response(200, json=_jwks_document(ins_1=KEY)))  # Clerk is back, past the floor
        mono[0] += 5
        assert (await verifier.averify(mint())).user_id == "user_1"
        with pytest.raises(errors.TokenKeyUnknown) as caught:  # keys loaded: an unknown kid is a 401 again
            await verifier.averify(mint(key=OTHER_KEY, kid="ins_forged"))
        assert type(caught.value) is errors.TokenKeyUnknown
        assert status_for(caught.value) == 401


@pytest.mark.anyio
async def test_a_cached_token_ends_with_the_key_that_signed_it(
    jwks_server: tuple[_JWKSServer, str], clock: list[float]
) -> None:
    """Review finding: a token verified once stayed in the cache, and kept working, after Clerk withdrew its
    key from the JWKS (a rotation after a leak), until its own ``exp``: only new tokens met the withdrawal."""
    server, url = jwks_server
    mono = [0.0]
    with httpx.Client() as client:
        source = JWKSKeySource(f"{url}/v1/jwks", client=client, ttl_s=300, cooldown_s=30, now=lambda: mono[0])
        verifier = SessionVerifier(source, ClaimsValidator(), now=lambda: clock[0])
        sync_token, async_token = mint(claims(sid="sess_sync")), mint(claims(sid="sess_async"))
        assert verifier.verify(sync_token).session_id == "sess_sync"
        assert (await verifier.averify(async_token)).session_id == "sess_async"
        server.keys = {"ins_2": OTHER_KEY}  # Clerk withdraws ins_1
        mono[0] += 100
        assert verifier.verify(sync_token).session_id == "sess_sync"  # the key set is still fresh: served
        mono[0] += 300
        with pytest.raises(errors.TokenKeyUnknown, match="no longer"):
            await verifier.averify(async_token)
        with pytest.raises(errors.TokenKeyUnknown):
            verifier.verify(sync_token)
        assert sync_token not in verifier._cache and async_token not in verifier._cache


@pytest.mark.parametrize("header", [{"cat": ["cl_B7d4PD111AAA"]}, {"cat": {}}, {"cat": 7}])
def test_an_unverified_header_of_the_wrong_type_is_a_malformed_token(verifier: SessionVerifier,
                                                                      header: dict[str, Any]) -> None:
    """Review finding: ``cat`` was looked up in a set before the signature was checked, so a list or an object
    there raised TypeError: a 500 on every page for anyone holding such a cookie, where a bad token is a 401."""
    forged = ".".join([_b64(json.dumps({"alg": "RS256", "kid": "ins_1", **header}).encode()), _b64(b"{}"), "AAAA"])
    with pytest.raises(errors.TokenMalformed, match="category"):
        verifier.verify(forged)


@pytest.mark.parametrize("azp", [["https://app.example.test"], {"a": 1}, 7])
def test_a_signed_azp_that_is_not_a_string_is_malformed(azp: Any) -> None:
    """The same for ``azp``: it is looked up in the authorized parties, so a non-string raised TypeError."""
    verifier = SessionVerifier(StaticKeySource(pem(KEY)), ClaimsValidator(authorized_parties=frozenset({AZP})),
                               now=lambda: float(NOW))
    with pytest.raises(errors.TokenMalformed, match="azp"):
        verifier.verify(mint(claims(azp=azp)))


@pytest.mark.parametrize("act", [{}, {"sub": 123}, {"sub": ""}, {"sub": None, "sid": "sess_a"}])
def test_an_actor_claim_without_a_user_id_is_refused(verifier: SessionVerifier, act: Any) -> None:
    """Review finding: an ``act`` with no string ``sub`` passed as impersonated with no actor, so the
    impersonator's checks were skipped and its audit rows named nobody (Clerk's ``act`` always names one)."""
    with pytest.raises(errors.TokenMalformed, match="names no user id"):
        verifier.verify(mint(claims(act=act)))
