"""The console, each once broken: links through the host's router, replay of deliveries that
are not ``failed``, masking of metadata keys, numbers and dates, security headers on early answers."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from clerk_sync.changes import Hook
from clerk_sync.config import Settings
from clerk_sync.ingest import replay_delivery
from clerk_sync.integrations.console import _queries, create_console
from clerk_sync.integrations.console._masking import MASK, mask
from clerk_sync.store import Store
from clerk_sync.tables import audit_log, hook_jobs, webhook_events
from tests import factories as f
from tests._server import free_port, running
from tests.console.conftest import OPERATOR_TOKEN

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]

HTML = {"Accept": "text/html"}
BEARER = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
# Names a host app has for its own routes (FastAPI names each after its function), the console's names too.
TAKEN = {"login": "/login", "logout": "/logout", "overview": "/", "users": "/users", "user": "/users/{clerk_id}",
         "audit": "/audit", "deliveries": "/deliveries", "delivery": "/deliveries/{delivery_id}",
         "drift": "/drift", "replay": "/deliveries/{delivery_id}/replay"}


@pytest.fixture
def hooked_store(db_url: str) -> Iterator[Store]:
    """A store with a hook on every change, so a replay that applies queues a job."""
    store = Store.from_url(db_url, hooks=[Hook("announce", lambda change: None)])
    yield store
    store.dispose()


def _settings() -> Settings:
    return Settings.from_env({"CLERK_SYNC_CONSOLE": "1", "CLERK_SYNC_CONSOLE_TOKEN": OPERATOR_TOKEN})


@contextmanager
def served(app: Starlette, **options: Any) -> Iterator[httpx.Client]:
    """``app`` on loopback, and a client that follows no redirect."""
    with running(app, free_port()) as url, httpx.Client(base_url=url, timeout=30, **options) as client:
        yield client


def _mounted(store: Store) -> Starlette:
    return Starlette(routes=[Mount("/console", app=create_console(store, _settings()))])


def _starlette_host(console: Starlette, static: Path) -> Starlette:
    async def host(request: Request) -> Response:
        return PlainTextResponse(f"the host's {request.url.path}")

    routes = [Route(path, host, name=name, methods=["GET", "POST"]) for name, path in TAKEN.items()]
    return Starlette(routes=[*routes, Mount("/static", StaticFiles(directory=static), name="static"),
                             Mount("/console", app=console)])


def _fastapi_host(console: Starlette, static: Path) -> FastAPI:
    app = FastAPI()
    for name, path in TAKEN.items():
        async def host(request: Request) -> Response:
            return PlainTextResponse(f"the host's {request.url.path}")

        app.add_api_route(path, host, methods=["GET", "POST"], name=name)
    app.mount("/static", StaticFiles(directory=static), name="static")  # as FastAPI's docs show
    app.mount("/console", console)
    return app


def _record(store: Store, svix_id: str, user_id: str, *, status: str, updated_at: int = 1_700_000_001_000,
            event_type: str = "user.created", **user: Any) -> int:
    """A stored delivery about ``user_id`` with ``status``; its row id."""
    payload = f.envelope(event_type, {**f.user(user_id, updated_at), **user}, timestamp=updated_at)
    with store.transaction() as w:
        w.record_delivery(svix_id, payload, event_type=event_type, instance_id=f.INSTANCE,
                          event_timestamp=updated_at, status=status, error="injected" if status == "failed" else None)
        return int(w.conn.execute(sa.select(webhook_events.c.id).where(webhook_events.c.svix_id == svix_id))
                   .scalar_one())


def _counts(store: Store) -> tuple[int, int]:
    """(audit rows, hook jobs)."""
    with store.connect() as conn:
        return (conn.execute(sa.select(sa.func.count()).select_from(audit_log)).scalar_one(),
                conn.execute(sa.select(sa.func.count()).select_from(hook_jobs)).scalar_one())


def _row(store: Store, svix_id: str) -> tuple[str, int]:
    with store.connect() as conn:
        status, attempts = conn.execute(sa.select(webhook_events.c.status, webhook_events.c.attempts)
                                        .where(webhook_events.c.svix_id == svix_id)).one()
    return str(status), int(attempts)


def _urls(html: str) -> list[str]:
    return re.findall(r'(?:href|action|src|data-poll)="([^"]*)"', html)


# -- 1. URLs resolve against the console's own routes, not the host's ---------------------------------------
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # routing, not the database
@pytest.mark.parametrize("make_host", [_starlette_host, _fastapi_host], ids=["starlette", "fastapi"])
def test_links_forms_redirects_and_scripts_stay_inside_a_mounted_console(
        hooked_store: Store, tmp_path: Path, make_host: Callable[[Starlette, Path], Starlette]) -> None:
    """Fixed: ``request.url_for`` resolves through the outermost router, so in a host app with its
    own ``login``/``users``/``static``... routes the console's links, forms, redirects and its CSS and script
    pointed at the host's: a stranger was sent to the host's /login, Sign out posted to the host's /logout."""
    (tmp_path / "console.css").write_text("/* the host's */")
    failed = _record(hooked_store, "msg_links", "user_links", status="failed")
    app = make_host(create_console(hooked_store, _settings()), tmp_path)
    with served(app) as client:
        stranger = client.get("/console/deliveries", headers=HTML)
        assert stranger.status_code == 303 and stranger.headers["location"].startswith("/console/login?")
        login = client.get("/console/login", headers=HTML)
        token = re.search(r'name="csrf" value="([^"]+)"', login.text)
        assert token is not None and all(u.startswith("/console/") for u in _urls(login.text)), _urls(login.text)
        signed_in = client.post("/console/login", data={"csrf": token.group(1), "token": OPERATOR_TOKEN})
        assert (signed_in.status_code, signed_in.headers["location"]) == (303, "/console/")
        pages = ["/console/", "/console/deliveries", f"/console/deliveries/{failed}", "/console/users",
                 "/console/users/user_links", "/console/audit", "/console/drift"]
        shown: list[str] = []
        for path in pages:
            page = client.get(path, headers=HTML)
            assert page.status_code in (200, 404), (path, page.status_code)
            shown += _urls(page.text)
        assert shown and [u for u in shown if not u.startswith("/console/")] == []
        assert "/console/static/console.css" in shown and "/console/static/console.js" in shown
        csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/console/", headers=HTML).text)
        assert csrf is not None
        replayed = client.post(f"/console/deliveries/{failed}/replay", data={"csrf": csrf.group(1)})
        assert replayed.headers["location"].startswith(f"/console/deliveries/{failed}?")
        bulk = client.post("/console/deliveries/replay", data={"csrf": csrf.group(1)})
        assert bulk.headers["location"].startswith("/console/deliveries?")
        signed_out = client.post("/console/logout", data={"csrf": csrf.group(1)})
        assert (signed_out.status_code, signed_out.headers["location"]) == (303, "/console/login")


