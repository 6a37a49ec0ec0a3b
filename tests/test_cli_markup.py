"""The CLI prints messages as text, not as Rich markup: ``pip install 'clerk-sync[postgres]'`` lost its
``[postgres]`` (Rich took it for a style tag), so the one line that says what to install named no extra."""

from __future__ import annotations

import importlib

import pytest
from typer.testing import CliRunner

from clerk_sync.cli import doctor as cli_doctor
from clerk_sync.errors import ConfigError

cli_main = importlib.import_module("clerk_sync.cli.main")  # (the package's ``main`` is the function)


def test_an_error_keeps_the_extra_it_names(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def refuse() -> None:
        raise ConfigError("the postgres driver is missing: pip install 'clerk-sync[postgres]' [bold]x[/bold]")

    monkeypatch.setattr(cli_main, "app", refuse)
    with pytest.raises(SystemExit) as exited:
        cli_main.main()
    assert exited.value.code == 2
    said = " ".join(capsys.readouterr().err.split())  # (the console may wrap the line)
    assert "pip install 'clerk-sync[postgres]' [bold]x[/bold]" in said


def test_a_doctor_line_keeps_its_brackets(monkeypatch: pytest.MonkeyPatch) -> None:
    checks = [cli_doctor.Check("driver [mysql]", "fail", "pip install 'clerk-sync[mysql]'")]
    monkeypatch.setattr(cli_doctor, "run_checks", lambda settings, mapping=None: checks)
    monkeypatch.setattr(cli_main, "_settings", lambda: None)
    result = CliRunner().invoke(cli_main.app, ["doctor"])
    assert result.exit_code == 1
    assert "driver [mysql]: pip install 'clerk-sync[mysql]'" in result.stdout
