"""The emulator against Clerk's and Svix's published behaviour where it once differed (review "emu").

Each test names the reference: ``tests/fixtures/clerk`` (Clerk's OpenAPI spec and examples, vendored) or the
Svix behaviour FACTS §1-2 records (``svix-server`` worker: overload penalty, ``Retry-After`` clamp, jitter,
secret rotation).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import yaml

from clerk_sync import migrations
from clerk_sync.auth.claims import auth_from_claims
from clerk_sync.auth.users import read_user
from clerk_sync.clerk_api import API_VERSION, ClerkClient
from clerk_sync.config import Settings
from clerk_sync.emulator import EmulatorConfig
from clerk_sync.emulator.config import DEFAULT_ROLE_PERMISSIONS
from clerk_sync.emulator.delivery import OVERLOAD_PENALTY_S, SECRET_ROTATION_GRACE_S
from clerk_sync.emulator.endpoints import API_VERSIONS
from clerk_sync.errors import WebhookVerificationError
from clerk_sync.integrations.starlette import build_processor, create_app
from clerk_sync.store import create_engine
from clerk_sync.testing import EmulatorServer, serve_app
from clerk_sync.webhooks import WebhookVerifier
from tests.emulator.support import BAPI_SPEC, Receiver, SpecValidator, served_receiver

NOW = 1_700_000_000.0


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with served_receiver() as recv:
        yield recv


def _wait_for_attempts(clerk: EmulatorServer, count: int, index: int = 0) -> dict[str, Any]:
    """The ``index``-th message once it has ``count`` attempts (the attempt's outcome, not a time threshold)."""
    deadline = time.monotonic() + 10
    while True:
        log = clerk.deliveries()
        if len(log) > index and len(log[index]["attempts"]) >= count:
            return log[index]
        assert time.monotonic() < deadline, f"attempt {count} never made: {log}"
        time.sleep(0.01)


# -- D1: webhook secret rotation (Svix signs with the new and the old secret for 24 h) -------------------------


def test_a_rotated_secret_signs_beside_the_old_one_for_svix_s_24_hours(receiver: Receiver) -> None:
    now = [NOW]
    with EmulatorServer(seed=3, webhook_url=receiver.url, clock=lambda: now[0]) as clerk:
        old = clerk.emulator.webhook_secret
        new = clerk.request("POST", "/_emulator/webhook/rotate_secret", json={})["secret"]
        assert new.startswith("whsec_") and new != old
        assert clerk.emulator.webhook_secret == new
        clerk.create_user("during@example.com")
        clerk.wait_for_deliveries()
        during = receiver.received[-1]
        entries = during.headers["svix-signature"].split(" ")
        assert len(entries) == 2 and all(e.startswith("v1,") for e in entries)
        # an app on either secret accepts it (clerk-sync's verifier, as CLERK_WEBHOOK_SIGNING_SECRET="old" or "new")
        for secrets in ([old], [new], [old, new]):
            assert WebhookVerifier(secrets, now=lambda: now[0]).verify(during.headers, during.body)

        now[0] += SECRET_ROTATION_GRACE_S  # the old secret's 24 h are over: it signs no more
        clerk.create_user("after@example.com")
        clerk.wait_for_deliveries()
        after = receiver.received[-1]
        assert len(after.headers["svix-signature"].split(" ")) == 1
        assert WebhookVerifier([new], now=lambda: now[0]).verify(after.headers, after.body)
        with pytest.raises(WebhookVerificationError, match="no matching signature"):
            WebhookVerifier([old], now=lambda: now[0]).verify(after.headers, after.body)

        clerk.reset()  # reset restores the configured secret
        assert clerk.emulator.webhook_secret == old == clerk.config.effective_webhook_secret


def test_rotating_to_a_given_secret_and_refusing_an_unusable_one(receiver: Receiver) -> None:
    with EmulatorServer(seed=3, webhook_url=receiver.url) as clerk:
        chosen = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # vector 1 of webhook-signature-vectors.json
        answer = clerk.request("POST", "/_emulator/webhook/rotate_secret", json={"secret": chosen, "grace_s": 0})
        assert answer == {"secret": chosen}
        assert clerk.webhook_secret == chosen  # what a test hands its receiver: the secret that signs now
        clerk.create_user("given@example.com")
        clerk.wait_for_deliveries()
        item = receiver.received[-1]
        assert len(item.headers["svix-signature"].split(" ")) == 1  # no grace: the old one signs no more
        assert WebhookVerifier(chosen).verify(item.headers, item.body)
        refused = httpx.post(f"{clerk.url}/_emulator/webhook/rotate_secret", json={"secret": "whsec_"},
                             headers={"Authorization": f"Bearer {clerk.secret_key}"})
        assert refused.status_code == 422
        assert "cannot sign" in refused.json()["errors"][0]["message"]


# -- D2: retry delays as Svix's worker computes them ----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retry_after", "delay"),
    [
        (503, None, 5.0),  # the schedule's 5 s
        (503, "1", 5.0),  # Retry-After never shortens the schedule
        (503, "8", 8.0),  # ... lengthens it, within twice the scheduled delay
        (503, "3600", 10.0),  # ... at most twice
        (503, "Tue, 14 Nov 2023 22:13:27 GMT", 7.0),  # an HTTP date (NOW + 7 s)
        (503, "\u00b2", 5.0),  # not a number ("²".isdigit() is true): as if absent, not a crash of the attempt
        (429, None, OVERLOAD_PENALTY_S),  # a 429 waits at least Svix's overload penalty
        (429, "3600", 2 * OVERLOAD_PENALTY_S),
    ],
    ids=["plain", "shorter", "longer", "capped", "http-date", "superscript", "429", "429-retry-after"],
)
def test_the_next_attempt_honours_retry_after_and_the_overload_penalty(
    receiver: Receiver, status: int, retry_after: str | None, delay: float
) -> None:
    receiver.status_for = lambda item: status
    if retry_after is not None:
        receiver.response_headers["Retry-After"] = retry_after
    with EmulatorServer(seed=1, webhook_url=receiver.url, clock=lambda: NOW) as clerk:  # time stands still
        clerk.create_user("retry@example.com")
        message = _wait_for_attempts(clerk, 1)
        assert message["attempts"][0]["status_code"] == status
        assert message["next_attempt_at"] - NOW == pytest.approx(delay)
        clerk.emulator.delivery.clear()


