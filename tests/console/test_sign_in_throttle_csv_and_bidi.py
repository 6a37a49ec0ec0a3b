"""Pentest of the operator console (findings 1, 3, 4, 5): failed operator sign-ins were neither limited nor
recorded (500 wrong tokens in 1.2 s, no log line, no metric); the audit CSV's formula guard missed a
full-width equals sign (U+FF1D) and a leading line feed or zero-width space; a right-to-left override in a name disguised it;
an organization without a name showed ``None``. On SQLite, PostgreSQL and MariaDB where a database is used.

The throttle runs on an injected clock (no sleeps)."""

from __future__ import annotations

import csv
import io
import re
from typing import Any

import httpx
import pytest
import structlog

from clerk_sync.auth.audit import AuditEntry, record_audit
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations.console import _pages
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.console.conftest import OPERATOR_TOKEN, ConsoleStack, operator_client
from tests.console.test_http import HTML, browser_like, csrf_of

RLO = "\u202e"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _throttle(clock: Clock, **limits: Any) -> Any:
    from clerk_sync.integrations.console._throttle import SignInThrottle  # (new: each test fails on its own)

    return SignInThrottle(clock=clock, **limits)


def _failures(stack: ConsoleStack) -> dict[tuple[str, str], float]:
    """``clerk_sync_console_sign_in_failures_total`` on the service's /metrics, by (via, reason)."""
    text = httpx.get(f"{stack.url}/metrics", timeout=30).text
    counts = {}
    for labels, value in re.findall(r"^clerk_sync_console_sign_in_failures_total\{([^}]*)\} (\S+)$", text,
                                    flags=re.MULTILINE):
        named = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        counts[named["via"], named["reason"]] = float(value)
    return counts


def _refusals(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in logs if line.get("event") == "console_sign_in_refused"]


# -- 1. failed sign-ins: limited, logged, counted ---------------------------------------------------------------
def test_the_throttle_counts_failures_per_address_in_a_sliding_window_on_its_clock() -> None:
    clock = Clock()
    throttle = _throttle(clock, limit=3, window_s=60)
    for n in (1, 2):
        assert throttle.failed("192.0.2.1") == n and throttle.retry_after("192.0.2.1") is None
        clock.now += 10
    assert throttle.failed("192.0.2.1") == 3
    assert throttle.retry_after("192.0.2.1") == 40  # the first failure (t=1000) leaves the window at 1060
    assert throttle.retry_after("192.0.2.2") is None  # another address is not held back
    clock.now += 39.5
    assert throttle.retry_after("192.0.2.1") == 1
    clock.now += 0.5
    assert throttle.retry_after("192.0.2.1") is None  # one failure left the window: one more try
    assert throttle.failed("192.0.2.1") == 3 and throttle.retry_after("192.0.2.1") == 10
    assert not hasattr(throttle, "succeeded")  # a success forgets nothing: failures age out of the window


def test_the_throttle_remembers_at_most_max_addresses_and_counts_an_ipv6_host_by_its_64() -> None:
    clock = Clock()
    throttle = _throttle(clock, limit=2, window_s=60, max_addresses=100)
    for i in range(1000):
        throttle.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(throttle) == 100  # memory is bounded; the least recently failed were forgotten
    assert throttle.retry_after("10.0.0.0") is None and throttle.failed("10.0.3.231") == 2
    # one IPv6 host holds its whole /64: changing the interface id does not reset its count
    throttle.failed("2001:db8:1:2::1")
    throttle.failed("2001:db8:1:2:ffff::9")
    assert throttle.retry_after("2001:db8:1:2::77") is not None
    assert throttle.retry_after("2001:db8:1:3::1") is None
    throttle.failed("::ffff:192.0.2.9")
    throttle.failed("192.0.2.9")
    assert throttle.retry_after("192.0.2.9") is not None  # an IPv4-mapped address is that IPv4 address


