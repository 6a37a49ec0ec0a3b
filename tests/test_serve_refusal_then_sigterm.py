"""`serve --migrate` stopped for a refused start-up migration exits 2 (a setting to fix), also when a SIGTERM
arrives during that stop's drain (a supervisor stopping the unit, Kubernetes ending the pod): uvicorn kept the
signal and raised it again once drained, and the process ended by SIGTERM (143), which reads as a clean stop
to whatever restarts it, the refusal's line never printed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import SECRET

CHILD = textwrap.dedent('''
    import os, signal, sys
    import uvicorn
    import importlib
    main = importlib.import_module("clerk_sync.cli.main")
    from clerk_sync.config import Settings
    from clerk_sync.errors import ConfigError
    from clerk_sync.integrations.starlette import StartupMigration, build_processor
    from clerk_sync.store import Store, create_engine

    main._exit_after = lambda seconds, code: None  # (no watchdog thread in this short run)

    async def refused(self):
        self.refused = self.error = "serve --migrate: refused for a privilege (for the test)"
        self._for_privilege = True
        raise ConfigError(self.refused)

    StartupMigration.attempt = refused

    def run(self, sockets=None):
        import anyio
        with self.capture_signals():  # uvicorn's own: its handle_exit takes the signals, raised again at the end
            self.started = True
            migration = self.config.app.state.clerk_sync_migration
            migration._first = 0.01
            anyio.run(migration.retry)  # refused while serving: the stop begins
            assert self.should_exit
            os.kill(os.getpid(), signal.SIGTERM)  # the supervisor's stop, during the drain

    uvicorn.Server.run = run
    url, secret = sys.argv[1], sys.argv[2]
    settings = Settings.from_env({"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": secret,
                                  "CLERK_SYNC_PRUNE_INTERVAL_S": "0"})
    processor = build_processor(settings, Store(create_engine(url)))
    main._serve_one(settings, processor, "127.0.0.1", 0, migrate_first=True, dispatch=False, graceful_timeout_s=7)
''')


def test_a_sigterm_during_a_refusals_drain_keeps_exit_2(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'refused.db'}"
    done = subprocess.run([sys.executable, "-c", CHILD, url, SECRET], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "refused for a privilege (for the test)" in done.stderr