def test_a_timed_out_attempt_waits_at_least_the_overload_penalty() -> None:
    with socket.socket() as silent:  # accepts (the backlog), never answers: the attempt times out
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/webhooks/clerk"
        with EmulatorServer(seed=1, webhook_url=url, delivery_timeout_s=0.2, clock=lambda: NOW) as clerk:
            clerk.create_user("slow@example.com")
            message = _wait_for_attempts(clerk, 1)
            assert message["attempts"][0]["outcome"] == "timeout"
            assert message["next_attempt_at"] - NOW == pytest.approx(OVERLOAD_PENALTY_S)  # not the schedule's 5 s
            clerk.emulator.delivery.clear()


def test_svix_jitter_is_a_knob_and_seeded(receiver: Receiver) -> None:
    receiver.status_for = lambda item: 500

    def next_delays() -> list[float]:
        with EmulatorServer(seed=5, webhook_url=receiver.url, retry_jitter=0.2, clock=lambda: NOW) as clerk:
            for n in range(4):
                clerk.create_user(f"jitter{n}@example.com")
            delays = [_wait_for_attempts(clerk, 1, i)["next_attempt_at"] - NOW for i in range(4)]
            clerk.emulator.delivery.clear()
        return delays

    first = next_delays()
    assert all(4.0 <= d <= 6.0 for d in first), first  # 5 s ± 20 %
    assert len(set(first)) > 1  # jittered, message by message
    assert next_delays() == first  # the same seed, the same delays
    with pytest.raises(ValueError, match="retry_jitter"):
        EmulatorConfig(retry_jitter=1.0)


# -- D3: Clerk-API-Version is checked -------------------------------------------------------------------------


def test_the_api_version_clerk_sync_sends_is_one_clerk_has() -> None:
    assert API_VERSION in API_VERSIONS
    with EmulatorServer(seed=2) as clerk:
        clerk.create_user("version@example.com")
        with ClerkClient(clerk.secret_key, api_url=clerk.api_url) as client:
            assert [u["email_addresses"][0]["email_address"] for u in client.list_users()] == ["version@example.com"]


@pytest.mark.parametrize(
    ("headers", "query"),
    [({"Clerk-API-Version": "2026-13-01"}, ""), ({}, "?__clerk_api_version=v1"),
     ({"Clerk-API-Version": "2026-05-12"}, "?__clerk_api_version=2026-05-12")],
    ids=["unknown-header", "unknown-query", "both"],
)
def test_an_unknown_or_doubled_api_version_is_an_invalid_request(headers: dict[str, str], query: str) -> None:
    bapi = SpecValidator(BAPI_SPEC)
    with EmulatorServer(seed=2) as clerk:
        auth = {"Authorization": f"Bearer {clerk.secret_key}"}
        refused = httpx.get(f"{clerk.api_url}/users{query}", headers={**auth, **headers})
        assert refused.status_code == 400
        bapi.validate("ClerkErrors", refused.json())
        assert refused.json()["errors"][0]["code"] == "api_version_invalid"
        for version in sorted(API_VERSIONS):
            assert httpx.get(f"{clerk.api_url}/users", headers={**auth, "Clerk-API-Version": version}).is_success
        assert httpx.get(f"{clerk.api_url}/users", headers=auth).is_success  # none given: the instance's default


# -- D4: the first order_by counts (the spec) ---------------------------------------------------------------


