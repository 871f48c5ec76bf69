"""The state tables: every (state, command) pair, and random sequences with Hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milterbridge.milter import (
    Abort,
    Body,
    Command,
    Connect,
    Continue,
    Data,
    EndOfHeaders,
    EndOfMessage,
    Family,
    Header,
    Helo,
    LocalProtocolError,
    Mail,
    Message,
    Quit,
    QuitNoClose,
    Rcpt,
    Unknown,
)

from .pair import Pair

ANSWERED: list[Command] = [
    Connect(b"h", Family.INET, 25, b"192.0.2.1"),
    Helo(b"h"),
    Mail(b"<a>"),
    Rcpt(b"<b>"),
    Data(),
    Header(b"S", b"v"),
    EndOfHeaders(),
    Body(b"x"),
    EndOfMessage(),
    Unknown(b"XYZ"),
]

# libmilter's table (protocol notes §5.2), written out independently of our implementation:
# state reached by the path -> the answered commands libmilter accepts next.
LIBMILTER: dict[str, set[type[Command]]] = {
    "OPTS": {Connect, Unknown},
    "CONN": {Helo, Mail, Unknown},
    "HELO": {Helo, Mail, Unknown},
    "MAIL": {Rcpt, Unknown},
    "RCPT": {Rcpt, Data, Header, EndOfHeaders, Body, EndOfMessage, Unknown},
    "DATA": {Header, EndOfHeaders},
    "HDRS": {Header, EndOfHeaders},
    "EOHS": {Body, EndOfMessage},
    "BODY": {Body, EndOfMessage},
    "ENDM": {Mail, Unknown, Helo},  # Helo via libmilter's fall back to HELO, no open transaction
}
PATHS: dict[str, list[Command]] = {
    "OPTS": [],
    "CONN": ANSWERED[:1],
    "HELO": ANSWERED[:2],
    "MAIL": ANSWERED[:3],
    "RCPT": ANSWERED[:4],
    "DATA": ANSWERED[:5],
    "HDRS": ANSWERED[:6],
    "EOHS": ANSWERED[:7],
    "BODY": ANSWERED[:8],
    "ENDM": ANSWERED[:9],
}


def _at(state: str) -> Pair:
    pair = Pair()
    pair.negotiate()
    for command in PATHS[state]:
        pair.mta(command)
        pair.filter(Continue())
    return pair


@pytest.mark.parametrize("state", list(LIBMILTER))
@pytest.mark.parametrize("command", ANSWERED, ids=lambda c: type(c).__name__)
def test_answered_commands_follow_libmilters_table(state: str, command: Command) -> None:
    """We send (and accept) exactly the answered commands libmilter accepts in each state."""
    pair = _at(state)
    if type(command) in LIBMILTER[state]:
        assert pair.mta(command) == [command]
    else:
        with pytest.raises(LocalProtocolError):
            pair.mta_side.send(command)


@pytest.mark.parametrize("state", list(LIBMILTER))
def test_abort_and_quit_are_legal_everywhere(state: str) -> None:
    """ABORT, QUIT_NC and QUIT are never answered and may come in any state after OPTNEG."""
    for final in (Abort(), QuitNoClose(), Quit()):
        pair = _at(state)
        assert pair.mta(final) == [final]


_ANY_PACKET = st.sampled_from(
    [*ANSWERED, Abort(), Quit(), QuitNoClose(), Continue()],
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_ANY_PACKET, max_size=25))
def test_random_sequences_either_advance_or_fail_for_good(packets: list[Message]) -> None:
    """For any sequence, each packet is accepted or refused; after a refusal nothing is."""
    pair = _at("OPTS")
    failed = False
    for packet in packets:
        side = pair.filter_side if packet == Continue() else pair.mta_side
        try:
            side.send(packet)
        except LocalProtocolError:
            failed = True
            break
        other = pair.mta_side if side is pair.filter_side else pair.filter_side
        other.receive_data(packet.frame())
        assert other.next_event() == packet
    if failed:
        with pytest.raises(LocalProtocolError):
            side.send(Continue())
