"""``python -m examples.django_saas [port] [--wsgi]``: the Django example against a local Clerk
emulator, one command. Serves the ASGI app with uvicorn, or the WSGI app with ``--wsgi``."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import sys
import tempfile
import threading
import time
from typing import Any

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def environment(clerk: Any) -> dict[str, str]:
    """The variables the example's ``CLERK_SYNC`` falls back to, pointing at the emulator."""
    return {
        "CLERK_WEBHOOK_SIGNING_SECRET": clerk.webhook_secret,
        "CLERK_SECRET_KEY": clerk.secret_key,
        "CLERK_API_URL": clerk.url,
        "CLERK_ISSUER": clerk.url,
        "CLERK_AUTHORIZED_PARTIES": "http://localhost:3000",
    }


def serve_in_thread(port: int, wsgi: bool) -> threading.Thread:
    """The Django app on loopback: the ASGI app under uvicorn, or the WSGI app under a threaded server."""
    if wsgi:
        from socketserver import ThreadingMixIn
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        from django.core.wsgi import get_wsgi_application

        class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
            daemon_threads = True

        class QuietHandler(WSGIRequestHandler):  # like uvicorn at log_level="warning": no access log
            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = make_server("127.0.0.1", port, get_wsgi_application(), server_class=ThreadingWSGIServer,
                             handler_class=QuietHandler)
        target = server.serve_forever
    else:
        import uvicorn
        from django.core.asgi import get_asgi_application

        target = uvicorn.Server(uvicorn.Config(get_asgi_application(), host="127.0.0.1", port=port,
                                               log_level="warning", lifespan="off")).run
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def wait_until_up(url: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the example app did not answer at {url}")
        time.sleep(0.05)


def main(argv: list[str]) -> None:
    import django
    from django.core.management import call_command

    from clerk_sync.testing import EmulatorServer

    args = [a for a in argv if not a.startswith("--")]
    port = int(args[0]) if args else _free_port()
    with EmulatorServer(webhook_url=f"http://127.0.0.1:{port}/webhooks/clerk") as clerk:
        os.environ.update(environment(clerk))
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_saas.settings")
        os.environ.setdefault("DJANGO_SECRET_KEY", secrets.token_urlsafe(50))  # this demo run's, never a constant
        # A fresh database each run (rows of an earlier run would show up otherwise); EXAMPLE_DB to keep one.
        os.environ.setdefault("EXAMPLE_DB", os.path.join(tempfile.mkdtemp(prefix="django_saas_"), "example.db"))
        django.setup()
        call_command("migrate", verbosity=0)  # Django's own tables (auth, admin, sessions)
        call_command("clerk_sync", "migrate")  # clerk-sync's tables, in the same database
        server = serve_in_thread(port, wsgi="--wsgi" in argv)
        wait_until_up(f"http://127.0.0.1:{port}/healthz")
        admin = clerk.create_user("admin@example.com", first_name="Ada", public_metadata={"role": "admin"})
        member = clerk.create_user("member@example.com", first_name="Bob")
        org = clerk.create_organization("Acme", created_by=admin["id"])
        clerk.add_membership(org["id"], member["id"])
        clerk.wait_for_deliveries()
        admin_token = clerk.mint_session_token(admin["id"], org_id=org["id"])
        member_token = clerk.mint_session_token(member["id"], org_id=org["id"])
        # One write: request logs from the server threads cannot land inside a token.
        sys.stdout.write(f"example app: http://127.0.0.1:{port}   emulator: {clerk.url}\n"
                         f"admin token  (60 s): {admin_token}\n"
                         f"member token (60 s): {member_token}\n"
                         f"try: curl -H 'Authorization: Bearer <token>' http://127.0.0.1:{port}/dashboard\n")
        sys.stdout.flush()
        with contextlib.suppress(KeyboardInterrupt):
            server.join()


if __name__ == "__main__":
    main(sys.argv[1:])
