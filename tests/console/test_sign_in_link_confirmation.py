"""Security walkthrough F3 (login CSRF): a cross-site link to ``GET /console/login/clerk?token=<another admin's
session token>`` replaced the console session open in the browser (an operator's console became the attacker
admin's, every later action audited under their Clerk id), with no check of Sec-Fetch-Site, Origin or Referer
and no confirmation. Now such a link only asks first: it is held (without its token) until the console's own
confirmation page is answered by a same-origin POST carrying that page's CSRF token. The `clerk-sync dev` link
(same-origin or ``none``, no console session open) still signs in at once.

Over real HTTP, with real emulator-minted session tokens, on every store."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from clerk_sync.integrations.console._access import ADMIN, ConsoleAccess, Identity
from clerk_sync.store import Store
from clerk_sync.tables import users
from tests.console.conftest import OPERATOR_TOKEN, ConsoleStack
from tests.console.test_http import browser_like, csrf_of

EVIL = {"Referer": "http://evil.example/", "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
PENDING_COOKIE = "clerk_sync_console_pending"  # a literal: this file also runs on the code before the fix
CONFIRM = "/login/clerk/confirm"  # under the console (the clients' base URL)


@contextmanager
def operator_browser(stack: ConsoleStack) -> Iterator[httpx.Client]:
    """A browser where the operator is signed in (the login form), as in the walkthrough."""
    with browser_like(stack) as client:
        signed = client.post("/login", data={"csrf": csrf_of(client.get("/login").text), "token": OPERATOR_TOKEN})
        assert signed.status_code == 303
        assert _who(client) == "operator (token)"
        yield client


def _who(client: httpx.Client) -> str | None:
    page = client.get("/")
    found = re.search(r'data-testid="who">([^<]*)<', page.text)
    return found.group(1) if page.status_code == 200 and found else None


def _link(stack: ConsoleStack, user_id: str) -> tuple[str, str]:
    token = stack.emulator.mint_session_token(user_id, expires_in_seconds=600)
    return f"{stack.console_url}/login/clerk?token={token}", token


def _logins(stack: ConsoleStack) -> list[Any]:
    return [r for r in stack.audit_rows() if r["action"] == "console.login"]


def _asked(client: httpx.Client, link: str, headers: dict[str, str]) -> httpx.Response:
    """Follow ``link`` with ``headers``: it must ask first (303 to the token-free confirmation page), opening
    no console session."""
    response = client.get(link, headers=headers)
    assert response.status_code == 303, response.text[:300]
    assert response.headers["location"] == "/console" + CONFIRM
    cookies = response.headers.get_list("set-cookie")
    assert [c for c in cookies if c.startswith(f"{PENDING_COOKIE}=")]
    assert not [c for c in cookies if c.startswith("clerk_sync_console=")]
    return response


def test_a_cross_site_link_while_signed_in_asks_first_and_keeps_the_session(stack: ConsoleStack) -> None:
    with operator_browser(stack) as client:
        link, token = _link(stack, stack.admin_id)
        asked = _asked(client, link, EVIL)
        assert token not in asked.headers["location"] and token not in str(asked.headers)
        assert _who(client) == "operator (token)"  # not replaced
        page = client.get(CONFIRM)
        assert page.status_code == 200
        assert stack.admin_id in page.text and "ada@example.com" in page.text  # who would be signed in
        assert re.search(r'data-testid="current-identity">\s*<span class="mono">operator \(token\)', page.text)
        assert token not in page.text and "token=" not in page.text
        assert page.headers["referrer-policy"] == "same-origin" and "default-src 'self'" in page.headers[
            "content-security-policy"] and page.headers["cache-control"] == "no-store"
    assert [r["details"]["as"] for r in _logins(stack)] == ["operator"]  # the operator's own sign-in only


@pytest.mark.parametrize("headers", [
    pytest.param({"Sec-Fetch-Site": "cross-site"}, id="sec-fetch-site-cross-site"),
    pytest.param({"Sec-Fetch-Site": "same-site"}, id="sec-fetch-site-same-site"),
    pytest.param({"Referer": "http://evil.example/"}, id="foreign-referer"),
    pytest.param({"Referer": "https://127.0.0.1/console/"}, id="other-scheme-referer"),
    pytest.param({"Origin": "null"}, id="origin-null"),
])
def test_a_link_from_another_site_asks_first_even_with_no_console_session(
        stack: ConsoleStack, headers: dict[str, str]) -> None:
    """Login CSRF into a browser with no console session open: signed in as the linking admin without knowing."""
    with browser_like(stack) as client:
        _asked(client, _link(stack, stack.admin_id)[0], headers)
        assert _who(client) is None
    assert _logins(stack) == []


def test_any_link_into_a_browser_with_a_console_session_asks_first(stack: ConsoleStack) -> None:
    """Even same-origin or typed: a console session is never replaced without saying so."""
    with operator_browser(stack) as client:
        for headers in ({"Sec-Fetch-Site": "none"}, {"Sec-Fetch-Site": "same-origin"}, {}):
            _asked(client, _link(stack, stack.admin_id)[0], headers)
        assert _who(client) == "operator (token)"


def test_confirming_by_post_with_the_pages_csrf_token_swaps_the_session_and_audits_it(stack: ConsoleStack) -> None:
    with operator_browser(stack) as client:
        _asked(client, _link(stack, stack.admin_id)[0], EVIL)
        page = client.get(CONFIRM)
        before = len(stack.audit_rows())
        done = client.post(CONFIRM, data={"csrf": csrf_of(page.text), "action": "sign_in"},
                           headers={"Origin": stack.url, "Sec-Fetch-Site": "same-origin"})
        assert done.status_code == 303 and done.headers["location"] == "/console/"
        assert any(c.startswith(f"{PENDING_COOKIE}=") and "Max-Age=0" in c
                   for c in done.headers.get_list("set-cookie"))  # the held sign-in is spent
        assert _who(client) == stack.admin_id
        assert client.post(CONFIRM, data={"csrf": csrf_of(page.text), "action": "sign_in"}).status_code == 403
    rows = stack.audit_rows()[before:]
    login = [r for r in rows if r["action"] == "console.login"]
    assert len(login) == 1 and login[0]["actor_clerk_id"] == stack.admin_id
    assert login[0]["details"]["method"] == "clerk_link" and login[0]["details"]["confirmed"] is True
    assert login[0]["details"]["replaced"] == "operator (token)" and login[0]["details"]["sid"]


@pytest.mark.parametrize(("form", "headers"), [
    pytest.param({"action": "sign_in"}, {}, id="no-csrf"),
    pytest.param({"action": "sign_in", "csrf": "forged"}, {}, id="wrong-csrf"),
    pytest.param({"action": "sign_in", "csrf": "OTHER"}, {}, id="another-pending-csrf"),
    pytest.param({"action": "sign_in", "csrf": "RIGHT"}, {"Origin": "http://evil.example"}, id="cross-site-origin"),
    pytest.param({"action": "sign_in", "csrf": "RIGHT"}, {"Sec-Fetch-Site": "cross-site"}, id="cross-site-fetch"),
])
def test_a_confirmation_without_its_csrf_token_or_from_another_site_is_refused(
        stack: ConsoleStack, form: dict[str, str], headers: dict[str, str]) -> None:
    with operator_browser(stack) as client:
        with browser_like(stack) as other:  # another browser's held sign-in: its token is no good here
            _asked(other, _link(stack, stack.admin_id)[0], EVIL)
            other_csrf = csrf_of(other.get(CONFIRM).text)
        _asked(client, _link(stack, stack.admin_id)[0], EVIL)
        right = csrf_of(client.get(CONFIRM).text)
        form = {k: {"RIGHT": right, "OTHER": other_csrf}.get(v, v) for k, v in form.items()}
        before = stack.audit_rows()
        refused = client.post(CONFIRM, data=form, headers=headers)
        assert refused.status_code == 403
        assert not [c for c in refused.headers.get_list("set-cookie") if c.startswith("clerk_sync_console=")]
        assert _who(client) == "operator (token)"
        assert stack.audit_rows() == before


def test_a_confirmation_needs_the_held_sign_in_of_this_browser(stack: ConsoleStack) -> None:
    """No held sign-in (never followed here, or cancelled): 403, on the page and on its POST."""
    with browser_like(stack) as client:
        assert client.get(CONFIRM).status_code == 403
        assert client.post(CONFIRM, data={"csrf": "x", "action": "sign_in"}).status_code == 403
        _asked(client, _link(stack, stack.admin_id)[0], EVIL)
        page = client.get(CONFIRM)
        cancelled = client.post(CONFIRM, data={"csrf": csrf_of(page.text), "action": "cancel"})
        assert cancelled.status_code == 303 and _who(client) is None
        assert client.get(CONFIRM).status_code == 403
    assert _logins(stack) == []


def test_a_held_sign_in_lasts_pending_s_and_cannot_be_forged(sqlite_url: str) -> None:
    """It holds the admin and their Clerk session (no token), signed with the console's key, for PENDING_S."""
    from clerk_sync.integrations.console._access import PENDING_S

    now = [1_000_000.0]
    store = Store.from_url(sqlite_url)
    access = ConsoleAccess(store, operator_token=OPERATOR_TOKEN, authenticator=None, secret=b"k" * 32,
                           clock=lambda: now[0])
    held = access.pending_sign_in(Identity(ADMIN, "user_ada", None, session_id="sess_ada"))
    pending = access.pending(held)
    assert pending is not None and (pending.clerk_id, pending.session_id) == ("user_ada", "sess_ada")
    assert pending.csrf and pending.new_cookie is None
    other_key = ConsoleAccess(store, operator_token=OPERATOR_TOKEN, authenticator=None, secret=b"j" * 32,
                              clock=lambda: now[0])
    assert other_key.pending(held) is None and access.pending(held[:-2] + "xx") is None
    assert access.pending(access.login_token()) is None  # another of the console's signed values: other salt
    now[0] += PENDING_S + 1
    assert access.pending(held) is None
    store.dispose()


