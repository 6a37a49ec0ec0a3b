"""``CLERK_API_URL``: the SDK's ``.../v1`` form works, and a wrong address says which setting to check."""

from __future__ import annotations

import socket

import pytest

from clerk_sync.clerk_api import ClerkClient, RetryPolicy
from clerk_sync.config import Settings
from clerk_sync.errors import ClerkUnavailable
from clerk_sync.testing import EmulatorServer

ONE_TRY = RetryPolicy(attempts=1, deadline_s=2.0)


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"], ids=["bare", "slash", "v1", "v1-slash"])
def test_the_sdk_server_url_form_is_accepted(emu: EmulatorServer, suffix: str) -> None:
    """Review: ``CLERK_API_URL=https://api.clerk.com/v1`` (what the Clerk Python SDK calls ``server_url``)
    became ``/v1/v1/...``: every call 404ed, blaming the user or organization asked for."""
    user = emu.create_user(email="ada@example.com")
    settings = Settings.from_env({"CLERK_SECRET_KEY": emu.secret_key, "CLERK_API_URL": emu.url + suffix})
    with ClerkClient.from_settings(settings, retry=ONE_TRY) as clerk:
        assert clerk.get_user(user["id"])["id"] == user["id"]


def _refused_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_connection_error_names_clerk_api_url_and_what_was_tried() -> None:
    port = _refused_port()
    with (ClerkClient("sk_test_x", api_url=f"http://proxy:s3cret@127.0.0.1:{port}", retry=ONE_TRY) as clerk,
          pytest.raises(ClerkUnavailable) as down):
        clerk.count_users()
    message = str(down.value)
    assert f"could not connect to http://127.0.0.1:{port}/v1 (ConnectError: " in message
    assert "check CLERK_API_URL (Clerk's is https://api.clerk.com)" in message
    assert "s3cret" not in message  # credentials in the URL are never echoed


def test_the_v1_form_also_reaches_the_jwks_for_session_tokens(emu: EmulatorServer) -> None:
    """The JWKS fetch (and doctor) build their URLs from CLERK_API_URL too: the setting itself is
    normalised, so ``.../v1`` verifies session tokens as the bare URL does."""
    from clerk_sync.auth.sessions import verifier_from_settings

    user = emu.create_user(email="grace@example.com")
    settings = Settings.from_env({"CLERK_SECRET_KEY": emu.secret_key, "CLERK_API_URL": f" {emu.url}/v1/ "})
    assert settings.clerk_api_url == emu.url
    verifier = verifier_from_settings(settings)
    assert verifier.verify(emu.mint_session_token(user["id"])).user_id == user["id"]


def test_a_key_passed_in_code_is_stripped_or_refused_as_settings_does(emu: EmulatorServer) -> None:
    """Left from the last session: Settings stripped and refused keys no header can carry, but a key passed to
    ``ClerkClient`` in code with a non-ASCII character raised UnicodeEncodeError from every call, and one read
    from a file kept its newline (httpx's refusal quoted the header: the key)."""
    from clerk_sync.clerk_api import AsyncClerkClient
    from clerk_sync.errors import ConfigError

    user = emu.create_user(email="ada@example.com")
    with ClerkClient(emu.secret_key + "\n", api_url=emu.url, retry=ONE_TRY) as clerk:
        assert clerk.get_user(user["id"])["id"] == user["id"]
    for face in (ClerkClient, AsyncClerkClient):
        with pytest.raises(ConfigError, match="CLERK_SECRET_KEY is not set"):  # ClerkClient(os.environ.get(..))
            face(None, api_url=emu.url)  # type: ignore[arg-type]  (review: an AttributeError from .strip())
        for key in ("sk_live_TOPSECRET123\u2026", "sk_live_TOP SECRET123", "sk_live_TOPSECRET\x00123"):
            with pytest.raises(ConfigError) as refused:
                face(key, api_url=emu.url)
            assert "non-ASCII" in str(refused.value) and "TOPSECRET" not in str(refused.value)
