"""Fault injection and rate limiting: the ways real Clerk misbehaves, on demand.

:class:`FaultSettings` is the mutable copy of the config's knobs that tests and
``POST /_emulator/faults`` change at run time.  Every random decision draws from one seeded
generator, so a run with a fixed ``seed`` injects the same faults in the same places.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from .config import EmulatorConfig

__all__ = ["FaultSettings", "Faults", "RateLimiter"]


@dataclass
class FaultSettings:
    """Knobs that can change while the emulator runs."""

    latency_s: float = 0.0
    error_rate: float = 0.0
    outage: bool = False
    duplicate_rate: float = 0.0
    reorder_rate: float = 0.0
    drop_then_redeliver_rate: float = 0.0
    fail_rate: float = 0.0
    rate_limit_requests: int = 100
    rate_limit_window_s: float = 10.0
    time_scale: float = 1.0
    # Webhook deliveries in flight at once (``EmulatorConfig.delivery_concurrency``).
    delivery_concurrency: int = 1

    @classmethod
    def from_config(cls, config: EmulatorConfig) -> FaultSettings:
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Faults:
    """The live fault settings plus the seeded generator that applies them."""

    def __init__(self, settings: FaultSettings, seed: int | None) -> None:
        self._lock = threading.Lock()
        self._settings = settings
        self._seed = seed
        self._rng, self._spawner = self._streams(seed)
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (no lock held) after every :meth:`update` and :meth:`reset`: the webhook deliverer
        starts or idles workers when ``delivery_concurrency`` changes."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in list(self._listeners):
            listener()

    @staticmethod
    def _streams(seed: int | None) -> tuple[random.Random, random.Random]:
        # Separate streams: API faults are rolled by the server thread, delivery faults by
        # the worker; sharing one generator would make results depend on thread timing.
        if seed is None:
            return random.Random(), random.Random()
        return random.Random(seed), random.Random(seed ^ 0x5EED)

    @property
    def settings(self) -> FaultSettings:
        """A snapshot; change knobs with :meth:`update`."""
        with self._lock:
            return FaultSettings(**self._settings.as_dict())

    def update(self, changes: Mapping[str, Any]) -> FaultSettings:
        """Apply ``changes`` (unknown names or bad values raise ``ValueError``)."""
        known = {f.name: f.type for f in fields(FaultSettings)}
        with self._lock:
            for name, value in changes.items():
                if name not in known:
                    raise ValueError(f"unknown fault setting {name!r}")
                setattr(self._settings, name, _coerce(name, value))
            updated = FaultSettings(**self._settings.as_dict())
        self._changed()
        return updated

    def reset(self, settings: FaultSettings) -> None:
        with self._lock:
            self._settings = settings
            self._rng, self._spawner = self._streams(self._seed)
        self._changed()

    def delivery_concurrency(self) -> int:
        """The live ``delivery_concurrency`` (without copying every knob, as :attr:`settings` does)."""
        with self._lock:
            return self._settings.delivery_concurrency

    def spawn(self) -> random.Random:
        """A generator of its own for one webhook message, derived from the seed in order."""
        with self._lock:
            return random.Random(self._spawner.getrandbits(64))

    def roll(self, name: str, rng: random.Random | None = None) -> bool:
        """True with the probability held in the knob ``name`` (e.g. ``"fail_rate"``).

        ``rng`` defaults to the API stream; webhook messages pass their own generator.
        """
        with self._lock:
            rate = float(getattr(self._settings, name))
            return rate > 0 and (rng or self._rng).random() < rate


def _coerce(name: str, value: Any) -> Any:
    if name == "outage":
        if not isinstance(value, bool):
            raise ValueError("outage must be true or false")
        return value
    if name == "delivery_concurrency":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"delivery_concurrency must be an integer of at least 1 (webhook deliveries in flight "
                             f"at once), got {value!r}")
        return value
    number = float(value)
    if name.endswith("_rate") and not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1")
    if number < 0 or (name == "time_scale" and number == 0):
        raise ValueError(f"{name} must be positive")
    if name == "rate_limit_requests" and number < 1:  # 0 would refuse every request with a 429
        raise ValueError("rate_limit_requests must be at least 1")
    return int(number) if name == "rate_limit_requests" else number


class RateLimiter:
    """Fixed-window request budget per secret key, like Clerk's per-instance BAPI limit."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int]] = {}

    def check(self, key: str, limit: int, window_s: float) -> int | None:
        """Count one request; return ``None`` if allowed, else seconds until the window resets."""
        now = self._clock()
        with self._lock:
            start, count = self._windows.get(key, (now, 0))
            if now - start >= window_s:
                start, count = now, 0
            if count >= limit:
                return max(1, math.ceil(start + window_s - now))
            self._windows[key] = (start, count + 1)
            return None

    def reset(self) -> None:
        with self._lock:
            self._windows.clear()
