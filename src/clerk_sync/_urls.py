"""URLs: a connection URL as it may be shown (messages, logs, ``repr(settings)``), its credentials masked; the
origin of an http(s) URL, as browsers compare them (:func:`origin`).

The masking is written by hand: SQLAlchemy's ``render_as_string(hide_password=True)`` masks only what its own
parser finds (not a password holding an unencoded ``/``, ``?`` or ``#``, not ``?ssl_password=``), and Redis URLs
are not SQLAlchemy's to parse."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

__all__ = ["masked_url", "origin"]

_DEFAULT_PORTS = {"http": 80, "https": 443}

# The value of a query parameter naming a password or another secret, to the next '&': ?password=,
# &ssl_password=, ?passwd= (what mysqlclient and PyMySQL take), ?pwd=, ?passphrase=, a token's or a secret's;
# not ?passfile= (libpq's path to a password file, shown: which file was read is what to check).
_PASSWORD_PARAM = re.compile(r"[?&](?!passfile=)[^=&?#]*(?:pass|pwd|secret|token)[^=&?#]*=([^&]*)", re.IGNORECASE)


def masked_url(url: str) -> str:
    """``url`` with the user part read as ``***``, as is every query parameter naming a password
    (``password``, ``passwd``, ``pwd``) or a secret or token. The user part
    is all up to the URL's last ``@``, so a password holding an unencoded ``/``, ``?``, ``#`` or ``@`` (which
    ends urllib's netloc early) is masked whole too."""
    start = url.find("://") + 3 if "://" in url else 0
    at = url.rfind("@")
    spans = [(start, at)] if at >= start else []
    spans += [match.span(1) for match in _PASSWORD_PARAM.finditer(url)]
    shown: list[str] = []
    end = 0  # url[end:] is still to be shown
    for first, last in sorted(spans):  # overlapping spans (an '@' inside a password value) read as one ***
        if first > end or not shown:
            shown += [url[end:first], "***"]
        end = max(end, last)
    return "".join(shown) + url[end:]


def origin(url: str) -> str | None:
    """``scheme://host[:port]`` of an http(s) URL, lower-case and without the default port; None for
    anything else (``Origin: null`` from sandboxed frames and privacy-sensitive contexts included)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), parts.hostname
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    if ":" in host:  # IPv6: urlsplit dropped the brackets
        host = f"[{host}]"
    return f"{scheme}://{host}" if port in (None, _DEFAULT_PORTS[scheme]) else f"{scheme}://{host}:{port}"
