"""Plays the MTA against a real filter with our codec over a trio stream (tests only)."""

from __future__ import annotations

import trio

from milterbridge.milter import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    CLOSED,
    Command,
    Connection,
    OptNeg,
    Reply,
    Role,
)
from milterbridge.transport import MilterStream


async def open_mta(spec: str) -> MilterStream:
    """Connect to ``inet:HOST:PORT`` or ``unix:PATH`` and wrap it in an MTA-role connection."""
    kind, _, rest = spec.partition(":")
    if kind == "unix":
        stream: trio.abc.Stream = await trio.open_unix_socket(rest)
    else:
        host, _, port = rest.rpartition(":")
        stream = await trio.open_tcp_stream(host, int(port))
    return MilterStream(stream, Connection(Role.MTA))


async def exchange(milter: MilterStream, *commands: Command) -> list[Reply]:
    """Send the commands in one write; return every reply up to the final one (if any is owed)."""
    await milter.send(*commands)
    replies: list[Reply] = []
    while milter.connection.awaiting is not None:
        event = await milter.receive()
        assert event is not CLOSED
        assert isinstance(event, Reply)
        replies.append(event)
    return replies


POSTFIX_OFFER = OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL)
