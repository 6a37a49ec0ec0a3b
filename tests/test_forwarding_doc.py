"""docs/FORWARDING.md describes the message the sinks send to apps not in Python: its field tables must name
every field a change carries, and nothing else, for each entity; its headers must be what the sink sends.

Walkthrough finding (2026-12-05): the body was described only in a Python docstring, so a Node.js receiver had
to reverse-engineer it (``entity`` is the table's name, times are milliseconds, ``private_metadata`` is
forwarded, the dedupe key is ``webhook-id``)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from clerk_sync.changes import Hook
from clerk_sync.hooks import Dispatcher
from clerk_sync.hooks.sinks import StandardWebhookSink
from clerk_sync.store import Store
from tests import factories as f
from tests.test_hooks import B, deliver

DOC = (Path(__file__).resolve().parents[1] / "docs" / "FORWARDING.md").read_text()
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # (standard base64 of 24 bytes)


def documented(entity: str) -> set[str]:
    """The field names of the doc's table for ``entity`` (a cell may name several: `a`, `b`)."""
    table = re.search(rf"<!-- forwarding-fields:{entity} -->\n(.*?)<!-- /forwarding-fields -->", DOC, re.S)
    assert table is not None, f"docs/FORWARDING.md has no field table for {entity}"
    names: set[str] = set()
    for line in table.group(1).splitlines()[2:]:
        if line.startswith("|"):  # (a footnote may follow the table)
            names |= set(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
    return names


@contextmanager
def receiver() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    got: list[tuple[dict[str, str], bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(({k.lower(): v for k, v in self.headers.items()},
                        self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/changes", got
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def forwarded(store: Store) -> Iterator[dict[str, list[dict[str, Any]]]]:
    """What a receiver got for a user, an organization and a membership created, then the user deleted."""
    with receiver() as (url, got):
        sink = StandardWebhookSink(url, SECRET)
        hooked = Store(store.engine, hooks=[Hook("forward", sink, on=["*"])])
        org, member = f.organization("org_1", B + 10), f.membership("orgmem_1", "org_1", "user_1", B + 20)
        for event in (f.envelope("user.created", f.user("user_1", B + 1)), f.envelope("organization.created", org),
                      f.envelope("organizationMembership.created", member),
                      f.envelope("user.updated", f.user("user_1", B + 30, first_name="Ann")),
                      f.envelope("user.deleted", {"id": "user_1", "object": "user", "deleted": True})):
            deliver(hooked, event)
        dispatcher = Dispatcher(hooked)
        while dispatcher.run_once():
            pass
        sink.close()
        by_entity: dict[str, list[dict[str, Any]]] = {}
        for headers, body in got:
            message = Webhook(SECRET).verify(body, headers)  # as a receiver in any language verifies it
            assert headers["webhook-id"] == message["idempotency_key"]
            assert headers["content-type"] == "application/json"
            by_entity.setdefault(message["data"]["entity"], []).append(message)
        yield by_entity


@pytest.mark.parametrize("entity", ["users", "organizations", "organization_memberships"])
def test_the_doc_names_every_field_a_change_carries_and_no_other(
        forwarded: dict[str, list[dict[str, Any]]], entity: str) -> None:
    for message in forwarded[entity]:
        expected = documented(entity)
        if message["data"]["kind"] == "deleted":  # the row's last values: no field the table does not keep (†)
            expected -= set(re.findall(r"`([a-z_]+)`[^|]*\| [^|\n]*\(†\)", DOC))
        assert set(message["data"]["values"]) == expected, message["data"]["kind"]


def test_the_body_has_the_shape_the_doc_shows(forwarded: dict[str, list[dict[str, Any]]]) -> None:
    example = json.loads(re.search(r"## Body\n\n```json\n(.*?)```", DOC, re.S).group(1))  # type: ignore[union-attr]
    kinds = [(m["type"], m["data"]["kind"]) for m in forwarded["users"]]
    assert kinds == [("user.created", "created"), ("user.updated", "updated"), ("user.deleted", "deleted")]
    for message in forwarded["users"]:
        assert set(message) == set(example) and set(message["data"]) == set(example["data"])
        data = message["data"]
        assert message["idempotency_key"] == f"{message['type']}:{data['clerk_id']}:{data['version']}"
        assert data["version"] == data["values"]["clerk_updated_at"] or data["kind"] == "deleted"
    created, updated, deleted = forwarded["users"]
    assert updated["data"]["previous"] == {"first_name": "Ada"} and created["data"]["previous"] == {}
    assert deleted["data"]["values"]["first_name"] == "Ann"  # a deletion carries the last values
    assert isinstance(created["data"]["values"]["clerk_created_at"], int)  # milliseconds, as documented
    (_, membership_deleted) = forwarded["organization_memberships"]
    assert membership_deleted["type"] == "organizationMembership.deleted"  # cascaded from the user's deletion
