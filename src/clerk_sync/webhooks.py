"""Svix signature verification for Clerk deliveries (pure: secret, headers, body and ``now`` in).

The HMAC itself comes from ``standardwebhooks`` (``Webhook.sign``). We parse the headers and check the
timestamp ourselves because its ``verify`` reads the wall clock (no injectable ``now``) and lets
``ValueError``/``binascii.Error`` escape on malformed signature lists; every failure here is one
:class:`WebhookVerificationError`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook

from clerk_sync._limits import SVIX_ID_CHARS
from clerk_sync.config import _SECRET_HELP, _tolerance_problem, _webhook_key
from clerk_sync.errors import ConfigError, WebhookHeadersMissing, WebhookVerificationError

__all__ = ["DEFAULT_TOLERANCE_S", "SignedHeaders", "WebhookVerifier", "sign"]

DEFAULT_TOLERANCE_S = 300


@dataclass(frozen=True, slots=True)
class SignedHeaders:
    """The three Svix headers (``svix-*``, or the unbranded ``webhook-*`` set)."""

    msg_id: str
    timestamp: str
    signature: str

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> SignedHeaders:
        """Case-insensitive lookup; ``svix-*`` wins over ``webhook-*`` as in the Svix libraries."""
        lower = {k.lower(): v for k, v in headers.items()}
        values = [lower.get(f"svix-{n}") or lower.get(f"webhook-{n}") for n in ("id", "timestamp", "signature")]
        if not all(values):
            missing = [n for n, v in zip(("id", "timestamp", "signature"), values, strict=True) if not v]
            raise WebhookHeadersMissing(f"missing webhook header(s): {', '.join('svix-' + m for m in missing)}")
        msg_id, timestamp, signature = (str(v) for v in values)
        if len(msg_id) > SVIX_ID_CHARS or not msg_id.isprintable() or msg_id != msg_id.strip():
            # The inbox keys deliveries by this id: refuse one no column can hold, before any work (and one
            # MariaDB's PAD SPACE collation would take for another: "msg_1 " is "msg_1" there).
            raise WebhookHeadersMissing(f"svix-id must be at most {SVIX_ID_CHARS} printable characters, "
                                        "with no whitespace at either end")
        return cls(msg_id, timestamp, signature)


class WebhookVerifier:
    """Verifies a delivery against one or more secrets (rotation) within a timestamp tolerance.

    ``secrets``: one secret, or several while rotating (any of them verifies), each ``whsec_`` + standard
    base64 (the prefix optional); one with other characters (URL-safe ``-``/``_``, spaces) is a
    :class:`~clerk_sync.errors.ConfigError`, not a different key used in silence.
    ``tolerance_s``: how far ``svix-timestamp`` may be from ``now()`` either way, compared as Svix does (with
    ``floor(now)``: a delivery exactly ``tolerance_s`` old passes, one a second older does not); 1 s to one
    day (see ``config._tolerance_problem``)."""

    def __init__(
        self,
        secrets: str | SecretStr | Iterable[str | SecretStr],
        *,
        tolerance_s: int = DEFAULT_TOLERANCE_S,
        now: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(secrets, str | SecretStr):  # one secret, not its characters
            secrets = [secrets]
        raw = [s.get_secret_value() if isinstance(s, SecretStr) else s for s in secrets]
        if not raw:
            raise ConfigError("no webhook secret configured (CLERK_WEBHOOK_SIGNING_SECRET)")
        names = [f"Webhook secret #{i}" if len(raw) > 1 else "The webhook secret" for i in range(1, len(raw) + 1)]
        # Webhook(str) would decode leniently (dropping what is not base64): it gets the strictly checked key.
        self._hooks = [Webhook(_webhook_key(s, name=n, fix=_SECRET_HELP)) for s, n in zip(raw, names, strict=True)]
        problem = _tolerance_problem(tolerance_s)
        if problem is not None:
            raise ConfigError(f"WebhookVerifier(tolerance_s={tolerance_s}): {problem}")
        self._tolerance = tolerance_s
        self._now = now

    def verify(self, headers: Mapping[str, str], body: bytes) -> str:
        """Return the message id of an authentic delivery; raise otherwise."""
        signed = SignedHeaders.from_headers(headers)
        moment = self._check_timestamp(signed.timestamp)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise WebhookVerificationError("body is not UTF-8, cannot match a signature") from None
        offered = _offered_signatures(signed.signature)
        for hook in self._hooks:
            expected = base64.b64decode(hook.sign(signed.msg_id, moment, text).split(",", 1)[1])
            if any(hmac.compare_digest(expected, sig) for sig in offered):
                return signed.msg_id
        raise WebhookVerificationError("no matching signature found")

    def _check_timestamp(self, value: str) -> datetime:
        # ASCII digits only, at most 12 (Unix seconds until the year 33658): int() would also take "1_7",
        # " +17", other scripts' digits, and 400 digits whose difference with now overflows a float.
        if not _TIMESTAMP.fullmatch(value):
            raise WebhookVerificationError(f"svix-timestamp {value[:32]!r} is not an integer of seconds")
        seconds = int(value)
        # Whole seconds, as Svix compares (floor of now): with the float now, a delivery exactly tolerance_s
        # old was refused up to a second early, and with a tolerance of 0 every one was.
        drift = seconds - math.floor(self._now())
        if abs(drift) > self._tolerance:
            which = "old" if drift < 0 else "new"
            raise WebhookVerificationError(
                # no drift in seconds: the message is the same for one delivery whenever it is refused
                f"message timestamp too {which}: outside the {self._tolerance} s tolerance: check this host's "
                "clock (NTP), or the tolerance setting (CLERK_SYNC_WEBHOOK_TOLERANCE_S) if it was lowered"
            )
        return datetime.fromtimestamp(seconds, tz=UTC)


_TIMESTAMP = re.compile(r"[0-9]{1,12}")


def _offered_signatures(header: str) -> list[bytes]:
    """``v1,<b64> v1,<b64> v2,...``: keep decodable v1 entries, skip everything else."""
    found = []
    for entry in header.split(" "):
        version, _, sig = entry.partition(",")
        if version != "v1" or not sig:
            continue
        try:
            found.append(base64.b64decode(sig, validate=True))
        except (binascii.Error, ValueError):
            continue
    return found


def sign(secret: str, msg_id: str, timestamp: int, body: bytes | str) -> dict[str, str]:
    """Headers for a delivery signed like Svix does (for tests, benchmarks and tools)."""
    text = body if isinstance(body, str) else body.decode("utf-8")
    key = _webhook_key(secret, name="sign()'s secret", fix=_SECRET_HELP)  # the key a WebhookVerifier would use
    signature = Webhook(key).sign(msg_id, datetime.fromtimestamp(timestamp, tz=UTC), text)
    return {"svix-id": msg_id, "svix-timestamp": str(timestamp), "svix-signature": signature}
