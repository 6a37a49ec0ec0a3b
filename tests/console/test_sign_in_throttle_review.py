"""Review of the console's sign-in throttle (findings 1, 2, 3, 10): ``GET /login/clerk`` compared a ``Bearer``
(and checked a forged ``?token=``) with no throttle, log line or count, and let the right token in while the
address was throttled; ``create_console(sign_ins=...)`` was ignored (an empty throttle is falsy); a burst of
concurrent wrong ``Bearer`` tokens was compared in full (the check and the record were a thread hop apart); the
bidi markers were written into form values sent back, so "Replay all failed matching this filter" replayed
another filter than the one shown.

The throttle runs on an injected clock, the concurrent burst on events (no sleeps)."""

from __future__ import annotations

import html.parser
import re
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from clerk_sync import migrations
from clerk_sync.config import Settings
from clerk_sync.integrations.console import create_console
from clerk_sync.integrations.console._throttle import SignInThrottle
from clerk_sync.store import Store, create_engine
from tests import factories as f
from tests._server import free_port, running
from tests.console.conftest import OPERATOR_TOKEN, ConsoleStack, operator_client
from tests.console.test_http import HTML, browser_like
from tests.console.test_sign_in_throttle_csv_and_bidi import Clock, _failures, _refusals

RLO = "\u202e"


