"""``python -m examples.saas [port]``: the example app against a local Clerk emulator, one command.

The app listens before the emulator is seeded, so the seed's webhooks arrive at once, and the tokens
are printed once they have been applied. Each run starts from a fresh database in a temporary directory
(``EXAMPLE_DB=path`` keeps one)."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import threading
import time

import uvicorn

from clerk_sync import migrations
from clerk_sync.config import Settings
from clerk_sync.store import create_engine
from clerk_sync.testing import EmulatorServer
from examples.saas.app import create_app


def _listening(port: int) -> socket.socket:
    """The app's loopback socket, bound now (port 0: any free one) and handed to the server."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


def main() -> None:
    sock = _listening(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    port = sock.getsockname()[1]
    db = os.environ.get("EXAMPLE_DB") or os.path.join(tempfile.mkdtemp(prefix="saas_example_"), "saas.db")
    with EmulatorServer(webhook_url=f"http://127.0.0.1:{port}/webhooks/clerk") as clerk:
        settings = Settings.from_env({
            "DATABASE_URL": f"sqlite:///{db}",
            "CLERK_WEBHOOK_SIGNING_SECRET": clerk.webhook_secret,
            "CLERK_SECRET_KEY": clerk.secret_key,
            "CLERK_API_URL": clerk.url,
            "CLERK_ISSUER": clerk.url,
            "CLERK_AUTHORIZED_PARTIES": "http://localhost:3000",
        })
        engine = create_engine(settings.sqlalchemy_url())
        migrations.upgrade(engine)
        engine.dispose()
        server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:  # listening: the seed's webhooks are not refused and retried later
            if not thread.is_alive():
                raise RuntimeError(f"the example app could not start on 127.0.0.1:{port}")
            time.sleep(0.01)
        admin = clerk.create_user("admin@example.com", first_name="Ada", public_metadata={"role": "admin"})
        member = clerk.create_user("member@example.com", first_name="Bob")
        org = clerk.create_organization("Acme", created_by=admin["id"])
        clerk.add_membership(org["id"], member["id"])
        clerk.wait_for_deliveries()  # the rows are in: the tokens below work on every page at once
        # One write: request logs from the server threads cannot land inside a token.
        sys.stdout.write(f"example app: http://127.0.0.1:{port}   emulator: {clerk.url}   database: {db}\n"
                         f"admin token  (60 s): {clerk.mint_session_token(admin['id'], org_id=org['id'])}\n"
                         f"member token (60 s): {clerk.mint_session_token(member['id'], org_id=org['id'])}\n"
                         f"try: curl -H 'Authorization: Bearer <token>' http://127.0.0.1:{port}/dashboard\n")
        sys.stdout.flush()
        try:
            with contextlib.suppress(KeyboardInterrupt):
                thread.join()
        finally:
            server.should_exit = True
            thread.join(10)


if __name__ == "__main__":
    main()
