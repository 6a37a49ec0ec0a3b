"""Security walkthrough F3 in a real browser (Chromium through Playwright): a link on another site to the
console's sign-in link, carrying another admin's session token, is a cross-site navigation (Chromium sends
``Sec-Fetch-Site: cross-site`` and that site's ``Referer`` itself); it no longer replaces the operator's console
session, but shows the confirmation page, whose button completes the sign-in. The other site is served by the
browser context's router, so nothing but the console is on the network."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.console.conftest import OPERATOR_TOKEN, ConsoleStack

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    if os.environ.get("CLERK_SYNC_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium chromium-driver)", allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

from tests.console.test_browser import ARGS  # noqa: E402

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
EVIL = "http://evil.example/"


@pytest.fixture
def page() -> Iterator[Page]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = chromium.new_context(viewport={"width": 1180, "height": 760})
        yield context.new_page()
        context.close()
        chromium.close()


def test_a_link_on_another_site_asks_before_replacing_the_operators_session(stack: ConsoleStack, page: Page) -> None:
    token = stack.emulator.mint_session_token(stack.admin_id, expires_in_seconds=600)
    link = f"{stack.console_url}/login/clerk?token={token}"
    page.context.route(EVIL, lambda route: route.fulfill(
        content_type="text/html", body=f'<!doctype html><a id="go" href="{link}">free stickers</a>'))
    page.goto(f"{stack.console_url}/login")
    page.fill("input[name=token]", OPERATOR_TOKEN)
    page.click("button[type=submit]")
    expect(page.get_by_test_id("who")).to_have_text("operator (token)")

    page.goto(EVIL)
    page.click("#go")
    expect(page).to_have_url(f"{stack.console_url}/login/clerk/confirm")  # the token left the address bar
    expect(page.get_by_test_id("current-identity")).to_contain_text("operator (token)")
    expect(page.get_by_test_id("new-identity")).to_contain_text(stack.admin_id)
    assert token not in page.content()
    page.goto(f"{stack.console_url}/")
    expect(page.get_by_test_id("who")).to_have_text("operator (token)")  # not replaced by following the link

    page.goto(EVIL)
    page.click("#go")
    page.get_by_test_id("confirm-sign-in").click()
    expect(page).to_have_url(re.compile(r"/console/$"))
    expect(page.get_by_test_id("who")).to_have_text(stack.admin_id)
    login = [r for r in stack.audit_rows() if r["action"] == "console.login"][-1]
    assert login["actor_clerk_id"] == stack.admin_id and login["details"]["replaced"] == "operator (token)"


def test_the_dev_link_opened_in_the_browser_still_signs_in_at_once(stack: ConsoleStack, page: Page) -> None:
    """`clerk-sync dev`'s link, pasted into the address bar (``Sec-Fetch-Site: none``) with no console session."""
    page.goto(stack.sign_in_link(stack.admin_id))
    expect(page).to_have_url(re.compile(r"/console/$"))
    expect(page.get_by_test_id("who")).to_have_text(stack.admin_id)
