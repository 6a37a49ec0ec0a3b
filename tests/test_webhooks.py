"""Signature verification against the Svix/Standard Webhooks vectors and the malformed-header cases."""

from __future__ import annotations

import json

import pytest
from standardwebhooks.webhooks import Webhook as StdWebhook
from svix.webhooks import Webhook as SvixWebhook

from clerk_sync.errors import ConfigError, WebhookHeadersMissing, WebhookVerificationError
from clerk_sync.webhooks import SignedHeaders, WebhookVerifier, sign
from tests.conftest import EXAMPLES

VECTORS = json.loads((EXAMPLES / "webhook-signature-vectors.json").read_text())
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def _payload(vector: dict[str, object]) -> str:
    if "payload" in vector:
        return str(vector["payload"])
    repeat = vector["payload_repeat"]  # large-body vectors are described, not inlined
    assert isinstance(repeat, dict)
    return str(repeat["char"]) * int(repeat["count"])


@pytest.mark.parametrize("vector", VECTORS["valid"], ids=lambda v: v["source"][:50])
def test_valid_vectors_verify(vector: dict[str, object]) -> None:
    ts = int(str(vector["timestamp"]))
    verifier = WebhookVerifier([str(vector["secret"])], now=lambda: ts + 10)
    headers = {"svix-id": str(vector["msg_id"]), "svix-timestamp": str(ts), "svix-signature": str(vector["signature"])}
    assert verifier.verify(headers, _payload(vector).encode()) == vector["msg_id"]


@pytest.mark.parametrize("vector", VECTORS["invalid"], ids=lambda v: v["source"][:50])
def test_invalid_vectors_are_refused(vector: dict[str, object]) -> None:
    ts = int(str(vector["timestamp"]))
    verifier = WebhookVerifier([str(vector["secret"])], now=lambda: ts)
    headers = {"svix-id": str(vector["msg_id"]), "svix-timestamp": str(ts), "svix-signature": str(vector["signature"])}
    with pytest.raises(WebhookVerificationError):
        verifier.verify(headers, _payload(vector).encode())


def test_multi_signature_header_with_junk_entries_verifies() -> None:
    vector = VECTORS["valid"][0]
    ts = int(vector["timestamp"])
    headers = {"svix-id": vector["msg_id"], "svix-timestamp": str(ts),
               "svix-signature": VECTORS["multi_signature_header_example"]["header"]}
    assert WebhookVerifier([vector["secret"]], now=lambda: ts).verify(headers, vector["payload"].encode())


@pytest.mark.parametrize(
    "signature",
    ["garbage", "v1,a,b", "v1,!!!notbase64", "v2,abc", "", "v1,"],
    ids=["no-comma", "two-commas", "not-base64", "other-version", "empty", "empty-sig"],
)
def test_malformed_signature_lists_are_a_clean_verification_error(signature: str) -> None:
    headers = {"svix-id": "msg_1", "svix-timestamp": "1700000000", "svix-signature": signature}
    with pytest.raises((WebhookVerificationError, WebhookHeadersMissing)):
        WebhookVerifier([SECRET], now=lambda: 1700000000).verify(headers, b"{}")


@pytest.mark.parametrize(("offset", "ok"), [(-301, False), (-299, True), (299, True), (301, False)])
def test_timestamp_tolerance_is_five_minutes_both_ways(offset: int, ok: bool) -> None:
    now = 1_700_000_000
    headers = sign(SECRET, "msg_t", now + offset, b"{}")
    verifier = WebhookVerifier([SECRET], now=lambda: now)
    if ok:
        assert verifier.verify(headers, b"{}") == "msg_t"
    else:
        with pytest.raises(WebhookVerificationError, match=r"too (old|new)"):
            verifier.verify(headers, b"{}")


@pytest.mark.parametrize("value", ["hello", "9" * 400, "1_700_000_000", " 1700000000", "\u0661\u0667"],
                         ids=["word", "400-digits", "underscores", "space", "arabic-digits"])
