"""Flask test helpers: serve an app with werkzeug on loopback (real HTTP); one request API for both clients."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from flask import Flask
from werkzeug.serving import make_server


@contextmanager
def running_wsgi(app: Any, port: int = 0) -> Iterator[str]:
    """Yield the base URL while ``app`` is served; shut the server down afterwards."""
    try:
        server = make_server("127.0.0.1", port, app, threaded=True)  # bound and listening on return
    except SystemExit as exc:  # werkzeug exits the process when the port is taken: fail this test only
        raise RuntimeError(f"could not serve on 127.0.0.1:{port} (see stderr)") from exc
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@dataclass(frozen=True)
class Page:
    status: int
    json: Any


class Pages:
    """Requests through Flask's test client (``http=None``) or over HTTP, with an optional session token."""

    def __init__(self, app: Flask, http: httpx.Client | None) -> None:
        self.app, self.http = app, http

    def request(self, method: str, path: str, token: str | None = None, **params: str) -> Page:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if self.http is not None:
            r = self.http.request(method, path, headers=headers, params=params)
            json = r.json() if r.headers.get("content-type", "").startswith("application/json") else None
            return Page(r.status_code, json)
        with self.app.test_client() as client:
            resp = client.open(path, method=method, headers=headers, query_string=params)
            return Page(resp.status_code, resp.get_json(silent=True))

    def get(self, path: str, token: str | None = None, **params: str) -> Page:
        return self.request("GET", path, token, **params)

    def post(self, path: str, token: str | None = None, **params: str) -> Page:
        return self.request("POST", path, token, **params)
