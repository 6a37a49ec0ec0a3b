"""Console review findings: the sign-in form's POST and the sign-in confirmation page answered a database failure
with a bare 500 (every other page: the console's 503 page); a delivery deleted between a bulk replay's listing and
its turn (the prune, another operator) stopped the replay with a 503 "database unavailable", the rest of the
backlog not replayed and nothing audited; and signing in from a filtered page's link lost the filter."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from clerk_sync.integrations.console import _pages
from clerk_sync.tables import webhook_events
from tests.console.conftest import OPERATOR_TOKEN, ConsoleStack, operator_client
from tests.console.test_http import browser_like, csrf_of, status_of
from tests.console.test_sign_in_link_confirmation import CONFIRM, _asked, _link


def _rename(stack: ConsoleStack, table: str, to: str) -> None:
    with stack.store.engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE {table} RENAME TO {to}")


def test_the_sign_in_form_answers_a_database_failure_with_the_503_page(stack: ConsoleStack) -> None:
    with browser_like(stack) as client:
        token = csrf_of(client.get("/login").text)
        _rename(stack, "audit_log", "audit_log_away")  # the sign-in's audit row cannot be written
        try:
            response = client.post("/login", data={"csrf": token, "token": OPERATOR_TOKEN})
        finally:
            _rename(stack, "audit_log_away", "audit_log")
        assert response.status_code == 503, response.text[:300]
        assert response.headers["content-type"].startswith("text/html") and "Retry-After" in response.headers
        assert "clerk_sync_console=" not in response.headers.get("set-cookie", "")  # no session unaudited
        assert client.get("/").status_code in (303, 401)  # still signed out


def test_the_confirmation_page_answers_a_database_failure_with_the_503_page(stack: ConsoleStack) -> None:
    with browser_like(stack) as client:
        _asked(client, _link(stack, stack.admin_id)[0], {"Sec-Fetch-Site": "cross-site"})
        _rename(stack, "users", "users_away")  # who would be signed in cannot be read
        try:
            page = client.get(CONFIRM)
        finally:
            _rename(stack, "users_away", "users")
        assert page.status_code == 503, page.text[:300]
        assert page.headers["content-type"].startswith("text/html") and "Retry-After" in page.headers
        assert client.get(CONFIRM).status_code == 200  # the database back: the held sign-in asks again


def test_a_delivery_deleted_during_a_bulk_replay_is_left_and_the_rest_replayed(stack: ConsoleStack,
                                                                              monkeypatch: Any) -> None:
    grace = [stack.failed_delivery(stack.user_id, first_name=f"V{i}") for i in range(3)]
    listed = _pages.q.delivery_ids

    def listed_then_one_deleted(conn: Any, *args: Any, **kwargs: Any) -> Any:
        found = listed(conn, *args, **kwargs)
        with stack.store.engine.begin() as other:  # the prune (or another operator) deletes one meanwhile
            other.execute(webhook_events.delete().where(webhook_events.c.svix_id == grace[0]))
        return found

    monkeypatch.setattr(_pages.q, "delivery_ids", listed_then_one_deleted)
    with operator_client(stack) as client:
        response = client.post("/deliveries/replay", data={"clerk_id": stack.user_id}, follow_redirects=False)
    assert response.status_code == 303, response.text[:300]
    assert "not+replayed+1" in response.headers["location"] or "not%20replayed%201" in response.headers["location"]
    assert "failed" not in [status_of(stack, s) for s in grace[1:]]  # both replayed (the last one stale: skipped)
    with stack.store.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(webhook_events)
                            .where(webhook_events.c.svix_id == grace[0])).scalar_one() == 0
    summary = [r for r in stack.audit_rows() if r["action"] == "console.deliveries_replayed"]
    assert [(r["details"]["total"], r["details"]["not_replayed"]) for r in summary] == [(3, 1)]


def test_signing_in_from_a_filtered_pages_link_keeps_its_filter(stack: ConsoleStack) -> None:
    with browser_like(stack) as client:
        sent = client.get("/deliveries?status=failed&type=user.updated")
        assert sent.status_code == 303, sent.text[:200]
        login = client.get(stack.url + sent.headers["location"])
        assert 'value="/console/deliveries?status=failed&amp;type=user.updated"' in login.text, login.text
        signed = client.post("/login", data={"csrf": csrf_of(login.text), "token": OPERATOR_TOKEN,
                                             "next": "/console/deliveries?status=failed&type=user.updated"})
        assert signed.headers["location"] == "/console/deliveries?status=failed&type=user.updated"