def test_only_the_first_order_by_counts_as_the_spec_says() -> None:
    spec = yaml.safe_load(BAPI_SPEC.read_text())
    order_by = next(p for p in spec["paths"]["/users"]["get"]["parameters"] if p.get("name") == "order_by")
    assert "we will only keep the first one" in order_by["description"]
    with EmulatorServer(seed=2) as clerk:
        for name in ("Bea", "Al", "Cy"):
            clerk.create_user(f"{name.lower()}@example.com", first_name=name)
        auth = {"Authorization": f"Bearer {clerk.secret_key}"}
        users = httpx.get(f"{clerk.api_url}/users?order_by=first_name&order_by=-created_at", headers=auth).json()
        assert [u["first_name"] for u in users] == ["Al", "Bea", "Cy"]
        orgs = [clerk.create_organization(n)["name"] for n in ("Beta", "Alpha")]
        listed = httpx.get(f"{clerk.api_url}/organizations?order_by=name&order_by=-created_at", headers=auth).json()
        assert [o["name"] for o in listed["data"]] == sorted(orgs)


# -- D6: message ids are not the records' ids under another prefix ------------------------------------------


def test_svix_ids_do_not_repeat_the_records_ids(receiver: Receiver) -> None:
    with EmulatorServer(seed=7, webhook_url=receiver.url) as clerk:
        users = [clerk.create_user(f"id{n}@example.com") for n in range(3)]
        clerk.wait_for_deliveries()
        suffixes = {u["id"].partition("_")[2] for u in users}
        suffixes |= {e["id"].partition("_")[2] for u in users for e in u["email_addresses"]}
        assert not {i.partition("_")[2] for i in receiver.ids()} & suffixes
        assert [json.loads(r.body)["data"]["id"] for r in receiver.received] == [u["id"] for u in users]


# -- D9: an instance still on v1 session tokens ------------------------------------------------------------


def test_a_v1_instance_mints_v1_claims_and_clerk_sync_reads_them() -> None:
    """Clerk's docs, session tokens, version 1 tab (FACTS §5.2): no ``v``/``sts``/``jti``/``o``/``fea``; the active
    organization in top-level ``org_id``, ``org_slug``, ``org_role`` (prefixed) and ``org_permissions`` (custom
    permissions only). v1 is deprecated, not gone: an instance keeps it until updated in the Dashboard."""
    admin = (*DEFAULT_ROLE_PERMISSIONS["org:admin"], "org:invoices:read", "org:invoices:create")
    with EmulatorServer(seed=4, session_token_version=1,
                        role_permissions={**DEFAULT_ROLE_PERMISSIONS, "org:admin": admin}) as clerk:
        user = clerk.create_user("v1@example.com")
        org = clerk.create_organization("Acme", created_by=user["id"])  # its creator is its admin
        token = clerk.mint_session_token(user["id"], org_id=org["id"])
        claims = jwt.decode(token, clerk.emulator.keys.public_key_pem(), algorithms=["RS256"],
                            options={"verify_aud": False})
        assert set(claims) == {"azp", "exp", "iat", "iss", "nbf", "sid", "sub", "fva", "org_id", "org_slug",
                               "org_role", "org_permissions"}
        assert (claims["org_id"], claims["org_slug"], claims["org_role"]) == (org["id"], org["slug"], "org:admin")
        assert claims["org_permissions"] == ["org:invoices:read", "org:invoices:create"]
        auth = auth_from_claims(claims)
        assert (auth.version, auth.status, auth.org_id, auth.org_role) == (1, "active", org["id"], "org:admin")
        assert auth.org_permissions == ("org:invoices:read", "org:invoices:create")
        without_org = jwt.decode(clerk.mint_session_token(user["id"]), options={"verify_signature": False})
        assert not {"org_id", "o", "v", "sts"} & set(without_org)
    with pytest.raises(ValueError, match="session_token_version"):
        EmulatorConfig(session_token_version=3)


def test_clerk_sync_s_service_on_the_old_secret_takes_deliveries_through_a_rotation(tmp_path: Path) -> None:
    """End to end, D1: the service configured with the secret from before the rotation keeps storing deliveries
    whose ``svix-signature`` carries the new secret's signature first and its own second."""
    url = f"sqlite:///{tmp_path / 'clerk_sync.db'}"
    engine = create_engine(url)
    migrations.upgrade(engine)
    engine.dispose()
    with EmulatorServer(seed=1, time_scale=1000.0) as clerk:
        old = clerk.emulator.webhook_secret
        settings = Settings.from_env({"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": old,
                                      "CLERK_SYNC_PRUNE_INTERVAL_S": "0"})
        processor = build_processor(settings)
        try:
            with serve_app(create_app(settings, processor)) as app_url:
                clerk.set_webhook_url(f"{app_url}/webhooks/clerk")
                clerk.emulator.rotate_webhook_secret()
                user = clerk.create_user("rotated@example.com")
                clerk.wait_for_deliveries()
                log = clerk.deliveries()
                assert [(m["status"], len(m["attempts"])) for m in log] == [("succeeded", 1)]
                assert read_user(processor.store, user["id"]) is not None
        finally:
            processor.store.dispose()