# -- 1. every way in is throttled --------------------------------------------------------------------------------
def test_login_clerk_bearer_and_sign_in_link_are_throttled_logged_and_counted(stack: ConsoleStack) -> None:
    clock = Clock()
    stack.console.sign_ins = SignInThrottle(limit=3, window_s=60, clock=clock)
    with httpx.Client(base_url=stack.console_url, timeout=30) as client, \
            structlog.testing.capture_logs() as logs:
        for i in range(3):
            wrong = client.get("/login/clerk", headers={"Authorization": f"Bearer guess-{i:020d}"})
            assert wrong.status_code == 401, wrong.text[:300]
        # throttled: the right token is not compared, on /login/clerk as on every page
        for path in ("/login/clerk", "/audit"):
            held = client.get(path, headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
            assert held.status_code == 429 and held.headers["retry-after"] == "60", (path, held.text[:300])
            assert "set-cookie" not in held.headers and "location" not in held.headers
        clock.now += 60
        right = client.get("/login/clerk", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
        assert right.status_code == 303 and right.headers["location"] == "/console/"
        # a forged session token in a sign-in link is a guess too; a genuine link is then held back
        for forged in ("not-a-token-at-all", "eyJhbGciOiJSUzI1NiJ9.e30.c2ln",
                       stack.emulator.mint_session_token(stack.admin_id, expires_in_seconds=600)[:-4] + "AAAA"):
            assert client.get("/login/clerk", params={"token": forged}).status_code == 401, forged
        link = client.get(stack.sign_in_link(stack.admin_id))
        assert link.status_code == 429 and link.headers["retry-after"] == "60"
        assert "clerk_sync_console=" not in link.headers.get("set-cookie", "")
        clock.now += 60
        link = client.get(stack.sign_in_link(stack.admin_id))
        assert link.status_code == 303 and "clerk_sync_console=" in link.headers["set-cookie"]
    refused = _refusals(logs)
    assert [(r["via"], r["failures"]) for r in refused] == [("bearer", 1), ("bearer", 2), ("bearer", 3),
                                                             ("link", 1), ("link", 2), ("link", 3)]
    assert OPERATOR_TOKEN not in repr(logs)
    assert _failures(stack) == {("bearer", "wrong_token"): 3, ("bearer", "throttled"): 2,
                                ("link", "wrong_token"): 3, ("link", "throttled"): 1}
    assert stack.console.sign_ins.retry_after("127.0.0.1") is None  # the failures left the window


# -- 2. create_console(sign_ins=...) is the throttle in use ------------------------------------------------------
def test_create_console_uses_the_sign_in_throttle_it_is_given(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'console.db'}"
    engine = create_engine(url)
    migrations.upgrade(engine)
    engine.dispose()
    store = Store.from_url(url)
    settings = Settings.from_env({"DATABASE_URL": url, "CLERK_SYNC_CONSOLE": "1",
                                  "CLERK_SYNC_CONSOLE_TOKEN": OPERATOR_TOKEN})
    mine = SignInThrottle(limit=2, window_s=120, clock=Clock())
    assert not mine  # empty, so falsy (it has a __len__): what hid it before
    try:
        app = create_console(store, settings, sign_ins=mine)
        assert app.state.console.sign_ins is mine
        with running(app, free_port()) as served, httpx.Client(base_url=served, timeout=30) as client:
            for i in range(2):
                assert client.get("/audit", headers={"Authorization": f"Bearer guess-{i:020d}"}).status_code == 401
            held = client.get("/audit", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
            assert held.status_code == 429 and held.headers["retry-after"] == "120"
    finally:
        store.dispose()


# -- 3. a concurrent burst is compared `limit` at a time ---------------------------------------------------------
def test_more_than_limit_concurrent_right_operator_bearers_all_get_in_while_guesses_are_in_flight(
        stack: ConsoleStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review 2, finding 1: every Bearer reserved a slot before its token was compared, so more than ``limit``
    concurrent requests with the RIGHT token got 429 (and were counted as throttled failures). The operator
    token is now compared on the event loop, reserving nothing: guesses still being answered hold nothing back."""
    limit, burst = 3, 12
    stack.console.sign_ins = SignInThrottle(limit=limit, window_s=60, clock=Clock())
    access = stack.console.access
    compare = access.identify
    changed = threading.Condition()
    gate = threading.Event()
    entered = answered = 0
    statuses: list[tuple[str, int]] = []

    def held_identify(*args: Any, **kwargs: Any) -> Any:  # any comparison in a worker thread, held
        nonlocal entered
        with changed:
            entered += 1
            changed.notify_all()
        gate.wait(60)
        return compare(*args, **kwargs)

    def call(kind: str, token: str) -> None:
        nonlocal answered
        try:
            status = httpx.get(stack.console_url + "/audit", headers={"Authorization": f"Bearer {token}"},
                               timeout=60).status_code
        except httpx.HTTPError:  # pragma: no cover - reported below
            status = 0
        with changed:
            statuses.append((kind, status))
            answered += 1
            changed.notify_all()

    monkeypatch.setattr(access, "identify", held_identify)
    guesses = [threading.Thread(target=call, args=("wrong", f"guess-{i:020d}"), daemon=True)
               for i in range(limit - 1)]
    rights = [threading.Thread(target=call, args=("right", OPERATOR_TOKEN), daemon=True) for _ in range(burst)]
    try:
        for thread in guesses:
            thread.start()
        with changed:  # limit - 1 guesses in flight (or answered): each already remembered
            assert changed.wait_for(lambda: entered + answered >= limit - 1, timeout=60), (entered, answered)
        for thread in rights:
            thread.start()
        with changed:  # every right request answered, or (before) held in a comparison
            assert changed.wait_for(lambda: entered + answered >= limit - 1 + burst, timeout=60)
            during = Counter(statuses)
    finally:
        gate.set()
        for thread in guesses + rights:
            thread.join(60)
    assert during == {("right", 200): burst}, during
    assert Counter(statuses) == {("right", 200): burst, ("wrong", 401): limit - 1}
    assert _failures(stack) == {("bearer", "wrong_token"): limit - 1}  # no 429, none counted as throttled
    assert stack.console.sign_ins.retry_after("127.0.0.1") is None


def test_a_success_does_not_reset_an_addresses_failures(stack: ConsoleStack) -> None:
    """Review 2, finding 4: a success from an address forgot its failures, so a guesser sharing it (a NAT, a
    proxy) with a polling operator script got ``limit`` fresh guesses after each poll. They now age out."""
    clock = Clock()
    stack.console.sign_ins = SignInThrottle(limit=3, window_s=60, clock=clock)
    right = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    with httpx.Client(base_url=stack.console_url, timeout=30) as client:
        for i in range(2):
            assert client.get("/audit", headers={"Authorization": f"Bearer guess-{i:020d}"}).status_code == 401
            clock.now += 10
        assert client.get("/audit", headers=right).status_code == 200  # the script's poll
        assert client.get("/login/clerk", headers=right).status_code == 303
        assert stack.console.sign_ins.retry_after("127.0.0.1") is None  # 2 of 3: not held back
        assert client.get("/audit", headers={"Authorization": "Bearer guess-third-000000000"}).status_code == 401
        held = client.get("/audit", headers=right)
        assert held.status_code == 429 and held.headers["retry-after"] == "40"  # the first failure at t=1000
        clock.now += 40
        assert client.get("/audit", headers=right).status_code == 200  # one failure aged out
    assert stack.console.sign_ins.retry_after("127.0.0.1") is None
    assert stack.console.sign_ins.failed("127.0.0.1") == 3  # the two later failures are still remembered


@pytest.mark.parametrize("path", ["/audit", "/login/clerk"])
def test_a_burst_of_concurrent_wrong_bearer_tokens_is_compared_at_most_limit_times(
        stack: ConsoleStack, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    limit, burst = 3, 12
    clock = Clock()
    stack.console.sign_ins = SignInThrottle(limit=limit, window_s=60, clock=clock)
    access = stack.console.access
    compare = access.identify
    changed = threading.Condition()
    gate = threading.Event()
    entered = answered = 0
    statuses: list[tuple[int, str | None]] = []

    def held_identify(*args: Any, **kwargs: Any) -> Any:  # the comparison, held until the burst is in
        nonlocal entered
        with changed:
            entered += 1
            changed.notify_all()
        gate.wait(60)
        return compare(*args, **kwargs)

    def guess(i: int) -> None:
        nonlocal answered
        try:
            response = httpx.get(stack.console_url + path, headers={"Authorization": f"Bearer guess-{i:020d}"},
                                 timeout=60)
            answer = (response.status_code, response.headers.get("retry-after"))
        except httpx.HTTPError as exc:  # pragma: no cover - reported below
            answer = (0, repr(exc))
        with changed:
            statuses.append(answer)
            answered += 1
            changed.notify_all()

    monkeypatch.setattr(access, "identify", held_identify)
    threads = [threading.Thread(target=guess, args=(i,), daemon=True) for i in range(burst)]
    try:
        for thread in threads:
            thread.start()
        with changed:  # every request has either reached the comparison or been answered
            assert changed.wait_for(lambda: entered + answered >= burst, timeout=60), (entered, answered)
            compared, refused = entered, list(statuses)
    finally:
        gate.set()
        for thread in threads:
            thread.join(60)
    assert compared == limit, (compared, refused)
    assert refused == [(429, "60")] * (burst - limit)  # each guess was remembered before its thread hop
    assert Counter(s for s, _ in statuses) == {401: limit, 429: burst - limit}
    held = httpx.get(stack.console_url + "/audit", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
                     timeout=30)
    assert held.status_code == 429 and held.headers["retry-after"] == "60"
    assert entered == limit  # the right token was not compared either
    assert _failures(stack) == {("bearer", "wrong_token"): limit, ("bearer", "throttled"): burst - limit + 1}


# -- 10. form values are sent back as they are ------------------------------------------------------------------
class _Forms(html.parser.HTMLParser):
    """Each form's action and its inputs' (name, value), as a browser reads them (entities decoded)."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, list[tuple[str, str]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append((named.get("action", ""), []))
        elif tag == "input" and self.forms and "name" in named:
            self.forms[-1][1].append((named["name"], named.get("value", "")))


def _forms(page: str) -> dict[str, list[tuple[str, str]]]:
    parser = _Forms()
    parser.feed(page)
    return dict(parser.forms)


def _shown(page: str) -> str:
    """The page without its form values: what is displayed."""
    return re.sub(r'\svalue="[^"]*"', "", page)


def test_replay_all_matching_a_filter_with_a_bidi_control_replays_that_filter(stack: ConsoleStack) -> None:
    clerk_id = f"user_spoof{RLO}exe.jpg"
    data = f.user(clerk_id, 10)
    payload = f.envelope("user.updated", data, timestamp=10)
    with stack.store.transaction() as w:
        w.record_delivery("msg_bidi_filter", payload, event_type="user.updated", instance_id=payload["instance_id"],
                          event_timestamp=10, status="failed", error="database error: OperationalError: locked")
    with operator_client(stack) as client:
        page = client.get("/deliveries", params={"clerk_id": clerk_id}, headers=HTML)
        assert page.status_code == 200, page.text[:300]
        forms = _forms(page.text)
        assert ("clerk_id", clerk_id) in forms["/console/deliveries"]  # the filter box keeps the filter
        fields = [(k, v) for k, v in forms["/console/deliveries/replay"] if k != "csrf"]
        assert fields == [("clerk_id", clerk_id)]  # the exact filter, not "user_spoof⟨U+202E⟩exe.jpg"
        assert RLO not in _shown(page.text) and "user_spoof\u27e8U+202E\u27e9exe.jpg" in page.text  # shown marked
        asked = client.get("/deliveries/replay", params=fields, headers=HTML)  # the confirmation page, then its form
        assert asked.status_code == 200 and 'data-testid="replay-count">Replay 1 failed delivery?<' in asked.text
        fields = [(k, v) for k, v in _forms(asked.text)["/console/deliveries/replay"] if k != "csrf"]
        assert fields[0] == ("clerk_id", clerk_id) and RLO not in _shown(asked.text)
        replayed = client.post("/deliveries/replay", data=dict(fields), follow_redirects=False)
        assert replayed.status_code == 303, replayed.text[:300]
    rows = [r for r in stack.audit_rows() if r["action"] == "console.deliveries_replayed"]
    assert len(rows) == 1 and rows[0]["target_clerk_id"] == clerk_id
    assert rows[0]["details"]["filter"] == {"status": "failed", "clerk_id": clerk_id}
    assert rows[0]["details"]["total"] == 1  # the delivery the page listed was the one replayed


def test_the_login_forms_next_and_the_search_boxes_keep_their_value(stack: ConsoleStack) -> None:
    target = f"/console/users?q=a{RLO}b"
    with browser_like(stack) as client:
        login = client.get("/login", params={"next": target})
        assert ("next", target) in _forms(login.text)["/console/login"]
        assert RLO not in _shown(login.text)
    with operator_client(stack) as client:
        users = client.get("/users", params={"q": f"a{RLO}b"}, headers=HTML).text
        assert ("q", f"a{RLO}b") in _forms(users)["/console/users"]
        audit = client.get("/audit", params={"actor": f"user_{RLO}x", "action": f"console.{RLO}"},
                           headers=HTML).text
        inputs = _forms(audit)["/console/audit"]
        assert ("actor", f"user_{RLO}x") in inputs and ("action", f"console.{RLO}") in inputs
        assert RLO not in _shown(users) and RLO not in _shown(audit)


def test_the_type_filters_options_send_back_the_stored_type(stack: ConsoleStack) -> None:
    """Review of the fix: an option's text was also the value it submitted, so a stored event type holding a
    bidirectional control was sent back with the marker in it: a filter matching nothing."""
    import html as html_

    event_type = f"user.{RLO}updated"
    payload = f.envelope("user.updated", f.user("user_typed", 10), timestamp=10)
    with stack.store.transaction() as w:
        w.record_delivery("msg_bidi_type", payload, event_type=event_type, instance_id=payload["instance_id"],
                          event_timestamp=10, status="failed", error="database error: OperationalError: locked")
    with operator_client(stack) as client:
        page = client.get("/deliveries", headers=HTML).text
        select = re.search(r'<select name="type">(.*?)</select>', page, re.S)
        assert select is not None, page[:500]
        values = [html_.unescape(v) for v in re.findall(r'<option value="([^"]*)"', select.group(1))]
        assert event_type in values, values
        listed = client.get("/deliveries", params={"type": event_type}, headers=HTML).text
        assert "user_typed" in listed and "No deliveries" not in listed
