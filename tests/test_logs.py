"""Log configuration choices that protect secrets."""

from __future__ import annotations

import structlog

from milterbridge.logs import configure_logging


def test_console_tracebacks_never_show_local_variables() -> None:
    """With rich installed, structlog's default console renderer prints each frame's locals
    (a revealed secret among them); ours always renders a plain traceback."""
    saved = structlog.get_config()
    try:
        configure_logging("info", "console")
        renderers = [
            p
            for p in structlog.get_config()["processors"]
            if isinstance(p, structlog.dev.ConsoleRenderer)
        ]
        assert len(renderers) == 1
        assert renderers[0]._exception_formatter is structlog.dev.plain_traceback
    finally:
        structlog.configure(**saved)