def test_a_demotion_between_the_link_and_its_confirmation_refuses_it(stack: ConsoleStack) -> None:
    with operator_browser(stack) as client:
        _asked(client, _link(stack, stack.admin_id)[0], EVIL)
        page = client.get(CONFIRM)
        with stack.store.engine.begin() as conn:
            conn.execute(sa.update(users).where(users.c.clerk_id == stack.admin_id).values(role="user"))
        refused = client.post(CONFIRM, data={"csrf": csrf_of(page.text), "action": "sign_in"})
        assert refused.status_code == 403 and _who(client) == "operator (token)"
    assert [r["details"]["as"] for r in _logins(stack)] == ["operator"]


@pytest.mark.parametrize("headers", [
    pytest.param({"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate"}, id="typed-or-from-the-terminal"),
    pytest.param({"Sec-Fetch-Site": "same-origin", "Referer": "http://127.0.0.1/"}, id="same-origin"),
    pytest.param({}, id="no-fetch-metadata"),
])
def test_the_dev_link_still_signs_in_at_once_with_no_console_session(
        stack: ConsoleStack, headers: dict[str, str]) -> None:
    link, token = _link(stack, stack.admin_id)
    if "Referer" in headers:
        headers = {**headers, "Referer": f"{stack.url}/console/login"}
    with browser_like(stack) as client:
        response = client.get(link, headers=headers)
        assert response.status_code == 303 and response.headers["location"] == "/console/"
        assert token not in str(response.headers)
        assert _who(client) == stack.admin_id
    assert [r["details"]["method"] for r in _logins(stack)] == ["clerk_link"]


def test_a_cross_site_link_with_a_bad_token_does_not_sign_the_browser_out(stack: ConsoleStack) -> None:
    """Before, any refused link token cleared the console cookie: any site could sign an operator out."""
    good = stack.emulator.mint_session_token(stack.admin_id)
    with operator_browser(stack) as client:
        for token in (good[:-6] + "AAAAAA", "not-a-token"):
            response = client.get(f"/login/clerk?token={token}", headers=EVIL)
            assert response.status_code == 401
            assert not [c for c in response.headers.get_list("set-cookie") if c.startswith("clerk_sync_console=")]
            assert _who(client) == "operator (token)"
