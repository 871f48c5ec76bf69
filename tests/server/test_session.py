"""The MTA-facing pass-through session, driven by our codec playing Postfix over memory streams."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from milterbridge.milter import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    Abort,
    Accept,
    Action,
    Body,
    Command,
    Connect,
    Connection,
    Continue,
    Data,
    EndOfHeaders,
    EndOfMessage,
    Family,
    Header,
    Helo,
    Macro,
    Mail,
    OptNeg,
    OptNegReply,
    Protocol,
    Quit,
    QuitNoClose,
    Rcpt,
    Role,
    Unknown,
    answer_offer,
)
from milterbridge.server.session import MtaSession
from milterbridge.transport import MilterStream

SESSION: list[Command] = [
    OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL),
    Macro(b"C", ((b"j", b"mx.test"),)),
    Connect(b"client.test", Family.INET, 5555, b"192.0.2.9"),
    Macro(b"H"),
    Helo(b"client.test"),
    Macro(b"M", ((b"i", b"Q1"),)),
    Mail(b"<a@x.test>"),
    Rcpt(b"<b@y.test>"),
    Unknown(b"XFOO"),
    Data(),
    Header(b"Subject", b"x"),
    EndOfHeaders(),
    Body(b"a" * 65535),
    Body(b"tail\r\n"),
    EndOfMessage(),
    Abort(),
    Mail(b"<a@x.test>"),
    Rcpt(b"<b@y.test>"),
    Data(),
    EndOfHeaders(),
    EndOfMessage(),
    Abort(),
    QuitNoClose(),
    Connect(b"second.test", Family.UNKNOWN),
    Quit(),
]


async def test_without_filters_the_mta_is_asked_for_nothing() -> None:
    """No filter configured: every step is declined, end-of-message is answered CONTINUE."""
    mta_stream, session_stream = trio.testing.memory_stream_pair()
    mta = MilterStream(mta_stream, Connection(Role.MTA))
    with capture_logs([merge_contextvars]) as logs, trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(MtaSession(session_stream, max_packet=1 << 20, session_id="s1").run)
            await mta.send(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
            reply = await mta.receive()
            assert isinstance(reply, OptNegReply)
            negotiated = mta.connection.negotiated
            assert negotiated is not None
            assert not any(
                negotiated.sends(step)
                for step in (Connect, Helo, Mail, Rcpt, Data, Header, EndOfHeaders, Body, Unknown)
            )
            await mta.send(Macro(b"E"), EndOfMessage())
            assert await mta.receive() == Continue()
            await mta.send(Abort(), Quit())
            await mta_stream.aclose()
    (end,) = [line for line in logs if line["event"] == "session_end"]
    assert end["messages"] == 1
    assert end["outcome"] == "quit"
    assert end["session_id"] == "s1"


def _session_bytes() -> bytes:
    mta = Connection(Role.MTA)
    filter_side = Connection(Role.FILTER)
    out = bytearray()
    for command in SESSION:
        out += mta.send(command)
        filter_side.receive_data(command.frame())
        filter_side.next_event()
        if mta.awaiting is not None:
            if isinstance(command, OptNeg):
                answer = answer_offer(command, actions=Action.NONE, protocol=Protocol.NONE)
            else:
                answer = Accept() if isinstance(command, EndOfMessage) else Continue()
            reply = filter_side.send(answer)
            mta.receive_data(reply)
            mta.next_event()
    return bytes(out)


@pytest.mark.parametrize("fraction", [i / 40 for i in range(40)])
async def test_mta_vanishing_at_any_byte_ends_the_session_cleanly(fraction: float) -> None:
    """Cut the MTA's byte stream anywhere: the session returns, logs once, leaves nothing."""
    data = _session_bytes()
    cut = int(len(data) * fraction)
    mta_stream, session_stream = trio.testing.memory_stream_pair()
    with capture_logs() as logs, trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(MtaSession(session_stream, max_packet=1 << 20, session_id="s").run)
            await mta_stream.send_all(data[:cut])
            await mta_stream.aclose()
    ends = [line for line in logs if line["event"] == "session_end"]
    assert len(ends) == 1
    assert ends[0]["outcome"] in ("closed", "protocol_error", "connection_lost")


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\x00\x00\x00\x01Z", "unknown command letter"),
        (b"\xff\xff\xff\xff", "exceeds the limit"),
        (Connect(b"h").frame(), "before OPTNEG"),
    ],
)
async def test_garbage_from_the_mta_ends_the_session_with_a_logged_error(
    data: bytes, fragment: str
) -> None:
    """A bad packet from the MTA is a protocol error with a clear log line, not a crash."""
    mta_stream, session_stream = trio.testing.memory_stream_pair()
    with capture_logs() as logs, trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(MtaSession(session_stream, max_packet=1 << 20, session_id="s").run)
            await mta_stream.send_all(data)
    (end,) = [line for line in logs if line["event"] == "session_end"]
    assert end["outcome"] == "protocol_error"
    assert fragment in end["error"]
