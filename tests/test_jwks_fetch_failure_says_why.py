"""A JWKS fetch that fails says what failed in Clerk's terms, on doctor's session-keys line and in the log of
the 503 a request gets: a refused secret key, a wrong URL, no connection; not httpx's text and its MDN link,
and never "run `clerk-sync doctor`" to the reader of doctor."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest
import structlog

from clerk_sync.auth.sessions import verifier_from_settings
from clerk_sync.cli.doctor import run_checks
from clerk_sync.config import Settings
from clerk_sync.errors import TokenKeysUnavailable
from clerk_sync.integrations import http as error_table
from clerk_sync.testing import EmulatorServer

WRONG_KEY = "sk_test_not_this_instances_key"


@pytest.fixture(scope="module")
def clerk() -> Iterator[EmulatorServer]:
    with EmulatorServer() as server:
        yield server


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _settings(**env: str) -> Settings:
    return Settings.from_env({"DATABASE_URL": "sqlite://", **env})


def _session_keys_line(settings: Settings) -> str:
    (line,) = [check for check in run_checks(settings) if check.name == "session keys"]
    assert line.status == "fail"
    return line.detail


def _logged_cause(settings: Settings, token: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A request's verification with no keys: the 503 it is answered, and the cause its log line gives."""
    monkeypatch.setattr(error_table, "_logged", {})
    with httpx.Client() as client, structlog.testing.capture_logs() as logs:
        with pytest.raises(TokenKeysUnavailable) as caught:
            verifier_from_settings(settings, http=client).verify(token)
        assert error_table.error_response(caught.value).status == 503
    (cause,) = [entry["cause"] for entry in logs if entry["event"] == "answered_unavailable"]
    return str(cause)


def _says_it_plainly(text: str) -> None:
    assert "developer.mozilla.org" not in text and "For more information" not in text
    assert "Client error" not in text
    assert "clerk-sync doctor" not in text
    assert WRONG_KEY not in text


