"""The console's accessibility (WCAG 2.2 AA) in a real browser: Debian's Chromium driven by Playwright, against
a real server on loopback with the emulator for Clerk and a lived-in database (an organization, deliveries
applied, failed and skipped, hook jobs dead and pending, audit rows).

axe-core (from ``axe-playwright-python``, a dev dependency that ships it: nothing is downloaded) checks every
page and state at a desktop width and at 320 px; the rest is what axe cannot see: the skip link, keyboard-only
use of each action, the sign-in confirmation, errors tied to their field, reflow at 320 px (1.4.10).
Without ``/usr/bin/chromium`` the tests skip, unless ``CLERK_SYNC_REQUIRE_BROWSER=1`` (set by ``.ci/run``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync.auth.audit import AuditEntry, record_audit
from clerk_sync.tables import hook_jobs, webhook_events
from tests.console.conftest import OPERATOR_TOKEN, ConsoleStack, make_stack

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    if os.environ.get("CLERK_SYNC_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium chromium-driver)", allow_module_level=True)

from axe_playwright_python.sync_playwright import Axe  # noqa: E402
from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402

from tests.console.test_browser import ARGS  # noqa: E402

SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
DESKTOP = {"width": 1180, "height": 760}
NARROW = {"width": 320, "height": 640}  # 1280 px at 400 % zoom (WCAG 1.4.10 Reflow)
AXE = Axe()


@dataclass
class LivedIn:
    stack: ConsoleStack
    org_id: str
    failed_id: int
    skipped_id: int

    def url(self, path: str) -> str:
        return self.stack.console_url + path


@pytest.fixture
def lived_in(db_url: str) -> Iterator[LivedIn]:
    for stack in make_stack(db_url):
        yield seed(stack)


def seed(stack: ConsoleStack) -> LivedIn:
    """What a console shows after some weeks: an organization with members, a failed and a skipped delivery,
    a dead and a pending hook job (the freshness checks fail), a role change in the audit log."""
    emulator = stack.emulator
    org = emulator.request("POST", "/v1/organizations", json={"name": "Analytical Engines",
                                                              "created_by": stack.admin_id})
    emulator.request("POST", f"/v1/organizations/{org['id']}/memberships",
                     json={"user_id": stack.user_id, "role": "org:member"})
    stack.wait_synced()
    failed = stack.failed_delivery(stack.user_id, first_name="Gracie")
    with stack.store.transaction() as w:
        w.record_delivery("msg_a11y_skipped", {"type": "user.updated", "data": {"id": stack.user_id}},
                          event_type="user.updated", instance_id=None, event_timestamp=1, status="skipped",
                          error=None)
        record_audit(w, AuditEntry("role.changed", stack.admin_id, stack.user_id, details={"role": "admin"}))
    now = datetime.now(UTC)
    with stack.store.engine.begin() as conn:
        for status, error in (("dead", "HTTP 500 from the CRM"), ("pending", None)):
            conn.execute(sa.insert(hook_jobs).values(
                hook="crm", type="user.updated", entity_key=f"user:{stack.user_id}:{status}",
                idempotency_key=f"a11y-{status}", payload={}, status=status, attempts=5 if error else 0,
                available_at=now, created_at=now, last_error=error))
        ids = dict(conn.execute(sa.select(webhook_events.c.svix_id, webhook_events.c.id).where(
            webhook_events.c.svix_id.in_([failed, "msg_a11y_skipped"]))).all())
    return LivedIn(stack, org["id"], ids[failed], ids["msg_a11y_skipped"])


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


def new_page(browser: Browser, viewport: dict[str, int] = DESKTOP, **options: Any) -> Page:
    return browser.new_context(viewport=viewport, **options).new_page()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    page = new_page(browser)
    yield page
    page.context.close()


def violations(page: Page) -> list[str]:
    """axe-core's violations on the page as it is now (WCAG 2.0-2.2 A and AA, and axe's best practices)."""
    found = AXE.run(page).response["violations"]
    return [f"{v['id']} ({v['impact']}, {', '.join(t for t in v['tags'] if t.startswith('wcag'))}): "
            f"{[n['html'][:120] for n in v['nodes']]}" for v in found]


def pages(site: LivedIn) -> dict[str, str]:
    stack = site.stack
    return {"overview": "/", "deliveries": "/deliveries", "failed": "/deliveries?status=failed",
            "delivery": f"/deliveries/{site.failed_id}", "skipped": f"/deliveries/{site.skipped_id}",
            "users": "/users?q=", "user": f"/users/{stack.user_id}", "organization": f"/organizations/{site.org_id}",
            "audit": "/audit", "drift": "/drift", "not found": "/users/user_nobody",
            "bad filter": "/deliveries?since=yesterday"}


def sign_in(page: Page, site: LivedIn) -> None:
    page.goto(site.stack.sign_in_link(site.stack.admin_id))
    expect(page.get_by_test_id("who")).to_have_text(site.stack.admin_id)


@pytest.mark.parametrize("db_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_axe_finds_nothing_on_any_page_or_state(lived_in: LivedIn, browser: Browser) -> None:
    """Found by the audit: skipped/ignored status pills at 4.26:1 (1.4.3), the payload's ``<pre>`` scrolled
    only by a mouse (2.1.1), and at 320 px tables that no keyboard could scroll."""
    site, stack = lived_in, lived_in.stack
    found: dict[str, list[str]] = {}
    for viewport in (DESKTOP, NARROW):
        page = new_page(browser, viewport)
        page.goto(site.url("/login"))
        found[f"login {viewport['width']}"] = violations(page)
        page.get_by_label("Operator token").fill("wrong")
        page.get_by_role("button", name="Sign in").click()
        found[f"login error {viewport['width']}"] = violations(page)
        sign_in(page, site)
        for name, path in pages(site).items():
            page.goto(site.url(path))
            found[f"{name} {viewport['width']}"] = violations(page)
        page.context.close()

    page = new_page(browser)
    sign_in(page, site)
    page.goto(site.url(f"/deliveries/{site.failed_id}"))
    page.get_by_test_id("reveal").click()
    page.get_by_test_id("replay").click()
    expect(page.get_by_test_id("notice")).to_have_text("replayed:applied")
    found["delivery replayed and revealed"] = violations(page)
    stack.emulator.set_webhook_url(None)  # webhooks lost: the drift page has differences to list
    stack.emulator.create_user("linus@example.com", first_name="Linus", last_name="Torvalds")
    page.goto(site.url("/drift"))
    page.get_by_test_id("dry-run").click()
    expect(page.get_by_test_id("drift-status")).to_have_text("done", timeout=30_000)
    found["drift dry run"] = violations(page)
    # what Apply repairs, said on the button (the dry run's counts, shown below it)
    expect(page.get_by_test_id("apply")).to_have_accessible_description(
        re.compile(r"^[0-9]+ missing, [0-9]+ stale, [0-9]+ to delete$"))
    page.get_by_test_id("apply").click()
    expect(page.get_by_test_id("drift-applied")).to_be_visible(timeout=30_000)
    found["drift applied"] = violations(page)
    page.context.close()

    page = new_page(browser)
    page.goto(stack.sign_in_link(stack.user_id))  # not an admin: 403
    found["forbidden"] = violations(page)
    page.context.close()
    assert {name: v for name, v in found.items() if v} == {}


@SQLITE
def test_no_page_scrolls_sideways_at_320_px(lived_in: LivedIn, browser: Browser) -> None:
    """1.4.10 Reflow: the header did not wrap and key/value tables held long ids on one line (every page was
    350-1300 px wide). Wide data tables scroll inside their own box, which then takes focus and has a name."""
    site = lived_in
    page = new_page(browser, NARROW)
    sign_in(page, site)
    widths = {}
    for name, path in pages(site).items():
        page.goto(site.url(path))
        widths[name] = page.evaluate("document.documentElement.scrollWidth")
    assert {name: w for name, w in widths.items() if w > NARROW["width"]} == {}
    page.goto(site.url("/audit"))
    box = page.get_by_role("region", name="Audit entries, newest first")
    expect(box).to_have_attribute("tabindex", "0")
    box.focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_function("el => el.scrollLeft > 0", arg=box.element_handle())
    page.context.close()


@SQLITE
def test_the_skip_link_is_the_first_stop_and_lands_in_main(lived_in: LivedIn, page: Page) -> None:
    """2.4.1 Bypass Blocks: there was no skip link; every page began with the six stops of the header."""
    sign_in(page, lived_in)
    page.goto(lived_in.url("/deliveries?status=failed"))
    page.keyboard.press("Tab")
    skip = page.get_by_role("link", name="Skip to content")
    expect(skip).to_be_focused()
    expect(skip).to_be_in_viewport()  # shown while it has focus
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    expect(page.get_by_label("Status")).to_be_focused()  # the filter, not the header's links
    expect(page).to_have_url(lived_in.url("/deliveries?status=failed"))  # the same page: the filter kept
    expect(page.get_by_role("link", name="Deliveries")).to_have_attribute("aria-current", "page")
    ring = page.evaluate("() => { const s = getComputedStyle(document.activeElement);"
                         " return [s.outlineStyle, s.outlineWidth]; }")
    assert ring == ["solid", "2px"]  # 2.4.7: a focus ring of its own, not the browser's 1px default


@SQLITE
def test_a_keyboard_alone_reveals_replays_and_scrolls_the_payload(lived_in: LivedIn, page: Page) -> None:
    sign_in(page, lived_in)
    page.goto(lived_in.url(f"/deliveries/{lived_in.failed_id}"))
    tab_to(page, page.get_by_test_id("reveal"))
    page.keyboard.press("Enter")
    expect(page.get_by_test_id("payload")).to_contain_text("grace@example.com")
    tab_to(page, page.get_by_test_id("replay"))
    page.keyboard.press("Enter")
    notice = page.get_by_role("status")
    expect(notice).to_have_text("replayed:applied")
    payload = page.get_by_role("region", name=re.compile("^Payload"))
    tab_to(page, payload)  # 2.1.1: the <pre> took no focus, so no keyboard could scroll it
    page.keyboard.press("PageDown")
    page.wait_for_function("el => el.scrollTop > 0", arg=payload.element_handle())


@SQLITE
def test_a_wrong_operator_token_is_announced_and_tied_to_its_field(lived_in: LivedIn, page: Page) -> None:
    """3.3.1 / 4.1.3: the error was a paragraph nothing pointed at; the login box's inline style broke the CSP."""
    refused: list[str] = []
    page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(lived_in.url("/login"))
    field = page.get_by_label("Operator token")
    field.fill("not the token")
    page.keyboard.press("Enter")
    expect(page.get_by_role("alert")).to_be_visible()
    field = page.get_by_label("Operator token")
    expect(field).to_have_attribute("aria-invalid", "true")
    expect(field).to_have_accessible_description(page.get_by_role("alert").inner_text())
    assert refused == []


