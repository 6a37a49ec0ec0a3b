"""`clerk-sync dev` prints a console link that signs the demo admin in (a session token minted by the emulator)."""

from __future__ import annotations

from pathlib import Path

import httpx
from rich.console import Console

from clerk_sync.cli.dev import DevStack, run_dev, seed_demo


def test_the_dev_link_signs_the_demo_admin_in(tmp_path: Path) -> None:
    stack = DevStack(tmp_path / "dev.db", faults=False)
    with stack.running(), stack.clerk() as clerk:
        seed_demo(clerk, 4, 1)
        assert stack.wait_converged(timeout_s=30)
        link = stack.console_link()
        assert link is not None and link.startswith(f"{stack.service_url}/console/login/clerk?token=")
        with httpx.Client(timeout=30, headers={"Accept": "text/html"}) as browser:
            landed = browser.get(link, follow_redirects=True)
            assert landed.status_code == 200 and landed.url.path == "/console/"
            assert "Overview" in landed.text and "ada.0@example.com" not in landed.text
            users = browser.get(f"{stack.service_url}/console/users")
            assert "ada.0@example.com" in users.text  # the demo admin is user 0


def test_dev_command_prints_the_console_link(tmp_path: Path) -> None:
    """While `dev` keeps running; with `--once` (stopped right after the report) the link would lead nowhere."""
    from clerk_sync.cli.dev import _print_report

    console = Console(record=True, width=100)
    report = run_dev(tmp_path / "demo.db", users_n=3, orgs_n=1, console=console, keep_running=False)
    assert report.converged and report.console_url is not None
    assert report.console_url not in console.export_text()
    running = Console(record=True, width=100)
    with DevStack(tmp_path / "running.db").running() as stack:
        _print_report(running, report, stack, running=True)
    lines = running.export_text().splitlines()
    assert any(line.startswith("console ") and report.console_url in line for line in lines)
