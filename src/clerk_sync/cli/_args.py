"""Argument parsing shared by the commands."""

from __future__ import annotations

import errno
from collections.abc import Iterable
from datetime import datetime

from clerk_sync._limits import show
from clerk_sync._time import as_utc
from clerk_sync.engine import DeliveryStatus
from clerk_sync.errors import ClerkSyncError, ConfigError

__all__ = ["STORED_STATUSES", "PortInUse", "bind_error", "parse_since", "refuse_undecodable"]


class PortInUse(ClerkSyncError):
    """A port a command listens on is taken (another process, an earlier run still stopping): the CLI exits 3,
    as for a database that cannot be reached (``main.exit_code``), not 2: no setting is malformed."""

    code = "port_in_use"

#: What ``replay --status`` takes on every face: the statuses a delivery is stored with (a typo replayed nothing
#: and exited 0, as if nothing were failed).
STORED_STATUSES = sorted(s.value for s in DeliveryStatus if s is not DeliveryStatus.DUPLICATE)


def parse_since(value: str | None) -> datetime | None:
    """``--since`` as ISO 8601 (``2026-01-31``, ``2026-01-31T12:00:00Z``, offsets); naive means UTC. Returned
    in UTC: SQLite stores a time as its clock reading and drops the offset, so ``12:00+02:00`` compared
    there as 12:00 UTC, two hours off."""
    if value is None:
        return None
    try:
        return as_utc(datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00")))
    except ValueError:
        raise ConfigError(f"--since {show(value, 80)} is not an ISO 8601 date or time") from None
    except OverflowError:  # in UTC before year 1 or after 9999 (0001-01-01T00:30+01:00)
        raise ConfigError(f"--since {show(value, 80)} is out of range in UTC") from None


def refuse_undecodable(args: Iterable[object]) -> None:
    """A :class:`ConfigError` for an argument holding bytes that are not UTF-8 (PEP 383's surrogates: a terminal
    or script in another encoding), naming it, before it fails deep in a database driver with a traceback."""
    for arg in args:
        if not isinstance(arg, str):
            continue
        try:
            arg.encode()
        except UnicodeEncodeError:
            shown = arg.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
            raise ConfigError(f"the argument {shown} is not valid UTF-8 (a terminal or script in another "
                              "encoding?): give it as UTF-8") from None


def bind_error(exc: OSError, what: str, host_option: str = "--host") -> ClerkSyncError:
    """What a failed bind says, by its cause: a port in use (exit 3), an address not of this host or a port
    below 1024 without the right (each a setting to fix, exit 2); "pass another --port" fitted only the first."""
    if exc.errno == errno.EADDRINUSE:
        return PortInUse(f"{what} ({exc.strerror}): pass another --port, or stop what uses it")
    if exc.errno == errno.EADDRNOTAVAIL:
        return ConfigError(f"{what} ({exc.strerror}): {host_option} must be an address of this host "
                           "(0.0.0.0 listens on all of them, 127.0.0.1 on this host only)")
    if exc.errno == errno.EACCES:
        return ConfigError(f"{what} ({exc.strerror}): a port below 1024 needs privileges; pass --port 1024 or "
                           "above (a proxy in front can take 443)")
    return ConfigError(f"{what} ({exc.strerror}): pass another {host_option} or --port")
