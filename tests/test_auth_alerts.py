"""The authentication alerts (``docs/alerts.yml``) under ``promtool test rules``: ClerkSyncAuthClockSkew fires for the
one replica whose clock is off (not for the install's healthy ones, nor for a quiet replica's one stale tab), and
ClerkSyncAuthKeyUnknown for a process that holds no key for the tokens it is sent (not for a stray forged kid)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ALERTS = Path(__file__).resolve().parent.parent / "docs" / "alerts.yml"
REFUSED = "clerk_sync_auth_refused_total"
AUTHENTICATED = "clerk_sync_auth_authenticated_total"


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CLERK_SYNC_REQUIRE_PROMTOOL") == "1":
            pytest.fail("promtool is missing: apt-get install -y prometheus")
        pytest.skip("promtool is missing (apt-get install -y prometheus)")
    return found


def _series(name: str, job: str, instance: str, values: str, **labels: str) -> dict[str, str]:
    shown = ",".join(f'{k}="{v}"' for k, v in {"job": job, "instance": instance, **labels}.items())
    return {"series": f"{name}{{{shown}}}", "values": values}


def _fires(alert: str, job: str, instance: str) -> dict[str, Any]:
    rule = next(r for group in yaml.safe_load(ALERTS.read_text())["groups"] for r in group["rules"]
                if r.get("alert") == alert)
    shown = {k: v.replace("{{ $labels.instance }}", instance) for k, v in rule["annotations"].items()}
    return {"exp_labels": {**rule["labels"], "job": job, "instance": instance}, "exp_annotations": shown}


def _run(tmp_path: Path, tests: list[dict[str, Any]]) -> None:
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": tests}))
    result = subprocess.run([_promtool(), "test", "rules", str(spec)], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_clock_alert_fires_for_the_replica_whose_clock_is_off(tmp_path: Path) -> None:
    """prod-2's clock falls behind Clerk's at minute 10: its fresh tokens are refused as not valid yet while prod-1
    (1 % of its tokens expired: stale tabs) goes on; staging's quiet replica refuses one stale token an hour."""
    alert = "ClerkSyncAuthClockSkew"
    _run(tmp_path, [{
        "interval": "1m",
        "input_series": [
            _series(AUTHENTICATED, "prod", "prod-1", "0+100x60"),
            _series(REFUSED, "prod", "prod-1", "0+1x60", code="token_expired"),
            _series(AUTHENTICATED, "prod", "prod-2", "0+100x10 1000x50"),
            _series(REFUSED, "prod", "prod-2", "0x10 0+90x50", code="token_not_active_yet"),
            _series(REFUSED, "prod", "prod-2", "0+1x60", code="token_expired"),
            _series(AUTHENTICATED, "staging", "staging-1", "0x60"),
            _series(REFUSED, "staging", "staging-1", "0x5 1x55", code="token_expired"),
        ],
        "alert_rule_test": [
            {"eval_time": "15m", "alertname": alert, "exp_alerts": []},  # refused, not yet for 10 min
            {"eval_time": "35m", "alertname": alert, "exp_alerts": [_fires(alert, "prod", "prod-2")]},
        ],
    }])


def test_the_key_alert_fires_when_tokens_name_no_key_held_and_not_for_a_stray_forged_kid(tmp_path: Path) -> None:
    """staging's JWKS is unreachable from start-up (every token 503 token_keys_unavailable); prod's keys rotated at
    minute 20 and one replica keeps refusing the new key's tokens; prod-1 sees a forged kid now and then."""
    alert = "ClerkSyncAuthKeyUnknown"
    _run(tmp_path, [{
        "interval": "1m",
        "input_series": [
            _series(AUTHENTICATED, "prod", "prod-1", "0+100x60"),
            _series(REFUSED, "prod", "prod-1", "0+0.2x60", code="token_key_unknown"),
            _series(AUTHENTICATED, "prod", "prod-2", "0+100x20 2000x40"),
            _series(REFUSED, "prod", "prod-2", "0x20 0+100x40", code="token_key_unknown"),
            _series(AUTHENTICATED, "staging", "staging-1", "0x60"),
            _series(REFUSED, "staging", "staging-1", "0+20x60", code="token_keys_unavailable"),
        ],
        "alert_rule_test": [
            {"eval_time": "25m", "alertname": alert, "exp_alerts": [_fires(alert, "staging", "staging-1")]},
            {"eval_time": "45m", "alertname": alert,
             "exp_alerts": [_fires(alert, "prod", "prod-2"), _fires(alert, "staging", "staging-1")]},
        ],
    }])
