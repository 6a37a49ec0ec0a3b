"""CLI review: ``replay``/``reconcile --with-hooks`` errors named ``--hooks`` (an option those commands do not
have); ``serve --host ::1`` announced ``http://::1:PORT``, no URL to paste (IPv6 goes in brackets)."""

from __future__ import annotations

import importlib
import socket
from pathlib import Path

import pytest

from clerk_sync.cli.hooks import load_hooks
from clerk_sync.config import Settings
from clerk_sync.errors import ConfigError
from tests.test_cli import run

main = importlib.import_module("clerk_sync.cli.main")  # (the package's `main` is the command)


def test_with_hooks_errors_name_with_hooks(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert run("migrate", env={"DATABASE_URL": url}).returncode == 0
    result = run("replay", "--status", "ignored", "--with-hooks", "nosuchmod:X", env={"DATABASE_URL": url})
    said = " ".join(result.stderr.split())
    assert result.returncode == 2 and "--with-hooks 'nosuchmod:X'" in said and "--hooks '" not in said, said
    not_hooks = run("replay", "--status", "ignored", "--with-hooks", "os:sep", env={"DATABASE_URL": url})
    said = " ".join(not_hooks.stderr.split())
    assert not_hooks.returncode == 2 and "--with-hooks 'os:sep' must be a non-empty list" in said, said



def test_a_handler_given_to_with_hooks_is_told_to_be_wrapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "with_hooks_handler.py").write_text("def on_change(change=None):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as raised:
        load_hooks("with_hooks_handler:on_change", "--with-hooks")
    said = str(raised.value)
    assert said.startswith("--with-hooks 'with_hooks_handler:on_change'"), said
    assert "that looks like a handler" in said and "point --with-hooks at the list" in said, said


def test_serve_announces_an_ipv6_address_in_brackets(capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings.from_env({"DATABASE_URL": "sqlite:///x.db", "CLERK_SYNC_CONSOLE": "1",
                                  "CLERK_SYNC_CONSOLE_TOKEN": "operator-token-for-tests-0123456789"})
    with socket.socket(socket.AF_INET6) as sock:
        try:
            sock.bind(("::1", 0))
        except OSError as exc:  # (a host without IPv6)
            pytest.skip(f"no IPv6 loopback here: {exc}")
        port = sock.getsockname()[1]
        main._announce(settings, "::1", sock)
    said = capsys.readouterr()
    out = said.out + said.err
    assert f"http://[::1]:{port}/webhooks/clerk" in out and f"http://[::1]:{port}/console" in out, out
