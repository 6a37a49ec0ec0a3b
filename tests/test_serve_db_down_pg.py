"""``clerk-sync serve`` started while PostgreSQL is unreachable (issue 10 #10): it starts anyway,
answers ``/readyz`` and deliveries 503, migrates in the background with backoff, and becomes ready
once the database answers.

"Unreachable" without stopping the shared server: the service points at a port where nothing listens
yet; later a tiny TCP proxy starts on that port and forwards to the real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from clerk_sync.tables import users
from tests import factories as f
from tests._procs import Server, free_port
from tests.conftest import PG_URL, SECRET, pg_schema_url

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

PG_HOST, PG_PORT = "127.0.0.1", 5432


@contextlib.contextmanager
def tcp_proxy(port: int) -> Iterator[None]:
    """Forward 127.0.0.1:``port`` to the PostgreSQL server, in a thread of its own."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(PG_HOST, PG_PORT)
        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        started.set()
        async with server:
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


@pytest.fixture
def empty_schema() -> Iterator[str]:
    """A schema with no tables at all: the service has to migrate it itself."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError as exc:
        pytest.skip(f"PostgreSQL unreachable: {exc}")
    try:
        yield schema
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _post(client: httpx.Client, base: str, svix_id: str) -> httpx.Response:
    headers, body = f.signed(f.envelope("user.created", f.user("user_late", 1)), svix_id)
    return client.post(f"{base}/webhooks/clerk", content=body, headers={**headers, "content-type": "application/json"})


@pytest.mark.timeout(120)
def test_serve_starts_while_the_database_is_unreachable_and_becomes_ready_when_it_answers(
    empty_schema: str, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens here yet
    url = pg_schema_url(empty_schema).replace(f"{PG_HOST}:{PG_PORT}", f"127.0.0.1:{port}")
    assert f"127.0.0.1:{port}" in url
    server = Server(url, SECRET, migrate=True, log=tmp_path / "serve.log")
    try:
        server.wait_ready()  # /healthz: the process is up although the database is not
        with httpx.Client(timeout=10) as client:
            ready = client.get(f"{server.url}/readyz")
            assert ready.status_code == 503 and ready.json()["database"] == "down"
            refused = _post(client, server.url, "msg_while_down")
            assert refused.status_code == 503 and refused.headers["retry-after"]
            # (fixA: the start-up migration's own code and text, as /readyz's: not "the database is unavailable")
            assert refused.json()["error"] == "migration_pending", refused.text
            assert "migrations have not run yet" in refused.json()["message"], refused.text
            # review: the 503 named the database's host and port (the driver's error) to anyone, and an
            # unsigned or forged request got it too, before its signature was checked
            assert str(port) not in refused.text and "127.0.0.1" not in refused.text
            unsigned = client.post(f"{server.url}/webhooks/clerk", content=b"junk")
            assert unsigned.status_code == 400 and str(port) not in unsigned.text
            headers, body = f.signed(f.envelope("user.created", f.user("user_late", 1)), "msg_forged")
            forged = client.post(f"{server.url}/webhooks/clerk", content=body + b" ", headers=headers)
            assert forged.status_code == 401

            with tcp_proxy(port):  # the database comes back
                deadline = time.monotonic() + 60
                while client.get(f"{server.url}/readyz").status_code != 200:
                    assert server.proc.poll() is None, (tmp_path / "serve.log").read_text()
                    assert time.monotonic() < deadline, "serve never became ready"
                    time.sleep(0.2)
                assert client.get(f"{server.url}/readyz").json() == {"database": "ok", "migrations_current": True}
                applied = _post(client, server.url, "msg_while_down")  # Svix's retry
                assert (applied.status_code, applied.json()["status"]) == (200, "applied")
        assert server.proc.poll() is None  # it never exited
    finally:
        server.stop()
    engine = sa.create_engine(pg_schema_url(empty_schema))
    with engine.connect() as conn:
        assert conn.execute(sa.select(users.c.clerk_id)).scalars().all() == ["user_late"]
    engine.dispose()
