"""Two review findings on the console's audit trail (session 2026-12-07).

Revealing a delivery's payload was audited under the event's own object id: for a membership (``orgmem_...``),
a session or an e-mail, the person whose data was shown never saw the reveal on their audit trail. It is filed
under that person now, the object's id in the details.

A role change or an applied reconcile from the console was written without the ``via``/``as`` details every
other console action carries: with the operator token (no actor) it could not be told from the CLI's, and the
audit page showed its actor as "—".
"""

from __future__ import annotations

import sqlalchemy as sa

from clerk_sync.tables import webhook_events
from tests.console.conftest import ConsoleStack, operator_client

HTML = {"Accept": "text/html"}


def _delivery_of(stack: ConsoleStack, event_type: str) -> int:
    with stack.store.connect() as conn:
        return int(conn.execute(sa.select(webhook_events.c.id).where(webhook_events.c.type == event_type)
                                .order_by(webhook_events.c.id.desc()).limit(1)).scalar_one())


def test_a_revealed_membership_is_audited_under_the_member(stack: ConsoleStack) -> None:
    org = stack.emulator.create_organization(name="Acme")
    membership = stack.emulator.add_membership(org["id"], stack.user_id)
    stack.wait_synced()
    with operator_client(stack) as client:
        shown = client.post(f"/deliveries/{_delivery_of(stack, 'organizationMembership.created')}/reveal",
                            headers=HTML)
        assert shown.status_code == 200
        trail = client.get("/audit", params={"target": stack.user_id}, headers=HTML).text
    [row] = [r for r in stack.audit_rows() if r["action"] == "console.payload_revealed"]
    assert (row["target_clerk_id"], row["details"]["object"]) == (stack.user_id, membership["id"])
    assert "console.payload_revealed" in trail  # on the member's own audit trail


def test_a_revealed_user_event_names_no_separate_object(stack: ConsoleStack) -> None:
    with operator_client(stack) as client:
        assert client.post(f"/deliveries/{_delivery_of(stack, 'user.created')}/reveal", headers=HTML).status_code == 200
    [row] = [r for r in stack.audit_rows() if r["action"] == "console.payload_revealed"]
    assert row["target_clerk_id"] is not None and "object" not in row["details"]


def test_a_role_change_and_a_reconcile_from_the_console_say_so(stack: ConsoleStack) -> None:
    assert stack.console.drift is not None
    with operator_client(stack) as client:
        assert client.post(f"/users/{stack.user_id}/role", data={"role": "admin"}).status_code == 303
        assert client.post("/drift/run", data={"mode": "apply"}).status_code == 303
        assert stack.console.drift.wait(30)
        page = client.get("/audit", params={"action": "role.changed"}, headers=HTML).text
    rows = {r["action"]: r for r in stack.audit_rows()}
    changed, reconciled = rows["role.changed"], rows["console.reconcile.applied"]
    assert changed["actor_clerk_id"] is None and reconciled["actor_clerk_id"] is None  # the operator token
    assert {k: changed["details"][k] for k in ("via", "as", "from", "to")} == {
        "via": "console", "as": "operator", "from": "user", "to": "admin"}
    assert (reconciled["details"]["via"], reconciled["details"]["as"]) == ("console", "operator")
    assert '<td class="mono">operator</td>' in page and '<td class="mono">—</td>' not in page
