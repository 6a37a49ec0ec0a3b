"""Day-one walkthrough: ``doctor`` with CLERK_API_URL pointing nowhere printed ``FAIL Clerk Backend API:
[Errno 111] Connection refused``, no URL and no next step (``reconcile`` says both). Its line now has
reconcile's words: the URL it could not connect to, and what to check."""

from __future__ import annotations

from pathlib import Path

from tests._server import free_port
from tests.conftest import SECRET
from tests.test_cli import run


def _clerk_api_line(tmp_path: Path, api_url: str) -> str:
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'd.db'}", "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
           "CLERK_SECRET_KEY": "sk_test_doctor", "CLERK_API_URL": api_url}
    result = run("doctor", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = [" ".join(line.split()) for line in result.stdout.splitlines() if "Clerk Backend API" in line]
    return line


def test_doctor_names_the_clerk_api_url_it_could_not_connect_to_and_what_to_check(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    line = _clerk_api_line(tmp_path, f"http://127.0.0.1:{port}/v1")
    assert line.startswith("FAIL Clerk Backend API:"), line
    assert f"could not connect to http://127.0.0.1:{port}/v1 (ConnectError:" in line, line
    assert "check CLERK_API_URL (Clerk's is https://api.clerk.com) and that this host can reach it" in line, line


def test_doctor_does_not_echo_credentials_in_clerk_api_url(tmp_path: Path) -> None:
    port = free_port()
    line = _clerk_api_line(tmp_path, f"http://someone:hunter2@127.0.0.1:{port}")
    assert f"could not connect to http://127.0.0.1:{port}/v1" in line, line
    assert "hunter2" not in line and "someone" not in line, line


def test_doctor_does_not_say_could_not_connect_when_it_connected(tmp_path: Path) -> None:
    """Review: a server that accepts the connection and closes it unanswered was reported "could not connect"
    (every TransportError took the connect advice)."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def hang_up() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.recv(65536)
            conn.close()  # connected, read the request, answered nothing

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    try:
        line = _clerk_api_line(tmp_path, f"http://127.0.0.1:{port}")
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert "could not connect" not in line, line
    assert f"http://127.0.0.1:{port}/v1/users/count: connected, but no answer (RemoteProtocolError" in line, line
