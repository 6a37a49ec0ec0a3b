"""The console in a real browser: Debian's Chromium driven by Playwright, against a real server on
loopback, the emulator for Clerk and a real database.

Screenshots of each page go to ``$CLERK_SYNC_SCREENSHOTS`` (``docs/console`` refreshes the README's
images) or to the test's temporary directory. Without ``/usr/bin/chromium`` the tests skip, unless
``CLERK_SYNC_REQUIRE_BROWSER=1`` (set by ``.ci/run``, which installs it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.console.conftest import ConsoleStack

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

if not Path(CHROMIUM).exists():
    if os.environ.get("CLERK_SYNC_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium chromium-driver)", allow_module_level=True)

from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402

# Browser flows run on SQLite only: the console's queries run on both databases in test_http.py.
pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1180, "height": 760})
    yield context.new_page()
    context.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    target = Path(os.environ.get("CLERK_SYNC_SCREENSHOTS") or tmp_path)
    target.mkdir(parents=True, exist_ok=True)
    return target


def snap(page: Page, shots: Path, name: str) -> None:
    path = shots / f"{name}.png"
    page.screenshot(path=str(path))
    assert path.stat().st_size > 1000


def test_admin_replays_a_failed_delivery_and_sees_the_user_change(stack: ConsoleStack, page: Page,
                                                                   shots: Path) -> None:
    svix_id = stack.failed_delivery(stack.user_id, first_name="Gracie")
    page.goto(stack.sign_in_link(stack.admin_id))
    expect(page.get_by_test_id("who")).to_have_text(stack.admin_id)
    expect(page.get_by_test_id("failed-count")).to_have_text("1")
    snap(page, shots, "overview")

    page.get_by_role("link", name="see failed deliveries").click()
    rows = page.get_by_test_id("deliveries").locator("tr")
    expect(rows).to_have_count(2)  # header + the failed one
    snap(page, shots, "deliveries")

    rows.nth(1).get_by_role("link").click()
    expect(page.get_by_test_id("delivery-status")).to_have_text("failed")
    expect(page.get_by_test_id("delivery-error")).to_contain_text("database is locked")
    payload = page.get_by_test_id("payload")
    expect(payload).not_to_contain_text("grace@example.com")
    expect(payload).to_contain_text("•••")
    page.get_by_test_id("reveal").click()
    expect(page.get_by_test_id("payload")).to_contain_text("grace@example.com")
    revealed = [r for r in stack.audit_rows() if r["action"] == "console.payload_revealed"]
    assert [(r["actor_clerk_id"], r["target_clerk_id"], r["details"]["svix_id"]) for r in revealed] == [
        (stack.admin_id, stack.user_id, svix_id)]

    page.get_by_test_id("replay").click()
    expect(page.get_by_test_id("notice")).to_have_text("replayed:applied")
    expect(page.get_by_test_id("delivery-status")).to_have_text("applied")
    snap(page, shots, "delivery")
    assert stack.user_row(stack.user_id)["first_name"] == "Gracie"
    page.get_by_role("link", name=stack.user_id).click()
    expect(page.locator("h1")).to_contain_text("Gracie")
    replayed = [r for r in stack.audit_rows() if r["action"] == "console.delivery_replayed"]
    assert [(r["actor_clerk_id"], r["details"]["result"]) for r in replayed] == [(stack.admin_id, "applied")]


def test_admin_runs_a_drift_dry_run_then_applies_it(stack: ConsoleStack, page: Page, shots: Path) -> None:
    stack.emulator.set_webhook_url(None)  # webhooks lost: the database drifts from Clerk
    linus = stack.emulator.create_user("linus@example.com", first_name="Linus", last_name="Torvalds")
    stack.emulator.request("PATCH", f"/v1/users/{stack.user_id}", json={"last_name": "Hopper-Murray"})
    page.goto(stack.sign_in_link(stack.admin_id))
    page.get_by_role("link", name="Drift", exact=True).click()
    page.get_by_test_id("dry-run").click()
    expect(page.get_by_test_id("drift-status")).to_have_text("done", timeout=30_000)  # polled, then reloaded
    expect(page.get_by_test_id("drift-counts")).to_have_text("1 missing, 1 stale, 0 to delete")
    changes = page.get_by_test_id("drift-changes")
    expect(changes).to_contain_text(linus["id"])
    expect(changes).to_contain_text("last_name")
    snap(page, shots, "drift")
    assert stack.user_row(linus["id"]) is None  # a dry run writes nothing

    page.get_by_test_id("apply").click()
    expect(page.get_by_test_id("drift-applied")).to_be_visible(timeout=30_000)
    assert stack.user_row(linus["id"])["first_name"] == "Linus"
    assert stack.user_row(stack.user_id)["last_name"] == "Hopper-Murray"
    actions = [r["action"] for r in stack.audit_rows() if r["action"].startswith("console.reconcile")]
    assert actions == ["console.reconcile.started", "console.reconcile.started", "console.reconcile.applied"]


def test_admin_promotes_a_user_and_sees_the_audit_row(stack: ConsoleStack, page: Page, shots: Path) -> None:
    page.goto(stack.sign_in_link(stack.admin_id))
    page.get_by_role("link", name="Users & orgs").click()
    page.get_by_placeholder("email, name, user_… or org_…").fill("grace")
    page.get_by_role("button", name="Search").click()
    expect(page.get_by_test_id("users").locator("tr")).to_have_count(2)
    snap(page, shots, "users")
    page.get_by_role("link", name="grace@example.com").click()
    page.get_by_label("Role").select_option("admin")
    page.get_by_test_id("set-role").click()
    expect(page.get_by_test_id("notice")).to_have_text("role:applied")
    expect(page.get_by_test_id("role")).to_have_text("admin")
    snap(page, shots, "user")
    assert stack.user_row(stack.user_id)["role"] == "admin"

    page.get_by_role("link", name="Audit log", exact=True).click()
    row = page.get_by_test_id("audit").locator("tr", has_text="role.changed")
    expect(row).to_have_count(1)
    expect(row).to_contain_text(stack.admin_id)
    expect(row).to_contain_text(stack.user_id)
    snap(page, shots, "audit")


def test_a_non_admin_gets_403_and_no_page_content(stack: ConsoleStack, page: Page, shots: Path) -> None:
    response = page.goto(stack.sign_in_link(stack.user_id))
    assert response is not None and response.status == 403
    html = page.content()
    assert "<nav" not in html and "ada@example.com" not in html and "Deliveries" not in html
    expect(page.locator("h1")).to_have_text(re.compile("Access denied", re.IGNORECASE))
    snap(page, shots, "forbidden")
    page.goto(stack.console_url + "/deliveries")  # no console session was created
    expect(page).to_have_url(re.compile(r"/console/login\?next="))
    assert not [r for r in stack.audit_rows() if r["action"] == "console.login"]


def test_a_right_to_left_override_in_a_name_is_shown_not_obeyed(stack: ConsoleStack, page: Page) -> None:
    """Pentest finding: ``adm\\u202enimgpj.exe`` showed as ``admexe.jpgmin``. The page shows the control."""
    stack.emulator.create_user("rlo@example.com", first_name="adm\u202enimgpj.exe", last_name="Spoof")
    stack.wait_synced()
    page.goto(stack.sign_in_link(stack.admin_id))
    page.goto(stack.console_url + "/users?q=rlo")
    cell = page.get_by_test_id("users").locator("tr", has_text="rlo@example.com").locator("td").nth(1)
    expect(cell).to_have_text("adm\u27e8U+202E\u27e9nimgpj.exe Spoof")
    expect(cell.locator("bdi")).to_have_count(2)
