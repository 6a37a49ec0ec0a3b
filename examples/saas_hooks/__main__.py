"""``python -m examples.saas_hooks``: emulator + the app + the billing service, one sign-up, the results."""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import uvicorn

from clerk_sync.config import Settings
from clerk_sync.testing import EmulatorServer
from examples.saas_hooks.app import build, welcome_mails
from examples.saas_hooks.billing import create_billing

BILLING_SECRET = "whsec_" + "ZXhhbXBsZS1iaWxsaW5nLXNlY3JldC0zMi1ieXRlcyE="


def _listening() -> socket.socket:
    """A loopback socket bound now, for a server started later: a port picked and released could be
    taken meanwhile (by the emulator's own bind, say)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def _serve(app: Any, sock: socket.socket) -> uvicorn.Server:
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"a server of the example could not start on {sock.getsockname()}")
        time.sleep(0.01)
    return server


def main() -> None:
    app_socket, billing_socket = _listening(), _listening()
    app_port, billing_port = app_socket.getsockname()[1], billing_socket.getsockname()[1]
    db = Path(tempfile.mkdtemp()) / "saas_hooks.db"
    with EmulatorServer(webhook_url=f"http://127.0.0.1:{app_port}/webhooks/clerk") as clerk:
        settings = Settings.from_env({"DATABASE_URL": f"sqlite:///{db}",
                                      "CLERK_WEBHOOK_SIGNING_SECRET": clerk.webhook_secret})
        example = build(settings, billing_url=f"http://127.0.0.1:{billing_port}/clerk-changes",
                        billing_secret=BILLING_SECRET)
        _serve(create_billing(BILLING_SECRET), billing_socket)
        _serve(example.app, app_socket)
        example.dispatcher.start()
        clerk.create_user("ada@example.com", first_name="Ada", public_metadata={"role": "admin"})
        clerk.wait_for_deliveries()
        example.dispatcher.stop()  # the thread would get there within poll_s; drain to show it now
        example.dispatcher.drain()
        with example.store.connect() as conn:
            print("accounts:", [dict(r) for r in conn.execute(sa.text("SELECT * FROM accounts")).mappings()])
            print("welcome mails:", [dict(r) for r in conn.execute(sa.select(welcome_mails)).mappings()])
        print("billing customers:", httpx.get(f"http://127.0.0.1:{billing_port}/customers").json())


if __name__ == "__main__":
    main()