def test_non_numeric_timestamp_is_refused(value: str) -> None:
    """400 digits parsed by int() then overflowed the float of the tolerance check: a 500, not a 401."""
    headers = {"svix-id": "m", "svix-timestamp": value, "svix-signature": "v1,abc="}
    with pytest.raises(WebhookVerificationError, match="not an integer"):
        WebhookVerifier([SECRET]).verify(headers, b"{}")


def test_missing_headers_name_the_header() -> None:
    with pytest.raises(WebhookHeadersMissing, match="svix-signature"):
        SignedHeaders.from_headers({"svix-id": "x", "svix-timestamp": "1"})


def test_unbranded_webhook_headers_are_accepted_and_case_is_ignored() -> None:
    headers = sign(SECRET, "msg_u", 1_700_000_000, b"{}")
    unbranded = {k.replace("svix-", "Webhook-").upper(): v for k, v in headers.items()}
    assert WebhookVerifier([SECRET], now=lambda: 1_700_000_000).verify(unbranded, b"{}") == "msg_u"


def test_rotation_any_configured_secret_verifies() -> None:
    old, new = SECRET, "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
    headers = sign(old, "msg_r", 1_700_000_000, b"{}")
    verifier = WebhookVerifier([new, old], now=lambda: 1_700_000_000)
    assert verifier.verify(headers, b"{}") == "msg_r"
    with pytest.raises(WebhookVerificationError):
        WebhookVerifier([new], now=lambda: 1_700_000_000).verify(headers, b"{}")


def test_one_secret_may_be_passed_alone() -> None:
    """A bare string is one secret, not an iterable of one-character secrets (a ConfigError about base64)."""
    headers = sign(SECRET, "msg_one", 1_700_000_000, b"{}")
    assert WebhookVerifier(SECRET, now=lambda: 1_700_000_000).verify(headers, b"{}") == "msg_one"


def test_tampered_body_is_refused() -> None:
    headers = sign(SECRET, "msg_x", 1_700_000_000, b'{"a":1}')
    with pytest.raises(WebhookVerificationError):
        WebhookVerifier([SECRET], now=lambda: 1_700_000_000).verify(headers, b'{"a":2}')


def test_our_signatures_verify_with_the_official_libraries() -> None:
    import time

    body = b'{"type":"user.created","data":{}}'
    headers = sign(SECRET, "msg_lib", int(time.time()), body)
    SvixWebhook(SECRET).verify(body, headers)
    StdWebhook(SECRET).verify(body, {k.replace("svix-", "webhook-"): v for k, v in headers.items()})


def test_secret_without_the_whsec_prefix_is_accepted_like_the_svix_libraries_do() -> None:
    """Regression (issue 10 #8): a prefix-less secret verified in Svix's libraries but was refused at start-up."""
    import time

    from clerk_sync.config import Settings

    bare = SECRET.removeprefix("whsec_")
    body = b'{"type":"user.created","data":{}}'
    headers = sign(SECRET, "msg_bare", 1_700_000_000, body)
    now = int(time.time())
    SvixWebhook(bare).verify(body, sign(SECRET, "msg_bare", now, body))  # Svix accepts it (wall clock)
    settings = Settings.from_env({"CLERK_WEBHOOK_SIGNING_SECRET": f"{bare} whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"})
    verifier = WebhookVerifier(settings.webhook_secrets(), now=lambda: 1_700_000_000)
    assert verifier.verify(headers, body) == "msg_bare"
    for bad in ("whsec_", "not base64!", "whsec_abc$def"):
        with pytest.raises(ConfigError, match="whsec_"):
            Settings.from_env({"CLERK_WEBHOOK_SIGNING_SECRET": bad}).webhook_secrets()


def test_empty_secret_list_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        WebhookVerifier([])


def test_the_tolerance_message_names_the_configured_tolerance() -> None:
    now = 1_700_000_000
    headers = sign(SECRET, "msg_t", now - 11, b"{}")
    with pytest.raises(WebhookVerificationError, match=r"too old: outside the 10 s tolerance"):
        WebhookVerifier([SECRET], tolerance_s=10, now=lambda: now).verify(headers, b"{}")
