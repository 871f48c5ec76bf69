"""Two milters editing the same message: the session sends one merged script, logs conflicts."""

from __future__ import annotations

import msgspec
import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from milterbridge.config import Expression, ExpressionMatch
from milterbridge.durations import Duration
from milterbridge.milter import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    Accept,
    AddHeader,
    Body,
    ChangeHeader,
    Connection,
    Continue,
    EndOfMessage,
    Mail,
    OptNeg,
    Progress,
    Protocol,
    Quit,
    Reply,
    Role,
    Skip,
)
from milterbridge.server.session import MtaSession
from milterbridge.transport import MilterStream
from tests.fake_upstream import Peer, fake_upstream

from .test_session_faults import MESSAGE, _filter, healthy


def editor(*edits: Reply) -> object:
    async def script(peer: Peer) -> None:
        await peer.negotiate()
        while True:
            message = await peer.receive()
            if isinstance(message, Quit):
                return
            if isinstance(message, EndOfMessage):
                await peer.reply(*edits, Continue())
            elif peer.codec.awaiting is not None:
                await peer.reply(Continue())

    return script


async def test_two_filters_changing_one_header_later_wins(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Both change Subject: the later filter's value goes out once; a conflict is logged."""
    first = editor(ChangeHeader(1, b"Subject", b"first"), AddHeader(b"X-One", b"1"))
    second = editor(ChangeHeader(1, b"Subject", b"second"), AddHeader(b"X-Two", b"2"))
    async with fake_upstream(first) as one, fake_upstream(second) as two:  # type: ignore[arg-type]
        filters = [_filter("one", one.port, True), _filter("two", two.port, True)]
        mta_stream, session_stream = trio.testing.memory_stream_pair()
        session = MtaSession(session_stream, max_packet=1 << 20, session_id="s", filters=filters)
        mta = MilterStream(mta_stream, Connection(Role.MTA))
        eom_replies: list[Reply] = []
        with capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.run)
                await mta.send(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
                await mta.receive()
                for command in MESSAGE:
                    await mta.send(command)
                    while mta.connection.awaiting is not None:
                        reply = await mta.receive()
                        assert isinstance(reply, Reply)
                        if isinstance(command, EndOfMessage):
                            eom_replies.append(reply)
                await mta.send(Quit())
                await mta_stream.aclose()
    assert eom_replies == [
        ChangeHeader(1, b"Subject", b"second"),
        AddHeader(b"X-One", b"1"),
        AddHeader(b"X-Two", b"2"),
        Continue(),
    ]
    (conflict,) = [line for line in logs if line["event"] == "merge_conflict"]
    assert conflict["kind"] == "header"
    assert conflict["winner"] == "two"
    assert conflict["header"] == "Subject"


async def test_skip_reaches_the_mta_when_no_filter_wants_more_body(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One filter skips, the other declined the body: the MTA is told to skip at once."""

    async def skipper(peer: Peer) -> None:
        await peer.negotiate(Protocol.SKIP)
        while not isinstance(message := await peer.receive(), Quit):
            if peer.codec.awaiting is not None:
                await peer.reply(Skip() if isinstance(message, Body) else Continue())

    async def no_body(peer: Peer) -> None:
        await peer.negotiate(Protocol.NOBODY)
        while not isinstance(await peer.receive(), Quit):
            if peer.codec.awaiting is not None:
                await peer.reply(Continue())

    async with fake_upstream(skipper) as one, fake_upstream(no_body) as two:
        filters = [_filter("one", one.port, True), _filter("two", two.port, True)]
        mta_stream, session_stream = trio.testing.memory_stream_pair()
        session = MtaSession(session_stream, max_packet=1 << 20, session_id="s", filters=filters)
        mta = MilterStream(mta_stream, Connection(Role.MTA))
        answers: list[Reply] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            await mta.send(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
            await mta.receive()
            for command in MESSAGE:
                await mta.send(command)
                while mta.connection.awaiting is not None:
                    reply = await mta.receive()
                    assert isinstance(reply, Reply)
                    answers.append(reply)
            await mta.send(Quit())
            await mta_stream.aclose()
    assert answers[-2:] == [Skip(), Continue()]


async def test_progress_keeps_the_mta_waiting_at_end_of_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A filter thinking for 10 s at end-of-message: the MTA hears PROGRESS every 3 s."""

    async def slow(peer: Peer) -> None:
        await peer.negotiate()
        while not isinstance(message := await peer.receive(), Quit):
            if isinstance(message, EndOfMessage):
                await trio.sleep(10)
            if peer.codec.awaiting is not None:
                await peer.reply(Continue())

    async with fake_upstream(slow) as one:
        filters = [
            msgspec.structs.replace(_filter("slow", one.port, True), timeout_data=Duration(20))
        ]
        mta_stream, session_stream = trio.testing.memory_stream_pair()
        session = MtaSession(session_stream, max_packet=1 << 20, session_id="s", filters=filters)
        mta = MilterStream(mta_stream, Connection(Role.MTA))
        eom: list[Reply] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            await mta.send(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
            await mta.receive()
            for command in MESSAGE:
                await mta.send(command)
                while mta.connection.awaiting is not None:
                    reply = await mta.receive()
                    assert isinstance(reply, Reply)
                    if isinstance(command, EndOfMessage):
                        eom.append(reply)
            await mta.send(Quit())
            await mta_stream.aclose()
    assert eom == [Progress(), Progress(), Progress(), Continue()]


async def test_late_joiner_accepting_the_replayed_sender_gets_nothing_more(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """ACCEPT to a replayed MAIL ends its part: the rest is not replayed, the message goes on."""
    seen: list[str] = []

    async def accepter(peer: Peer) -> None:
        await peer.negotiate()
        while not isinstance(message := await peer.receive(), Quit):
            seen.append(type(message).__name__)
            if peer.codec.awaiting is not None:
                await peer.reply(Accept() if isinstance(message, Mail) else Continue())

    async with fake_upstream(accepter) as one:
        config = msgspec.structs.replace(_filter("late", one.port, True), stages=["data"])
        mta_stream, session_stream = trio.testing.memory_stream_pair()
        session = MtaSession(session_stream, max_packet=1 << 20, session_id="s", filters=[config])
        mta = MilterStream(mta_stream, Connection(Role.MTA))
        answers: list[Reply] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            await mta.send(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
            await mta.receive()
            for command in MESSAGE:
                await mta.send(command)
                while mta.connection.awaiting is not None:
                    reply = await mta.receive()
                    assert isinstance(reply, Reply)
                    answers.append(reply)
            await mta.send(Quit())
            await mta_stream.aclose()
    assert seen == ["Connect", "Helo", "Mail"]
    assert answers[-1] == Continue()


@pytest.mark.parametrize(("sender", "joins"), [(b"<a@x.test>", True), (b"<a@other.test>", False)])
async def test_enable_expression_decides_whether_a_filter_joins(
    sender: bytes, joins: bool, autojump_clock: trio.testing.MockClock
) -> None:
    """A filter enabled only for one sender domain is contacted only for that sender."""
    async with fake_upstream(healthy) as one:
        config = msgspec.structs.replace(
            _filter("picky", one.port, True),
            stages=["mail"],
            enable=Expression(
                else_="false", match=[ExpressionMatch(if_="sender_domain == 'x.test'", then="true")]
            ),
        )
        mta_stream, session_stream = trio.testing.memory_stream_pair()
        session = MtaSession(session_stream, max_packet=1 << 20, session_id="s", filters=[config])
        mta = MilterStream(mta_stream, Connection(Role.MTA))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            await mta.send(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
            await mta.receive()
            for command in [*MESSAGE[:2], Mail(sender), *MESSAGE[3:]]:
                await mta.send(command)
                while mta.connection.awaiting is not None:
                    await mta.receive()
            await mta.send(Quit())
            await mta_stream.aclose()
        assert one.finished.is_set() is joins


async def test_enable_turning_false_at_a_later_stage_leaves_the_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Joined at MAIL; false at RCPT: the milter is sent ABORT and nothing more of the message."""
    seen: list[str] = []

    async def recorder(peer: Peer) -> None:
        await peer.negotiate()
        while not isinstance(message := await peer.receive(), Quit):
            seen.append(type(message).__name__)
            if peer.codec.awaiting is not None:
                await peer.reply(Continue())

    async with fake_upstream(recorder) as one:
        config = msgspec.structs.replace(
            _filter("domains", one.port, True),
            stages=["mail", "rcpt"],
            enable=Expression(else_="rcpt_domain != 'y.test'"),
        )
        mta_stream, session_stream = trio.testing.memory_stream_pair()
        session = MtaSession(session_stream, max_packet=1 << 20, session_id="s", filters=[config])
        mta = MilterStream(mta_stream, Connection(Role.MTA))
        answers: list[Reply] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            await mta.send(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
            await mta.receive()
            for command in MESSAGE:  # its recipient is <b@y.test>
                await mta.send(command)
                while mta.connection.awaiting is not None:
                    reply = await mta.receive()
                    assert isinstance(reply, Reply)
                    answers.append(reply)
            await mta.send(Quit())
            await mta_stream.aclose()
    assert seen == ["Connect", "Helo", "Mail", "Abort"]
    assert answers[-2:] == [Skip(), Continue()]  # no filter takes the body any more
    assert set(answers) == {Continue(), Skip()}
