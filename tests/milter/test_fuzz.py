"""Fuzzing the codec with Hypothesis (the atheris harness in tests/fuzz runs the same target).

Arbitrary bytes fed to a Connection of either role must produce packets, NEED_DATA, CLOSED or a
RemoteProtocolError -- never any other exception, and never more memory than the packet limit.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from milterbridge.milter import ALL_ACTIONS, ALL_PROTOCOL, OptNeg, Role

from .fuzz_target import feed
from .strategies import STRATEGIES

_valid_frames = st.lists(st.one_of(*STRATEGIES.values()), max_size=6).map(
    lambda ms: b"".join(m.frame() for m in ms)
)
_garbage = st.binary(max_size=400)
_mixed = st.lists(_valid_frames | _garbage, max_size=4).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(list(Role)), _mixed, st.integers(1, 64), st.booleans())
def test_arbitrary_bytes_never_crash_the_codec(
    role: Role, data: bytes, step: int, respond: bool
) -> None:
    """Random and half-valid input ends in packets or a RemoteProtocolError, nothing else."""
    feed(role, data, step, respond=respond and role is Role.FILTER)


@settings(max_examples=200, deadline=None)
@given(_mixed, st.integers(1, 64))
def test_arbitrary_replies_after_a_real_offer(data: bytes, step: int) -> None:
    """The MTA side, past its own OPTNEG, survives any reply bytes."""
    feed(Role.MTA, data, step, first=OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
