"""``python -m examples.flask_saas [port]``: the Flask example app against a local Clerk emulator, one command.

The app serves before the emulator is seeded, so the seed's webhooks arrive at once, and the tokens are
printed once they have been applied. Each run starts from a fresh database in a temporary directory
(``EXAMPLE_DB=path`` keeps one)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading

from werkzeug.serving import make_server

from clerk_sync import migrations
from clerk_sync.config import Settings
from clerk_sync.store import create_engine
from clerk_sync.testing import EmulatorServer
from examples.flask_saas.app import create_app


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0  # 0: any free port
    db = os.environ.get("EXAMPLE_DB") or os.path.join(tempfile.mkdtemp(prefix="flask_saas_example_"), "flask_saas.db")
    with EmulatorServer() as clerk:  # told where to deliver once the app serves
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
        server = make_server("127.0.0.1", port, create_app(settings), threaded=True)
        port = server.server_port
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        clerk.set_webhook_url(f"http://127.0.0.1:{port}/webhooks/clerk")
        admin = clerk.create_user("admin@example.com", first_name="Ada", public_metadata={"role": "admin"})
        member = clerk.create_user("member@example.com", first_name="Bob")
        org = clerk.create_organization("Acme", created_by=admin["id"])
        clerk.add_membership(org["id"], member["id"])
        clerk.wait_for_deliveries()  # the rows are in: the tokens below work on every page at once
        # One write: request logs from the server threads cannot land inside a token.
        sys.stdout.write(f"example app (Flask): http://127.0.0.1:{port}   emulator: {clerk.url}   database: {db}\n"
                         f"admin token  (60 s): {clerk.mint_session_token(admin['id'], org_id=org['id'])}\n"
                         f"member token (60 s): {clerk.mint_session_token(member['id'], org_id=org['id'])}\n"
                         f"try: curl -H 'Authorization: Bearer <token>' http://127.0.0.1:{port}/dashboard\n")
        sys.stdout.flush()
        try:
            with contextlib.suppress(KeyboardInterrupt):
                thread.join()
        finally:
            server.shutdown()
            server.server_close()


if __name__ == "__main__":
    main()