def test_wrong_tokens_on_the_form_are_logged_counted_and_then_answered_429_without_comparing(
        stack: ConsoleStack) -> None:
    clock = Clock()
    stack.console.sign_ins = _throttle(clock, limit=5, window_s=300)
    guess = "guess-0123456789-secret-looking"
    with browser_like(stack) as client, structlog.testing.capture_logs() as logs:
        token = csrf_of(client.get("/login").text)
        for _ in range(5):
            wrong = client.post("/login", data={"csrf": token, "token": guess})
            assert wrong.status_code == 401
            token = csrf_of(wrong.text)
        # the right token now: refused all the same (not compared), with when to come back
        held = client.post("/login", data={"csrf": token, "token": OPERATOR_TOKEN})
        assert held.status_code == 429 and held.headers["retry-after"] == "300", held.text[:300]
        assert "too many failed sign-ins" in held.text and "clerk_sync_console=" not in held.headers.get(
            "set-cookie", "")
        clock.now += 299
        token = csrf_of(held.text)
        held = client.post("/login", data={"csrf": token, "token": OPERATOR_TOKEN})
        assert held.status_code == 429 and held.headers["retry-after"] == "1"
        clock.now += 1
        signed = client.post("/login", data={"csrf": csrf_of(held.text), "token": OPERATOR_TOKEN})
        assert signed.status_code == 303 and "clerk_sync_console=" in signed.headers["set-cookie"]
    refused = _refusals(logs)
    assert len(refused) == 5 and all(r["log_level"] == "warning" for r in refused), logs
    assert [r["failures"] for r in refused] == [1, 2, 3, 4, 5]
    assert all(r["client"] == "127.0.0.1" and r["via"] == "form" for r in refused)
    assert refused[-1]["throttled_for_s"] == 300
    assert guess not in repr(logs) and OPERATOR_TOKEN not in repr(logs)  # never the token's text
    assert _failures(stack) == {("form", "wrong_token"): 5, ("form", "throttled"): 2}
    # the failures left the window; no audit row for a refused one (no identity to record)
    assert stack.console.sign_ins.retry_after("127.0.0.1") is None
    assert [r["action"] for r in stack.audit_rows()] == ["console.login"]


