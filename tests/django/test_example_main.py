"""``python -m examples.django_saas``: one command brings up the emulator and the Django app
(ASGI under uvicorn, or WSGI with ``--wsgi``), seeded, with tokens to try."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests._server import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mode", [[], ["--wsgi"]], ids=["asgi", "wsgi"])
def test_the_example_runs_with_one_command(tmp_path: Path, mode: list[str]) -> None:
    port = free_port()
    env = {**os.environ, "EXAMPLE_DB": str(tmp_path / "example.db"), "PYTHONUNBUFFERED": "1"}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.pop("DJANGO_SECRET_KEY", None)  # the demo run makes a random one
    errors = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "examples.django_saas", str(port), *mode], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=errors, text=True)  # logs apart: tokens stay whole
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        while not any(line.startswith("try:") for line in lines):
            line = proc.stdout.readline()
            assert line, "".join(lines) + (tmp_path / "stderr.txt").read_text()
            lines.append(line)
        admin = re.search(r"admin token +\(60 s\): (\S+)", "".join(lines))
        member = re.search(r"member token \(60 s\): (\S+)", "".join(lines))
        assert admin and member
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as app:  # up and seeded by now
            as_admin = {"Authorization": f"Bearer {admin.group(1)}"}
            as_member = {"Authorization": f"Bearer {member.group(1)}"}
            assert app.get("/dashboard").status_code == 401
            page = app.get("/dashboard", headers=as_admin).json()
            assert page.get("email") == "admin@example.com", page
            org = app.get("/org", headers=as_member).json()
            assert [m["email"] for m in org["members"]] == ["admin@example.com", "member@example.com"]
            assert app.get("/admin/users", headers=as_member).status_code == 403
            assert app.get("/admin/users", headers=as_admin).status_code == 200
            login = app.get("/django-admin/login/")
            assert (login.status_code, login.headers.get("X-Frame-Options")) == (200, "DENY")
            anonymous = app.get("/django-admin/", follow_redirects=False)  # the admin's own guard: its login page
            assert anonymous.status_code == 302 and "/django-admin/login/" in anonymous.headers["location"]
            assert app.get("/django-admin/", headers=as_member, follow_redirects=False).status_code == 302
            assert app.get("/django-admin/", headers=as_admin, follow_redirects=False).status_code == 200  # staff
    finally:
        proc.terminate()
        proc.wait(10)
        errors.close()