# -- 2. Replay only what is still failed ---------------------------------------------------------------------
def test_a_second_replay_of_a_replayed_delivery_writes_nothing(hooked_store: Store) -> None:
    """Fixed: replaying a delivery that had just applied relabelled it ``skipped``, counted another
    attempt and wrote another audit row. Only a ``failed`` delivery is replayed; any other is left alone."""
    row_id = _record(hooked_store, "msg_twice", "user_twice", status="failed")
    with served(_mounted(hooked_store), headers=BEARER) as client:
        first = client.post(f"/console/deliveries/{row_id}/replay")
        assert first.headers["location"].endswith("?done=replayed:applied")
        after_first = (_row(hooked_store, "msg_twice"), _counts(hooked_store))
        assert after_first[1] == (1, 1)  # its audit row, and the hook job of a change never announced before
        second = client.post(f"/console/deliveries/{row_id}/replay")
        assert second.status_code == 303
        notice = client.get(second.headers["location"], headers=HTML).text
    assert f'data-testid="notice">not replayed: delivery {row_id} is applied<' in notice
    assert (_row(hooked_store, "msg_twice"), _counts(hooked_store)) == after_first


def test_an_applied_delivery_is_not_replayed_and_shows_no_replay_button(hooked_store: Store) -> None:
    """Fixed: an old applied ``user.created`` replayed from the console was relabelled ``skipped``."""
    applied = _record(hooked_store, "msg_old", "user_old", status="applied")
    failed = _record(hooked_store, "msg_new", "user_new", status="failed")
    before = _row(hooked_store, "msg_old")
    with served(_mounted(hooked_store), headers=BEARER) as client:
        assert 'data-testid="replay"' not in client.get(f"/console/deliveries/{applied}", headers=HTML).text
        assert 'data-testid="replay"' in client.get(f"/console/deliveries/{failed}", headers=HTML).text
        refused = client.post(f"/console/deliveries/{applied}/replay")
        assert "not+replayed" in refused.headers["location"] or "not%20replayed" in refused.headers["location"]
    assert before[0] == "applied" and _row(hooked_store, "msg_old") == before and _counts(hooked_store) == (0, 0)


