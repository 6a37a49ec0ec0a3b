"""The benchmarks still run against today's code.

Nothing here times anything: benchmarks run by hand (BENCHMARKS.md), so a change of an internal shape they
touch went unseen until someone ran them (bench/auth.py filled the verifier's cache with the entries of an
older release and crashed mid-run, 14 minutes in). These tests run each benchmark's cheap parts once, on
tiny inputs.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

BENCH = Path(__file__).resolve().parent.parent / "bench"
CLIS = ["auth.py", "cascade.py", "console.py", "ingest.py", "reconcile.py", "_observe_cost.py", "_loadgen.py",
        "_auth_loadgen.py"]


def _load(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))  # as when run as a script: bench/ first on sys.path
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", CLIS)
def test_each_benchmark_command_starts(script: str) -> None:
    done = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True,
                          timeout=120, cwd=BENCH.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:")


def test_the_auth_benchmarks_in_process_ops_run_and_agree(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    auth = _load("auth", monkeypatch)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub, pem = key.public_key(), auth.public_pem(key)
    tokens = auth.mint(key, 12)
    parts = auth.chunks(tokens, 2)
    ops = {
        "floor": auth.floor_op(pub, parts),
        "first_seen": auth.first_seen_op(pem, parts),
        "first_seen_full": auth.first_seen_op(pem, parts, prefill=20),  # the cache starts full: evicts
        "repeat": auth.repeat_op(pem, tokens[:4], 8, 2),
        "authenticate": auth.authenticate_op(pem, tokens[:4], 8, 2, tmp_path / "auth.db"),
        "parse": auth.parse_op(pem, parts),
    }
    timed = auth.time_ops(ops, 1, 2)
    assert set(timed) == set(ops)
    assert all(len(xs) == 1 and xs[0] > 0 for xs in timed.values())
    verdict = auth.check_verifier(key, pem, tokens)
    assert verdict.startswith("same `Auth` as `jwt.decode`"), verdict
