"""Receive buffer: splits a byte stream into (command letter, payload) packets.

Invariants: a length word is checked against the limit as soon as its four bytes arrive, before
any of the payload is buffered, so a garbage length cannot make us hold gigabytes; extraction is
linear in the bytes received (consumed bytes are dropped in bulk, never rescanned), so feeding
one byte at a time costs no more than feeding everything at once.
"""

from __future__ import annotations

import struct

from .constants import LENGTH_BYTES
from .errors import ErrorKind, LocalProtocolError

_U32 = struct.Struct(">I")


class FrameBuffer:
    """Accumulates bytes; ``maybe_extract`` returns one whole packet or None."""

    def __init__(self, max_packet: int) -> None:
        """Args:
        max_packet: largest accepted length word (command byte plus payload).
        """
        if max_packet < 1:
            raise ValueError("max_packet must be at least 1")
        self.max_packet = max_packet
        self._data = bytearray()
        self._start = 0

    def __len__(self) -> int:
        return len(self._data) - self._start

    def feed(self, data: bytes | bytearray) -> None:
        self._data += data

    def maybe_extract(self) -> tuple[bytes, bytes] | None:
        """The next packet as (command letter, payload), or None if it is not complete yet.

        Raises:
            LocalProtocolError: OVERSIZE for a length word of 0 or beyond the limit.
        """
        available = len(self._data) - self._start
        if available < LENGTH_BYTES:
            return None
        (length,) = _U32.unpack_from(self._data, self._start)
        if length == 0:
            raise LocalProtocolError("packet length 0 (no command byte)", ErrorKind.MALFORMED)
        if length > self.max_packet:
            raise LocalProtocolError(
                f"packet length {length} exceeds the limit of {self.max_packet}",
                ErrorKind.OVERSIZE,
            )
        if available < LENGTH_BYTES + length:
            return None
        begin = self._start + LENGTH_BYTES
        code = bytes(self._data[begin : begin + 1])
        payload = bytes(self._data[begin + 1 : begin + length])
        self._start = begin + length
        if self._start == len(self._data):
            self._data.clear()
            self._start = 0
        elif self._start > 65536 and self._start * 2 > len(self._data):
            del self._data[: self._start]
            self._start = 0
        return code, payload
