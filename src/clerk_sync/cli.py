"""The ``clerk-sync`` command line (Typer + Rich). Reads settings from the environment, once."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console

from clerk_sync import migrations
from clerk_sync._logging import configure_logging
from clerk_sync.config import Settings
from clerk_sync.errors import ClerkSyncError
from clerk_sync.store import Store

__all__ = ["app", "main"]

app = typer.Typer(help="Keep your SQL database in sync with Clerk.", no_args_is_help=True)
console = Console(stderr=True)


def _settings() -> Settings:
    return Settings.from_env()


@app.command()
def migrate() -> None:
    """Apply database migrations (DATABASE_URL)."""
    settings = _settings()
    store = Store.from_url(settings.sqlalchemy_url())
    migrations.upgrade(store.engine)
    console.print(f"[green]migrations current[/] ({migrations.head_revision()}) on {_safe(settings)}")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes (PostgreSQL for more than 1).")] = 1,
    migrate_first: Annotated[bool, typer.Option("--migrate/--no-migrate", help="Apply migrations first.")] = True,
    json_logs: Annotated[bool, typer.Option("--json-logs", help="Log JSON lines.")] = False,
) -> None:
    """Run the webhook sync service: POST /webhooks/clerk, /healthz, /readyz, /metrics."""
    import uvicorn

    from clerk_sync.integrations.starlette import build_processor

    settings = _settings()
    configure_logging(settings.log_level, json=json_logs)
    processor = build_processor(settings)  # fails here, once, on a missing/malformed secret
    if migrate_first:
        migrations.upgrade(processor.store.engine)
    console.print(f"clerk-sync serving on http://{host}:{port}/webhooks/clerk ({_safe(settings)})")
    if workers > 1:
        uvicorn.run("clerk_sync.integrations.starlette:app_from_env", factory=True, host=host,
                    port=port, workers=workers, log_level="warning")
    else:
        from clerk_sync.integrations.starlette import create_app

        uvicorn.run(create_app(settings, processor), host=host, port=port, log_level="warning")


@app.command()
def replay(
    status: Annotated[str, typer.Option(help="Replay deliveries with this status.")] = "failed",
    since: Annotated[datetime | None, typer.Option(help="Only deliveries received at/after (ISO).")] = None,
) -> None:
    """Re-apply stored deliveries (after fixing what made them fail)."""
    from clerk_sync.ingest import replay_deliveries

    settings = _settings()
    store = Store.from_url(settings.sqlalchemy_url())
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    report = replay_deliveries(store, status=status, since=since)
    console.print(f"replayed {report.total} deliveries: {report.by_status or 'none'}")


def _safe(settings: Settings) -> str:
    from sqlalchemy.engine import make_url

    return make_url(settings.sqlalchemy_url()).render_as_string(hide_password=True)


def main() -> None:
    """Console entry point: turn our errors into one readable line and exit 2."""
    try:
        app()
    except ClerkSyncError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise SystemExit(2) from None
