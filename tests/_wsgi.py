"""Serve a WSGI app (Flask) with werkzeug's threaded server on a free loopback port (real HTTP)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from werkzeug.serving import make_server


@contextmanager
def running_wsgi(app: Any, port: int = 0) -> Iterator[str]:
    """Yield the base URL while ``app`` is served; shut the server down afterwards."""
    server = make_server("127.0.0.1", port, app, threaded=True)  # bound and listening on return
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
