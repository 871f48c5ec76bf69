"""The codec fuzz target shared by the Hypothesis test and the atheris harness."""

from __future__ import annotations

from milterbridge.milter import (
    CLOSED,
    NEED_DATA,
    Action,
    Command,
    Connection,
    Continue,
    Event,
    OptNeg,
    Protocol,
    RemoteProtocolError,
    Role,
    answer_offer,
)

MAX_PACKET = 4096


def _answer(connection: Connection, event: Event) -> None:
    """Play a cooperative filter so the fuzzer gets past negotiation into the session."""
    if connection.awaiting is None:
        return
    if isinstance(event, OptNeg):
        connection.send(
            answer_offer(event, actions=Action(0x1FF), protocol=Protocol.SKIP | Protocol.NR_HDR)
        )
    else:
        connection.send(Continue())


def feed(
    role: Role, data: bytes, step: int, first: Command | None = None, respond: bool = False
) -> None:
    """Push ``data`` into a fresh Connection ``step`` bytes at a time, then EOF.

    ``first`` is sent before (an MTA's own offer); ``respond`` answers every command (filter).
    """
    connection = Connection(role, max_packet=MAX_PACKET)
    if first is not None:
        connection.send(first)
    try:
        for pos in range(0, len(data), step):
            connection.receive_data(data[pos : pos + step])
            while (event := connection.next_event()) is not NEED_DATA:
                assert event is not CLOSED
                assert connection.buffered <= len(data)
                if respond:
                    _answer(connection, event)
        connection.receive_data(b"")
        while connection.next_event() is not CLOSED:
            pass
    except RemoteProtocolError:
        assert connection.error is not None
