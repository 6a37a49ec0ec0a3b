"""Review: ``manage.py clerk_sync`` refused by a system check (``SystemCheckError``) exited 1, which cron reads as
"work left undone"; the README says a setting to fix exits 2, as the command's other refusals do."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings


def test_a_system_check_error_exits_2() -> None:
    with override_settings(CLERK_SYNC={}), pytest.raises(SystemCheckError, match=r"clerk_sync\.E002") as refused:
        call_command("clerk_sync", "replay", skip_checks=False, stdout=StringIO(), stderr=StringIO())
    assert refused.value.returncode == 2
