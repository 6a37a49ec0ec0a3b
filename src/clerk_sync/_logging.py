"""Structured logging set-up, called once by the CLI (the library never configures logging)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import structlog

__all__ = ["Logfmt", "configure_logging"]


def configure_logging(level: str = "INFO", *, json: bool = False) -> None:
    """Key-value (or JSON) lines on stderr, each with what is bound in ``structlog.contextvars``.

    ``svix_id`` is bound there per delivery only by the Flask and Django webhook views (for the request,
    so the app's own lines during it carry it too). ``serve`` and the Starlette/FastAPI endpoint bind
    nothing: there the delivery's own lines (``webhook``, ``webhook_refused``, ``webhook_store_error``,
    ``apply_crashed``, ``group_commit_isolated``) carry ``svix_id`` as a field of their own, other lines
    (a hook's, the app's) do not.

    Key-value lines are aligned for a person at a terminal, and logfmt (``timestamp=.. level=info
    event=webhook svix_id=..``) anywhere else: a file, journald, a container's log collector. The
    aligned form costs ~30 µs a line (logfmt ~9 µs); the per-delivery line is DEBUG by default (see
    ``ingest.WebhookProcessor``). A traceback is one field of its line (``exception="Traceback ..\\n.."``)
    outside a terminal."""
    renderer: structlog.types.Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
    elif sys.stderr.isatty():
        # A plain traceback: structlog's default (rich, when installed) prints each frame's local variables,
        # which on the apply path hold the event's values (the person's e-mail, metadata).
        renderer = structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
    else:
        renderer = Logfmt(("timestamp", "level", "event"))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # the aligned renderer formats exc_info itself; the others print the traceback as one field
            *([] if isinstance(renderer, structlog.dev.ConsoleRenderer) else [structlog.processors.format_exc_info]),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


class Logfmt:
    """structlog's ``LogfmtRenderer(key_order=.., drop_missing=True, bool_as_flag=False)``, line for line
    (``tests/test_logging.py`` holds them side by side), with each key checked once instead of on every
    line. Its per-character scan of every key was two thirds of the renderer's time, and a log line per
    delivery at the default level cost ~10 % of the service's throughput (BENCHMARKS.md, issue 13)."""

    def __init__(self, key_order: Sequence[str]) -> None:
        self._order = tuple(key_order)
        self._keys: set[str] = set()  # keys already checked

    def __call__(self, _: object, __: str, event_dict: structlog.types.EventDict) -> str:
        items = [(key, value) for key in self._order if (value := event_dict.pop(key, None)) is not None]
        items += event_dict.items()
        out: list[str] = []
        for key, value in items:
            if key not in self._keys:
                if any(c <= " " for c in key):
                    raise ValueError(f'Invalid key: "{key}"')
                if len(self._keys) < 1024:  # keys are names in code; a bound all the same
                    self._keys.add(key)
            if value is None:
                out.append(key + "=")
                continue
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            quote = " " in text or "=" in text or '"' in text
            if quote and "\\" in text:
                text = text.replace("\\", "\\\\")
            if '"' in text:
                text = text.replace('"', '\\"')
            if "\n" in text:
                text = text.replace("\n", "\\n")
            out.append(f'{key}="{text}"' if quote else f"{key}={text}")
        return " ".join(out)
