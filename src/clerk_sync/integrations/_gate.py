"""One delivery at a time per user/organization inside a process, so a stuck one costs one thread.

The webhook endpoint runs at most a few deliveries at once (a thread limiter). When another
connection holds a user's lock (a stuck replica), every delivery for that user would wait out the
database's ``lock_timeout`` in one of those threads, and unrelated deliveries would queue behind
them. With the gate, the first delivery for a key waits on the database; the others for that key
wait here only while the holder looks healthy (``patience_s``) and are then refused with
:class:`~clerk_sync.errors.StoreError` (503: Svix retries), leaving the threads to everyone else.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from clerk_sync.errors import StoreError

__all__ = ["KeyGate", "delivery_keys"]


class KeyGate:
    """Per-key exclusion with bounded patience; keys are taken all at once (no lock-order deadlock)."""

    def __init__(self, *, patience_s: float = 0.5, now: Callable[[], float] = time.monotonic) -> None:
        self._patience = patience_s
        self._now = now
        self._cond = threading.Condition()
        self._held: dict[str, float] = {}  # key -> when its holder took it

    @contextmanager
    def hold(self, keys: Iterable[str]) -> Iterator[None]:
        wanted = frozenset(keys)
        with self._cond:
            while busy := [self._held[k] for k in wanted if k in self._held]:
                wait = min(busy) + self._patience - self._now()
                if wait <= 0:
                    raise StoreError("another delivery for the same user or organization is still waiting on the "
                                     "database (a lock held elsewhere); retry later")
                self._cond.wait(wait)
            taken = self._now()
            self._held.update(dict.fromkeys(wanted, taken))
        try:
            yield
        finally:
            with self._cond:
                for key in wanted:
                    del self._held[key]
                self._cond.notify_all()


def delivery_keys(svix_id: str | None, body: bytes) -> list[str]:
    """The delivery's id and the users/organizations whose rows or locks it touches (best effort: an
    unreadable body gates on its id alone and is refused by the processor anyway)."""
    keys = [f"svix:{svix_id}"] if svix_id else []
    try:
        event = json.loads(body)
    except (ValueError, RecursionError):
        return keys
    data: Any = event.get("data") if isinstance(event, dict) else None
    kind = str(event.get("type", "")) if isinstance(event, dict) else ""
    if not isinstance(data, dict):
        return keys
    if kind.startswith("user."):
        keys.append(f"user:{data.get('id')}")
    elif kind.startswith("organization."):
        keys.append(f"org:{data.get('id')}")
    elif kind.startswith("organizationMembership."):
        org, member = data.get("organization"), data.get("public_user_data")
        keys += [f"org:{org.get('id')}"] if isinstance(org, dict) else []
        keys += [f"user:{member.get('user_id')}"] if isinstance(member, dict) else []
    return keys  # session.* (revocations) touch no user row: never held back behind a stuck user
