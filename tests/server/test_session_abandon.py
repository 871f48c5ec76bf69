"""``abandon()``: what the drain deadline does to a session that has not finished."""

from __future__ import annotations

import trio
import trio.testing
from structlog.testing import capture_logs

from milterbridge.milter import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    CLOSED,
    Connection,
    Continue,
    EndOfMessage,
    Message,
    OptNeg,
    Reply,
    Role,
    Tempfail,
)
from milterbridge.server.session import MtaSession
from milterbridge.transport import MilterStream
from tests.fake_upstream import Peer, fake_upstream

from .test_session_faults import MESSAGE, _filter


async def _thinks_forever_at_eom(peer: Peer) -> None:
    await peer.negotiate()
    while True:
        message: Message = await peer.receive()
        if isinstance(message, EndOfMessage):
            await trio.sleep_forever()
        if peer.codec.awaiting is not None:
            await peer.reply(Continue())


async def test_a_step_in_progress_is_answered_tempfail(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with capture_logs() as logs:
        await _abandon_at_end_of_message()
    (end,) = [line for line in logs if line["event"] == "message_end"]
    assert end["verdict"] == "tempfail"  # what the MTA was told, not "aborted"


async def _abandon_at_end_of_message() -> None:
    async with fake_upstream(_thinks_forever_at_eom) as upstream:
        mta_stream, session_stream = trio.testing.memory_stream_pair()
        session = MtaSession(
            session_stream,
            max_packet=1 << 20,
            session_id="s",
            filters=[_filter("slow", upstream.port, True)],
        )
        mta = MilterStream(mta_stream, Connection(Role.MTA))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            await mta.send(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
            await mta.receive()
            for command in MESSAGE[:-1]:
                await mta.send(command)
                while mta.connection.awaiting is not None:
                    await mta.receive()
            await mta.send(EndOfMessage())
            await trio.sleep(4)  # the filter thinks; PROGRESS keeps the MTA waiting
            session.abandon()
            replies: list[Reply] = []
            while (event := await mta.receive()) is not CLOSED:
                assert isinstance(event, Reply)
                replies.append(event)
    assert replies[-1] == Tempfail()
    assert session.stats.outcome == "abandoned"


async def test_an_idle_session_is_closed() -> None:
    mta_stream, session_stream = trio.testing.memory_stream_pair()
    session = MtaSession(session_stream, max_packet=1 << 20, session_id="s")
    mta = MilterStream(mta_stream, Connection(Role.MTA))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        await mta.send(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
        await mta.receive()
        session.abandon()
        assert await mta.receive() is CLOSED