@SQLITE
def test_the_sign_in_confirmation_works_from_the_keyboard(lived_in: LivedIn, page: Page) -> None:
    stack = lived_in.stack
    token = stack.emulator.mint_session_token(stack.admin_id, expires_in_seconds=600)
    link = f"{stack.console_url}/login/clerk?token={token}"
    evil = "http://evil.example/"
    page.context.route(evil, lambda route: route.fulfill(
        content_type="text/html", body=f'<!doctype html><a id="go" href="{link}">free stickers</a>'))
    page.goto(lived_in.url("/login"))
    page.get_by_label("Operator token").fill(OPERATOR_TOKEN)
    page.keyboard.press("Enter")
    expect(page.get_by_test_id("who")).to_have_text("operator (token)")
    page.goto(evil)
    page.click("#go")
    expect(page).to_have_url(f"{stack.console_url}/login/clerk/confirm")
    assert violations(page) == []
    tab_to(page, page.get_by_test_id("confirm-sign-in"))
    page.keyboard.press("Enter")
    expect(page.get_by_test_id("who")).to_have_text(stack.admin_id)


@SQLITE
def test_titles_say_what_the_page_is(lived_in: LivedIn, page: Page) -> None:
    """2.4.2: an error page was titled with its code (``not_found · clerk-sync console``)."""
    sign_in(page, lived_in)
    titles = {}
    for name, path in pages(lived_in).items():
        page.goto(lived_in.url(path))
        titles[name] = page.title()
        expect(page.locator("h1")).to_have_count(1)
    assert titles["not found"] == "Not found · clerk-sync console"
    assert titles["bad filter"] == "Error: Deliveries · clerk-sync console"  # the page itself, with the error
    assert titles["user"] == "grace@example.com · clerk-sync console"
    assert not [t for t in titles.values() if "_" in t.split(" · ")[0]]


