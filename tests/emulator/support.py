"""Helpers for the emulator tests: a webhook receiver and OpenAPI schema validation."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]
from jsonschema import Draft4Validator  # type: ignore[import-untyped]
from referencing import Registry
from referencing.jsonschema import DRAFT4

SHARED = Path(__file__).resolve().parents[1] / "fixtures" / "clerk"  # vendored: see its README.md
BAPI_SPEC = SHARED / "openapi" / "bapi" / "2026-05-12.yml"
WEBHOOK_SPEC = SHARED / "openapi" / "webhooks" / "2025-04-15.yml"


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _always_ok(item: Received) -> int:
    return 204


@dataclass
class Receiver:
    """A loopback HTTP endpoint that records deliveries and answers with ``status_for``."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    status_for: Callable[[Received], int] = _always_ok
    response_headers: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, item: Received) -> int:
        with self.lock:
            self.received.append(item)
        return self.status_for(item)

    def ids(self) -> list[str]:
        with self.lock:
            return [r.headers["svix-id"] for r in self.received]

    def types(self) -> list[str]:
        with self.lock:
            return [r.json()["type"] for r in self.received]


def handler_for(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            item = Received({k.lower(): v for k, v in self.headers.items()}, self.rfile.read(length))
            status = receiver.record(item)
            self.send_response(status)
            for name, value in receiver.response_headers.items():
                self.send_header(name, value)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def served_receiver() -> Iterator[Receiver]:
    """A :class:`Receiver` listening on a free loopback port (its ``url``) for a ``with`` block."""
    recv = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(recv))
    server.daemon_threads = True
    recv.url = f"http://127.0.0.1:{server.server_address[1]}/webhooks/clerk"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield recv
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _convert(node: Any) -> Any:
    """OpenAPI 3.0 -> JSON Schema: ``nullable: true`` becomes ``anyOf [null, schema]``."""
    if isinstance(node, list):
        return [_convert(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {k: _convert(v) for k, v in node.items() if k != "nullable" and not k.startswith("x-")}
    converted.pop("discriminator", None)
    if node.get("nullable") is True:
        return {"anyOf": [{"type": "null"}, converted]}
    return converted


@cache
def _spec(path: Path) -> dict[str, Any]:
    with path.open() as handle:
        converted: dict[str, Any] = _convert(yaml.safe_load(handle))
    return converted


class SpecValidator:
    """Validates instances against ``#/components/schemas/<name>`` of one spec file."""

    def __init__(self, path: Path) -> None:
        self.uri = f"urn:spec:{path.name}"
        self.registry: Registry[Any] = Registry().with_resource(self.uri, DRAFT4.create_resource(_spec(path)))

    def errors(self, name: str, instance: Any) -> list[str]:
        schema = {"$ref": f"{self.uri}#/components/schemas/{name}"}
        validator = Draft4Validator(schema, registry=self.registry)
        return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance)]

    def validate(self, name: str, instance: Any) -> None:
        found = self.errors(name, instance)
        assert not found, f"{name} does not match the spec:\n" + "\n".join(found[:10])


_DATA_SCHEMA = {
    "user.created": "User",
    "user.updated": "User",
    "user.deleted": "DeletedObject",
    "organization.created": "Organization",
    "organization.updated": "Organization",
    "organization.deleted": "DeletedObject",
    "email.created": "EmailEventPayload",
}


def validate_event(spec: SpecValidator, envelope: dict[str, Any]) -> None:
    """Validate a webhook envelope and its ``data`` against the webhooks spec.

    Session events are ``allOf[Session, {user}]`` in the spec while Session forbids extra
    properties, so the two halves are checked separately.
    """
    spec.validate("WebhookEventPayload", envelope)
    event_type, data = envelope["type"], envelope["data"]
    if event_type.startswith("organizationMembership."):
        spec.validate("OrganizationMembership", data)
    elif event_type.startswith("session."):
        spec.validate("Session", {k: v for k, v in data.items() if k != "user"})
        spec.validate("User", data["user"])
    else:
        spec.validate(_DATA_SCHEMA[event_type], data)
