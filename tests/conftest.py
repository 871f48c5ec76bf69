from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog

from milterbridge import logs


@pytest.fixture(autouse=True)
def _clean_log_context() -> Iterator[None]:
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()
    # A test that ran the CLI configured logging onto its captured (now closed) stderr.
    structlog.reset_defaults()
    logs.TRACE = True  # as before any configuration: every level is shown
