"""Hypothesis round-trips for every packet type, and feeding through the frame buffer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from milterbridge.milter import COMMANDS, REPLIES, Message
from milterbridge.milter.buffer import FrameBuffer

from .strategies import STRATEGIES


@pytest.mark.parametrize("cls", list(STRATEGIES), ids=lambda c: c.__name__)
def test_every_type_round_trips(cls: type[Message]) -> None:
    """decode(encode(m)) == m for random values of every field."""

    @given(STRATEGIES[cls])
    def check(message: Message) -> None:
        frame = message.frame()
        assert int.from_bytes(frame[:4], "big") == len(frame) - 4
        table = COMMANDS if frame[4:5] in COMMANDS and cls in COMMANDS.values() else REPLIES
        assert table[frame[4:5]].from_payload(frame[5:]) == message

    check()


@given(
    st.lists(st.one_of(*STRATEGIES.values()), min_size=1, max_size=8),
    st.lists(st.integers(1, 50), min_size=1, max_size=20),
)
def test_any_split_of_a_stream_yields_the_same_frames(
    messages: list[Message], cuts: list[int]
) -> None:
    """However the byte stream is cut into reads, the same frames come out in order."""
    stream = b"".join(m.frame() for m in messages)
    buffer = FrameBuffer(1 << 20)
    out = []
    pos = 0
    sizes = iter(cuts * (len(stream) // max(1, min(cuts)) + 1))
    while pos < len(stream):
        size = next(sizes)
        buffer.feed(stream[pos : pos + size])
        pos += size
        while (frame := buffer.maybe_extract()) is not None:
            out.append(frame)
    assert out == [(m.code, m.payload()) for m in messages]
    assert len(buffer) == 0