def test_a_double_clicked_bulk_replay_replays_each_delivery_once(
        hooked_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed: two bulk replays that read the same list of failed deliveries (a double click) both
    replayed every one. Each is replayed only while still ``failed``; the other click replays none."""
    ids = [f"msg_bulk_{i}" for i in range(3)]
    for i, svix_id in enumerate(ids):
        _record(hooked_store, svix_id, f"user_bulk{i}", status="failed")
    listed = _queries.delivery_ids

    def the_other_click_wins(*args: Any, **kwargs: Any) -> list[tuple[str, str | None]]:
        found = listed(*args, **kwargs)
        for svix_id, _subject in found:  # the first click replays them between this click's read and replay
            replay_delivery(hooked_store, svix_id)
        return found

    monkeypatch.setattr(_queries, "delivery_ids", the_other_click_wins)
    with served(_mounted(hooked_store), headers=BEARER) as client:
        response = client.post("/console/deliveries/replay")
        notice = client.get(response.headers["location"], headers=HTML).text
    assert 'data-testid="notice">replayed 0 (none); not replayed 3 (no longer failed)<' in notice
    assert [_row(hooked_store, s) for s in ids] == [("applied", 2)] * 3  # stored, then replayed once
    with hooked_store.connect() as conn:
        actions = list(conn.execute(sa.select(audit_log.c.action)).scalars())
        jobs = conn.execute(sa.select(sa.func.count()).select_from(hook_jobs)).scalar_one()
    assert actions == ["console.deliveries_replayed"] and jobs == 3  # the first click's jobs only



@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (test_browser.py says how to get it)")
def test_a_form_is_posted_once_however_often_it_is_clicked(hooked_store: Store) -> None:
    """Fixed: a double click posted a replay twice. console.js disables a form once it is sent."""
    from playwright.sync_api import expect, sync_playwright

    row_id = _record(hooked_store, "msg_click", "user_click", status="failed")
    # Runs after the console's own listener (the document's): counts the submissions it lets through, and
    # keeps the page (a real post would navigate away before the second click).
    count_sent = """window.sent = 0; window.addEventListener("submit", (event) => {
        if (!event.defaultPrevented) window.sent += 1; event.preventDefault(); });"""
    with served(_mounted(hooked_store)) as client, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{client.base_url}/console/login")
            page.locator("input[name=token]").fill(OPERATOR_TOKEN)
            page.get_by_role("button", name="Sign in").click()
            page.goto(f"{client.base_url}/console/deliveries/{row_id}")
            page.evaluate(count_sent)
            button = page.get_by_test_id("replay")
            button.click()
            expect(button).to_be_disabled()
            button.click(force=True)  # as a double click's second half
            page.evaluate("document.querySelector('[data-testid=replay]').form.requestSubmit()")  # as Enter
            assert page.evaluate("window.sent") == 1
        finally:
            browser.close()
    assert _row(hooked_store, "msg_click")[0] == "failed"  # nothing was posted at all


# -- 3. Masking: metadata keys, numbers, dates --------------------------------------------------------------
def test_masking_hides_metadata_keys_numbers_and_dates() -> None:
    """Fixed: masking kept every dictionary key, every number and any string under a ``*_at`` key,
    so an e-mail used as a metadata key, a phone number stored as a number and a birth date were shown."""
    payload = {"type": "user.updated", "timestamp": 1_700_000_000_000, "data": {
        "id": "user_1", "object": "user", "updated_at": 1_700_000_000_000, "last_sign_in_at": None,
        "public_metadata": {"role": "admin", "alice@corp.com": "v", "phone": 15551234567, "dob_at": "1990-01-01",
                            "nested": {"bob@corp.com": 1}},
        "organization_memberships": [{"members_count": 3, "public_metadata": {"cost_center": 4471}}],
        "birthday_at": "1990-01-01", "pin": 1234, "ratio": 0.5, "banned": False,
    }}
    shown = repr(mask(payload))
    for personal in ("alice@corp.com", "bob@corp.com", "15551234567", "1990-01-01", "4471", "1234", "0.5",
                     "cost_center", "dob_at"):
        assert personal not in shown, personal
    data = mask(payload)["data"]
    assert data["public_metadata"]["role"] == "admin" and len(data["public_metadata"]) == 5  # keys stay apart
    assert data["updated_at"] == 1_700_000_000_000 and mask(payload)["timestamp"] == 1_700_000_000_000
    assert data["organization_memberships"][0]["members_count"] == 3 and data["banned"] is False
    assert data["birthday_at"] == MASK and data["last_sign_in_at"] is None


# -- 4. Security headers on every answer ---------------------------------------------------------------------
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_every_answer_carries_the_security_headers(hooked_store: Store) -> None:
    """Fixed: the sign-in form's 403, the guard's 401 and other early answers had none of the
    guarded pages' headers, and no answer said ``X-Content-Type-Options: nosniff``."""
    expected = {"x-content-type-options": "nosniff", "cache-control": "no-store", "x-frame-options": "DENY"}
    with served(_mounted(hooked_store)) as client:
        answers = {
            "login 403": client.post("/console/login", data={"token": OPERATOR_TOKEN}, headers=HTML),
            "login 400": client.post("/console/login", content=b"x" * 70_000,
                                     headers={"Content-Type": "application/x-www-form-urlencoded"}),
            "guard 401": client.get("/console/deliveries"),
            "guard 303": client.get("/console/deliveries", headers=HTML),
            "page 200": client.get("/console/", headers=BEARER),
            "no route 404": client.get("/console/nothing-here", headers=BEARER),
        }
    assert {name: r.status_code for name, r in answers.items()} == {
        "login 403": 403, "login 400": 400, "guard 401": 401, "guard 303": 303, "page 200": 200, "no route 404": 404}
    for name, response in answers.items():
        assert {k: response.headers.get(k) for k in expected} == expected, name
        assert "frame-ancestors 'none'" in response.headers.get("content-security-policy", ""), name


def test_an_unhandled_error_answers_with_the_security_headers_too(hooked_store: Store,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A gap in the fix above: Starlette's ServerErrorMiddleware sits outside every ``middleware=`` entry, so
    a handler's unexpected error answered its 500 without the headers."""
    from clerk_sync.integrations.console import _pages

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in a page")

    monkeypatch.setattr(_pages, "overview", broken)
    with served(_mounted(hooked_store)) as client:
        answer = client.get("/console/", headers=BEARER)
    assert answer.status_code == 500
    assert answer.headers.get("x-content-type-options") == "nosniff"
    assert answer.headers.get("cache-control") == "no-store"
    assert "frame-ancestors 'none'" in answer.headers.get("content-security-policy", "")
