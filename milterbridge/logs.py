"""The only place that configures structlog.

Production output is one JSON object per line on stderr, encoded by a msgspec encoder built once;
``--log-format console`` (or a terminal on stderr) gives structlog's readable renderer instead.
Event names are fixed snake_case strings; data goes in key/value pairs.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import msgspec
import structlog

LogFormat = Literal["json", "console", "auto"]

_json = msgspec.json.Encoder(enc_hook=str)

#: Whether per-packet tracing is wanted (the debug level). The hot paths test this before
#: calling the logger: a filtered debug call still costs a logger bind through structlog's lazy
#: proxy, several times per step -- about a tenth of the bridge's CPU in the profile.
#: True until logging is configured (structlog's defaults, and tests, show everything).
TRACE = True


def _serialize(obj: Any, default: Any = None, **_: Any) -> bytes:
    # JSONRenderer passes json.dumps-style keywords; msgspec's enc_hook covers ``default``.
    return _json.encode(obj)


def configure_logging(level: str = "info", fmt: LogFormat = "auto") -> None:
    """Set up structlog for the process. Safe to call again (tests, config reload)."""
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    global TRACE
    TRACE = numeric <= logging.DEBUG
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors = [
            *shared,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_serialize),
        ]
        factory: Any = structlog.BytesLoggerFactory(sys.stderr.buffer)
    else:
        # Plain tracebacks: with rich or better-exceptions installed, structlog's default would
        # print every frame's local variables -- secrets included.
        console = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
        processors = [*shared, console]
        factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
