"""The frame buffer: whole, byte-at-a-time and trailing-garbage feeding; limits."""

from __future__ import annotations

import pytest

from milterbridge.milter import LocalProtocolError
from milterbridge.milter.buffer import FrameBuffer

STREAM = (
    b"\x00\x00\x00\x01c"  # CONTINUE
    b"\x00\x00\x00\x07hX-A\x001\x00"  # ADDHEADER X-A: 1
    b"\x00\x00\x00\x01a"  # ACCEPT
)
EXPECTED = [(b"c", b""), (b"h", b"X-A\x001\x00"), (b"a", b"")]


def _drain(buffer: FrameBuffer) -> list[tuple[bytes, bytes]]:
    out = []
    while (frame := buffer.maybe_extract()) is not None:
        out.append(frame)
    return out


def test_whole_stream_yields_every_packet() -> None:
    """Three packets fed at once come out in order, and the buffer is empty afterwards."""
    buffer = FrameBuffer(100)
    buffer.feed(STREAM)
    assert _drain(buffer) == EXPECTED
    assert len(buffer) == 0


def test_one_byte_at_a_time_yields_the_same_packets() -> None:
    """Feeding single bytes produces exactly the same packets, each as soon as it completes."""
    buffer = FrameBuffer(100)
    out: list[tuple[bytes, bytes]] = []
    for byte in STREAM:
        buffer.feed(bytes([byte]))
        out.extend(_drain(buffer))
    assert out == EXPECTED


def test_trailing_garbage_stays_buffered_until_complete() -> None:
    """An incomplete packet after complete ones is kept, not returned or dropped."""
    buffer = FrameBuffer(100)
    buffer.feed(STREAM + b"\x00\x00\x00\x09y55")
    assert _drain(buffer) == EXPECTED
    assert len(buffer) == 7


def test_oversize_length_is_refused_before_the_payload_arrives() -> None:
    """A length beyond the limit fails on the length word alone, without buffering the body."""
    buffer = FrameBuffer(10)
    buffer.feed(b"\x00\x00\x00\x0b")
    with pytest.raises(LocalProtocolError) as info:
        buffer.maybe_extract()
    assert info.value.kind.value == "oversize"


def test_limit_is_inclusive() -> None:
    """A packet exactly at the limit is accepted."""
    buffer = FrameBuffer(3)
    buffer.feed(b"\x00\x00\x00\x03bxy")
    assert buffer.maybe_extract() == (b"b", b"xy")


def test_zero_length_is_malformed() -> None:
    """A length of 0 leaves no room for the command byte."""
    buffer = FrameBuffer(10)
    buffer.feed(b"\x00\x00\x00\x00")
    with pytest.raises(LocalProtocolError) as info:
        buffer.maybe_extract()
    assert info.value.kind.value == "malformed"


def test_many_small_packets_compact_the_buffer() -> None:
    """After a long run of packets the buffer holds only what is unread."""
    buffer = FrameBuffer(100)
    buffer.feed(b"\x00\x00\x00\x01c" * 50_000)
    assert len(_drain(buffer)) == 50_000
    assert len(buffer) == 0
