"""``python -m examples.flask_saas``: the Flask example app against a local Clerk emulator, one command."""

from __future__ import annotations

import socket
import sys

from werkzeug.serving import make_server

from clerk_sync import migrations
from clerk_sync.config import Settings
from clerk_sync.store import create_engine
from clerk_sync.testing import EmulatorServer
from examples.flask_saas.app import create_app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else _free_port()
    with EmulatorServer(webhook_url=f"http://127.0.0.1:{port}/webhooks/clerk") as clerk:
        settings = Settings.from_env({
            "DATABASE_URL": "sqlite:///flask_saas_example.db",
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
        admin = clerk.create_user("admin@example.com", first_name="Ada", public_metadata={"role": "admin"})
        member = clerk.create_user("member@example.com", first_name="Bob")
        org = clerk.create_organization("Acme", created_by=admin["id"])
        clerk.add_membership(org["id"], member["id"])
        print(f"example app (Flask): http://127.0.0.1:{port}   emulator: {clerk.url}")
        print(f"admin token  (60 s): {clerk.mint_session_token(admin['id'], org_id=org['id'])}")
        print(f"member token (60 s): {clerk.mint_session_token(member['id'], org_id=org['id'])}")
        print(f"try: curl -H 'Authorization: Bearer <token>' http://127.0.0.1:{port}/dashboard")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()


if __name__ == "__main__":
    main()
