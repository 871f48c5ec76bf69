"""The body of the message in flight, kept for the filters that need all of it at once.

A hook's ``data`` call carries the whole body, and the MTA sends it in chunks long before
end-of-message, so the session keeps it -- in memory up to ``memory_limit`` bytes, then in an
anonymous temporary file, so a 50 MB message does not cost 50 MB of RAM per session (design §4).
Nothing is kept when no filter needs it: the session only writes here when one does.

Writes past the memory limit go to the file synchronously. That is a deliberate exception to
"all I/O through trio": a 64 KiB write lands in the page cache in microseconds, far less than
handing it to a worker thread would cost, and the file is unlinked from the start, so nothing is
left behind however the session ends.
"""

from __future__ import annotations

import tempfile
from typing import BinaryIO


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
        self._open().write(chunk)
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
            self._file.close()
            self._file = None
        self.size = 0
