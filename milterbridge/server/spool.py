"""The body of the message in flight, kept for the filters that need all of it at once.

A hook's ``data`` call carries the whole body, and the MTA sends it in chunks long before
end-of-message, so the session keeps it -- in memory up to ``memory_limit`` bytes, then in an
anonymous temporary file, so a 50 MB message does not cost 50 MB of RAM per session (design §4).
Nothing is kept when no filter needs it: the session only writes here when one does.

Writes past the memory limit go to the file synchronously. That is a deliberate exception to
"all I/O through trio": a 64 KiB write lands in the page cache in microseconds, far less than
handing it to a worker thread would cost, and the file is unlinked from the start, so nothing is
left behind however the session ends.

A write that fails -- the directory is full, read-only or gone -- raises :class:`SpoolError` at
that write, never later: each write to the file is flushed at once, because a buffered rest
would fail only at the next read or at close, where nobody could answer the MTA for it. The
spool drops the whole body then: a body with a hole in it must never reach a filter.
"""

from __future__ import annotations

import contextlib
import tempfile
from typing import BinaryIO


class SpoolError(Exception):
    """The body could not be kept in ``directory``; the spool is empty again.

    Attributes:
        directory: where the file was (the system's temporary directory when none is set).
        error: the operating system's error (``ENOSPC``, ``EROFS``, ``ENOENT``, ...).
    """

    def __init__(self, directory: str, error: OSError) -> None:
        super().__init__(f"cannot keep the body in {directory}: {error.strerror or error}")
        self.directory = directory
        self.error = error


class MessageSpool:
    """An append-only body buffer, reset for every message."""

    def __init__(self, memory_limit: int, directory: str | None = None) -> None:
        self.memory_limit = memory_limit
        self.directory = directory
        self.size = 0
        self._file: tempfile.SpooledTemporaryFile[bytes] | None = None

    def _open(self) -> tempfile.SpooledTemporaryFile[bytes]:
        if self._file is None:
            # Closed by reset(), which the session calls however it ends.
            self._file = tempfile.SpooledTemporaryFile(  # noqa: SIM115
                max_size=self.memory_limit, mode="w+b", dir=self.directory
            )
        return self._file

    def write(self, chunk: bytes) -> None:
        """Append ``chunk``.

        Raises:
            SpoolError: the file could not be written; everything kept so far is dropped.
        """
        try:
            spooled = self._open()
            spooled.write(chunk)
            if self.on_disk:
                spooled.flush()
        except OSError as exc:
            self.reset()
            raise SpoolError(self.directory or tempfile.gettempdir(), exc) from exc
        self.size += len(chunk)

    @property
    def on_disk(self) -> bool:
        """Whether the body outgrew memory (tests and logs use it)."""
        return self._file is not None and bool(getattr(self._file, "_rolled", False))

    def reader(self) -> BinaryIO:
        """The body so far, as a file positioned at its start."""
        spooled = self._open()
        spooled.seek(0)
        return spooled  # type: ignore[return-value]

    def reset(self) -> None:
        """Forget the body (next message, abort, or the end of the session)."""
        if self._file is not None:
            spooled, self._file = self._file, None
            # Closing flushes: after a failed write the unwritten rest fails again here, and it
            # belongs to a body that is being dropped anyway.
            with contextlib.suppress(OSError):
                spooled.close()
        self.size = 0