@pytest.mark.parametrize("db_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_a_bad_filter_is_shown_beside_its_field_on_the_page_itself(lived_in: LivedIn, browser: Browser) -> None:
    """3.3.1 / 3.3.3: ``?since=yesterday`` answered a bare 400 page: no form, no navigation, the message tied to
    nothing. Now the page itself (400): the form with the values as typed, the error beside its field and in an
    alert at the top, the field focused; axe-clean and reflowing at both widths."""
    site = lived_in
    cases = [("/deliveries?status=failed&since=yesterday", "Since", "yesterday",
              "since='yesterday' is not an ISO 8601 time (e.g. 2026-11-30T20:00)"),
             ("/audit?actor=user_x&until=tomorrow", "Until", "tomorrow",
              "until='tomorrow' is not an ISO 8601 time (e.g. 2026-11-30T20:00)")]
    found: dict[str, list[str]] = {}
    for viewport in (DESKTOP, NARROW):
        page = new_page(browser, viewport)
        sign_in(page, site)
        for path, label, typed, says in cases:
            response = page.goto(site.url(path))
            assert response is not None and response.status == 400, path
            expect(page.get_by_role("navigation")).to_be_visible()
            field = page.get_by_label(re.compile(f"^{label}"))
            expect(field).to_have_value(typed)
            expect(field).to_have_attribute("aria-invalid", "true")
            expect(field).to_have_accessible_description(says)
            expect(field).to_be_focused()  # the page opens on the field to fix
            expect(page.get_by_role("alert")).to_contain_text(says)
            expect(page.get_by_role("table")).to_have_count(0)  # no results listed
            found[f"{path} {viewport['width']}"] = violations(page)
            assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"], path
            page.evaluate("document.activeElement.blur()")
            tab_to(page, field)  # and a keyboard gets there from the top
        page.context.close()
    assert {name: v for name, v in found.items() if v} == {}


@SQLITE
def test_the_bulk_replay_asks_first_and_works_from_the_keyboard(lived_in: LivedIn, browser: Browser) -> None:
    """3.3.4: "Replay all failed matching this filter" replayed on the click itself. It now opens a page that
    says how many it will replay; only that page's button (a POST with the CSRF token) replays them."""
    site, stack = lived_in, lived_in.stack
    found: dict[str, list[str]] = {}
    for viewport in (NARROW, DESKTOP):
        page = new_page(browser, viewport)
        sign_in(page, site)
        page.goto(site.url("/deliveries?status=failed"))
        tab_to(page, page.get_by_test_id("replay-matching"))
        page.keyboard.press("Enter")
        expect(page.get_by_role("heading", level=1)).to_have_text("Replay 1 failed delivery?")
        found[f"confirm {viewport['width']}"] = violations(page)
        assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
        assert not [r for r in stack.audit_rows() if r["action"].startswith("console.deliver")]  # nothing yet
        if viewport is NARROW:  # cancel: back to the list, nothing replayed
            tab_to(page, page.get_by_role("link", name="Cancel"))
            page.keyboard.press("Enter")
            expect(page.get_by_test_id("deliveries").locator("tr")).to_have_count(2)
            page.context.close()
            continue
        tab_to(page, page.get_by_role("button", name="Replay 1 delivery"))
        page.keyboard.press("Enter")
        expect(page.get_by_role("status")).to_have_text("replayed 1 (applied:1)")
        found["replayed"] = violations(page)
        page.context.close()
    assert {name: v for name, v in found.items() if v} == {}
    assert [r["action"] for r in stack.audit_rows() if r["action"].startswith("console.deliver")] == [
        "console.delivery_replayed", "console.deliveries_replayed"]


@SQLITE
def test_nothing_moves_for_who_asked_for_reduced_motion(lived_in: LivedIn, browser: Browser) -> None:
    page = new_page(browser, reduced_motion="reduce")
    sign_in(page, lived_in)
    for path in pages(lived_in).values():
        page.goto(lived_in.url(path))
        moving = page.evaluate("() => [...document.querySelectorAll('*')].filter(e => {"
                               " const s = getComputedStyle(e);"
                               " return s.animationName !== 'none' || parseFloat(s.transitionDuration) > 0; })"
                               ".map(e => e.tagName)")
        assert moving == [], path
    page.context.close()


def tab_to(page: Page, target: Any, limit: int = 60) -> None:
    """Press Tab until ``target`` has focus (a keyboard user's way there), or fail."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        if target.evaluate("el => el === document.activeElement"):
            return
    raise AssertionError(f"{target} is not reachable with Tab")