def test_a_wrong_secret_key_is_named_as_refused_by_clerk(clerk: EmulatorServer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(CLERK_SECRET_KEY=WRONG_KEY, CLERK_API_URL=clerk.url)
    token = clerk.mint_session_token(clerk.create_user("ada@example.com")["id"])
    for text in (_session_keys_line(settings), _logged_cause(settings, token, monkeypatch)):
        assert "Clerk refused CLERK_SECRET_KEY (401)" in text, text
        assert "not this instance's secret key (Clerk Dashboard -> API keys)" in text, text
        _says_it_plainly(text)


def test_a_wrong_api_url_is_named(clerk: EmulatorServer) -> None:
    text = _session_keys_line(_settings(CLERK_SECRET_KEY=clerk.secret_key, CLERK_API_URL=f"{clerk.url}/nope"))
    assert f"{clerk.url}/nope/v1/jwks answered 404" in text and "CLERK_API_URL should be the Backend API's base URL" \
        in text, text
    _says_it_plainly(text)


def test_a_wrong_jwks_url_is_named(clerk: EmulatorServer) -> None:
    missing = _session_keys_line(_settings(CLERK_JWKS_URL=f"{clerk.url}/v1/jwks-nope"))
    assert "answered 404" in missing and "CLERK_JWKS_URL is wrong" in missing, missing
    # the Backend API's JWKS needs the secret key: not a CLERK_JWKS_URL (fetched without one)
    keyed = _session_keys_line(_settings(CLERK_JWKS_URL=f"{clerk.url}/v1/jwks"))
    assert "refused the request (401)" in keyed and "CLERK_JWKS_URL should be the instance's public JWKS" in keyed
    for text in (missing, keyed):
        _says_it_plainly(text)


def test_no_connection_names_the_url_and_what_to_check(clerk: EmulatorServer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    settings = _settings(CLERK_SECRET_KEY=clerk.secret_key, CLERK_API_URL=url)
    token = clerk.mint_session_token(clerk.create_user("bob@example.com")["id"])
    for text in (_session_keys_line(settings), _logged_cause(settings, token, monkeypatch)):
        assert f"could not connect to {url}/v1/jwks" in text and "check CLERK_API_URL and the network" in text, text
        _says_it_plainly(text)


@pytest.mark.parametrize(("answer", "said"), [
    (httpx.ReadTimeout("timed out"), "got no full answer within its total time of 5 s (fetch_timeout_s: connecting, "
                                     "the answer and its body): check CLERK_API_URL and the network"),
    (httpx.Response(503, text="down"), "answered 503: Clerk is unavailable, retry later"),
    (httpx.Response(200, text="<html>"), "answered 200 but not with JSON: CLERK_API_URL should name the instance's"),
    (httpx.Response(301, headers={"location": "https://elsewhere.example/jwks"}),
     "answered 301 (to https://elsewhere.example/jwks): redirects are not followed"),
], ids=["timeout", "5xx", "not-json", "redirect"])
def test_other_failures_say_what_happened(answer: httpx.Response | httpx.HTTPError, said: str) -> None:
    from clerk_sync.auth.jwks import JWKSKeySource

    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(answer, httpx.HTTPError):
            raise answer
        return answer

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        source = JWKSKeySource("https://api.clerk.example/v1/jwks", client=client,
                               headers={"Authorization": f"Bearer {WRONG_KEY}"})
        with pytest.raises(TokenKeysUnavailable) as caught:
            source.prefetch()
    assert said in str(caught.value), str(caught.value)
    _says_it_plainly(str(caught.value))


def test_a_key_with_a_newline_is_never_quoted_by_the_jwks_message(clerk: EmulatorServer) -> None:
    """Review: httpx refuses a header with a newline, and its error quotes the header: the secret key, in full,
    in the 503's log line and doctor's. (Settings strips the key; a key passed in code is not.)"""
    from clerk_sync.auth.jwks import JWKSKeySource

    key = "sk_live_TOPSECRET123\n"
    with httpx.Client() as client:  # the real transport: connected, h11 refuses the header before sending it
        source = JWKSKeySource(f"{clerk.url}/v1/jwks", client=client, headers={"Authorization": f"Bearer {key}"})
        with pytest.raises(TokenKeysUnavailable) as caught:
            source.prefetch()
    said = str(caught.value)
    assert "TOPSECRET" not in said and "could not send its request" in said and "CLERK_SECRET_KEY" in said, said


def test_a_key_httpx_cannot_encode_is_a_503_not_a_500(clerk: EmulatorServer) -> None:
    """Final review: a non-ASCII key (passed in code; Settings refuses it) made the fetch raise UnicodeEncodeError
    out of the verifier, a 500 with a traceback, where it used to be the 503 with its cause."""
    from clerk_sync.auth.jwks import JWKSKeySource

    with httpx.Client() as client:
        source = JWKSKeySource(f"{clerk.url}/v1/jwks", client=client,
                               headers={"Authorization": "Bearer sk_live_TOPSECRET123\u2026"})
        with pytest.raises(TokenKeysUnavailable) as caught:
            source.prefetch()
    assert "TOPSECRET" not in str(caught.value) and "non-ASCII" in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__context__ is None  # (its repr quotes the header)


def test_credentials_in_the_jwks_or_api_url_are_never_shown(clerk: EmulatorServer) -> None:
    """Review finding: a proxy in front of the JWKS or the Backend API may take credentials in the URL; the JWKS
    messages (doctor's line, the service's log), doctor's Clerk API line and ``repr(settings)`` showed them."""
    port = _closed_port()
    jwks = _settings(CLERK_JWKS_URL=f"http://jwksuser:JwksPW@127.0.0.1:{port}/jwks.json")
    line = _session_keys_line(jwks)
    assert "JwksPW" not in line and "jwksuser" not in line and f"***@127.0.0.1:{port}/jwks.json" in line, line
    api = _settings(CLERK_SECRET_KEY=clerk.secret_key,
                    CLERK_API_URL=clerk.url.replace("http://", "http://proxyuser:Pr0xyPW@"))
    (api_line,) = [check for check in run_checks(api) if check.name == "Clerk Backend API"]
    assert "Pr0xyPW" not in api_line.detail and "***@" in api_line.detail, api_line  # (whatever Clerk answered)
    for settings in (jwks, api):
        assert "JwksPW" not in repr(settings) and "Pr0xyPW" not in repr(settings)