def test_wrong_bearer_tokens_are_throttled_too_but_a_genuine_token_refused_for_its_user_is_no_guess(
        stack: ConsoleStack) -> None:
    clock = Clock()
    stack.console.sign_ins = _throttle(clock, limit=3, window_s=60)
    grace = stack.emulator.mint_session_token(stack.user_id, expires_in_seconds=600)  # signed, not an admin
    with httpx.Client(base_url=stack.console_url, timeout=30) as client, \
            structlog.testing.capture_logs() as logs:
        for _ in range(3):
            assert client.get("/audit", headers={"Authorization": f"Bearer {grace}"}).status_code == 403
        assert stack.console.sign_ins.retry_after("127.0.0.1") is None
        for bad in ("guess-aaaaaaaaaaaaaaaa", "eyJhbGciOiJSUzI1NiJ9.e30.c2ln", grace[:-4] + "AAAA"):
            assert client.get("/audit", headers={"Authorization": f"Bearer {bad}"}).status_code == 401
        held = client.get("/audit", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
        assert held.status_code == 429 and held.headers["retry-after"] == "60"
        assert held.json()["error"] == "sign_in_throttled"
        clock.now += 60
        assert client.get("/audit", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"}).status_code == 200
    refused = _refusals(logs)
    assert [(r["via"], r["client"]) for r in refused] == [("bearer", "127.0.0.1")] * 3
    assert _failures(stack) == {("bearer", "wrong_token"): 3, ("bearer", "throttled"): 1}


# -- 3. the CSV export's formula guard --------------------------------------------------------------------------
FORMULAS = {
    "full-width equals": "\uff1dHYPERLINK(\"http://evil\",\"x\")",
    "full-width plus": "\uff0b1+1",
    "full-width minus": "\uff0d1+1",
    "full-width at": "\uff20SUM(1)",
    "small equals": "\ufe66SUM(1)",
    "minus sign": "\u22121+1",
    "leading line feed": "\n=1+1",
    "leading carriage return": "\r=1+1",
    "leading tab": "\t=1+1",
    "leading space": " =1+1",
    "leading spaces and no-break space": "  \u00a0@SUM(1)",
    "leading ideographic space": "\u3000=1+1",
    "zero-width space": "\u200b=1+1",
    "byte-order mark": "\ufeff+1",
    "word joiner": "\u2060-1",
    "right-to-left override": "\u202e=1+1",
    "zero-width space then full-width": "\u200b\uff1d1+1",
    "plain equals": "=1+1",
}


@pytest.mark.parametrize("value", FORMULAS.values(), ids=FORMULAS.keys())
def test_a_cell_that_a_spreadsheet_would_read_as_a_formula_is_prefixed(value: str) -> None:
    assert _pages._cell(value) == "'" + value


@pytest.mark.parametrize("value", ["user_2abc", "org_x", "console.login", "127.0.0.1", '{"a": "=1"}', "",
                                   "a=1", " user_x", "\u200buser_x", "2026-01-01T00:00:00+00:00", "'=1"])
def test_a_cell_that_starts_no_formula_is_kept(value: str) -> None:
    assert _pages._cell(value) == value


def test_the_audit_export_prefixes_each_variant(stack: ConsoleStack) -> None:
    with stack.store.transaction() as writer:
        for value in FORMULAS.values():
            record_audit(writer, AuditEntry("impersonation.refused", stack.admin_id, value[:64]))
    with operator_client(stack) as client:
        exported = client.get("/audit.csv", params={"action": "impersonation.refused"})
    targets = [r["target_clerk_id"] for r in csv.DictReader(io.StringIO(exported.text, newline=""))]
    assert targets == ["'" + v[:64] for v in FORMULAS.values()]


# -- 4 and 5. bidi controls shown, names isolated; an organization without a name -------------------------------
def test_bidi_controls_are_shown_and_names_isolated_and_a_nameless_org_is_not_none(stack: ConsoleStack) -> None:
    processor = WebhookProcessor(stack.store, WebhookVerifier([f.SECRET]))
    spoof = f"adm{RLO}nimgpj.exe"
    nameless = f.organization("org_nameless", 10)
    nameless["name"], nameless["slug"] = None, None
    events = {"u": f.envelope("user.created", f.user("user_rlo", 10, first_name=spoof,
                                                     email=f"x{RLO}moc.live@example.com")),
              "o": f.envelope("organization.created", f.organization("org_rlo", 10, name=spoof)),
              "n": f.envelope("organization.created", nameless),
              "m": f.envelope("organizationMembership.created", f.membership("orgmem_rlo", "org_rlo", "user_rlo", 10))}
    for key, event in events.items():
        assert processor.process(*f.signed(event, f"msg_rlo_{key}")).status == "applied", key
    shown = "adm\u27e8U+202E\u27e9nimgpj.exe"
    with operator_client(stack) as client:
        pages = {"/users": {}, "/users/user_rlo": {}, "/organizations/org_rlo": {}}
        for path, params in pages.items():
            page = client.get(path, params=params, headers=HTML)
            assert page.status_code == 200, (path, page.text[:300])
            assert RLO not in page.text, path  # no override reaches the browser, not even in <title>
            assert shown in page.text, path
        users = client.get("/users", headers=HTML).text
        assert f'<a href="/console/organizations/org_rlo"><bdi>{shown}</bdi></a>' in users
        assert f"<td><bdi>{shown}</bdi> <bdi>Lovelace</bdi></td>" in users
        assert "<bdi>x\u27e8U+202E\u27e9moc.live@example.com</bdi>" in users
        assert '<a href="/console/organizations/org_nameless"><bdi>(no name)</bdi></a>' in users
        assert ">None<" not in users
        org = client.get("/organizations/org_nameless", headers=HTML).text
        assert "<bdi>(no name)</bdi>" in org and "None" not in org.split("<main>")[1].split("</h1>")[0]
        assert "<title>org_nameless" in org
        assert f"<bdi>{shown}</bdi>" in client.get("/users/user_rlo", headers=HTML).text
