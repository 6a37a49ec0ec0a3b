"""Review finding (Flask, session 2026-12-07): under ``PROMETHEUS_MULTIPROC_DIR`` (the README's gunicorn set-up)
with ``CLERK_SECRET_KEY``, every ``ClerkSync(app)`` starts a thread writing its Clerk client's gauges every
second. ``clerk_state(app).close()``, the documented teardown, left it running (one more thread per app a test
suite's factory made, polling a closed client for ever), and an app dropped without ``close()`` was never
collected: the thread held its metrics, and through them its store and database connections. Multiprocess mode
is chosen when prometheus_client is imported, so each case runs in a process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import SECRET

SCRIPT = textwrap.dedent('''
    import gc, sys, threading, time, weakref
    from flask import Flask
    from clerk_sync.integrations.flask import ClerkSync, clerk_state

    url, how = sys.argv[1], sys.argv[2]
    config = {"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": sys.argv[3], "CLERK_SECRET_KEY": "sk_test_x",
              "CLERK_API_URL": "http://127.0.0.1:9"}

    def writers():
        return sum(t.name == "clerk-sync-metrics" for t in threading.enumerate())

    stores = []
    for i in range(5):
        app = Flask(f"app{i}")
        app.config["CLERK_SYNC"] = config
        ClerkSync(app)
        stores.append(weakref.ref(clerk_state(app).store))
        if how == "closed":
            clerk_state(app).close()
        del app
    started = writers() if how == "dropped" else None
    gc.collect()
    deadline = time.monotonic() + 30  # each thread ends at its next one-second tick
    while writers() and time.monotonic() < deadline:
        time.sleep(0.05)
        gc.collect()
    collected = sum(ref() is None for ref in stores)
    print(f"started={started} left={writers()} collected={collected}")
''')


@pytest.mark.parametrize("how", ["closed", "dropped"])
def test_the_gauge_writing_thread_ends_with_its_app(sqlite_url: str, tmp_path: Path, how: str) -> None:
    prom = tmp_path / "prom"
    prom.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom)}
    done = subprocess.run([sys.executable, "-c", SCRIPT, sqlite_url, how, SECRET], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    said = done.stdout.strip().splitlines()[-1]
    if how == "closed":
        assert said == "started=None left=0 collected=5", said
    else:  # five were running (multiprocess mode is on), and each ended once its app was collected
        assert said == "started=5 left=0 collected=5", said
