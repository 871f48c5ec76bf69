"""The session with several scripted milters: merged edits and conflicts, SKIP, PROGRESS, late
joiners, and `enable` deciding who joins and who leaves a message."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import msgspec
import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from milterbridge.config import Expression, ExpressionMatch, MilterFilter
from milterbridge.durations import Duration
from milterbridge.milter import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    Accept,
    AddHeader,
    Body,
    ChangeHeader,
    Command,
    Connection,
    Continue,
    EndOfMessage,
    Mail,
    Message,
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
from tests.fake_upstream import Peer, Script, fake_upstream

from .test_session_faults import MESSAGE, _filter, healthy

Answer = Callable[[Message], Sequence[Reply]]


def scripted(
    answer: Answer, protocol: Protocol = Protocol.NONE, seen: list[str] | None = None
) -> Script:
    """A milter that records what it gets and answers each owed reply with ``answer(message)``."""

    async def script(peer: Peer) -> None:
        await peer.negotiate(protocol)
        while not isinstance(message := await peer.receive(), Quit):
            if seen is not None:
                seen.append(type(message).__name__)
            if peer.codec.awaiting is not None:
                await peer.reply(*answer(message))

    return script


def _continue(_: Message) -> Sequence[Reply]:
    return [Continue()]


async def play(
    filters: list[MilterFilter], commands: Sequence[Command] = MESSAGE
) -> list[tuple[Command, Reply]]:
    """Our codec plays Postfix through one message; returns each reply with its command."""
    mta_stream, session_stream = trio.testing.memory_stream_pair()
    session = MtaSession(session_stream, max_packet=1 << 20, session_id="s", filters=filters)
    mta = MilterStream(mta_stream, Connection(Role.MTA))
    answers: list[tuple[Command, Reply]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        await mta.send(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
        await mta.receive()
        for command in commands:
            await mta.send(command)
            while mta.connection.awaiting is not None:
                reply = await mta.receive()
                assert isinstance(reply, Reply)
                answers.append((command, reply))
        await mta.send(Quit())
        await mta_stream.aclose()
    return answers


def _at_eom(answers: list[tuple[Command, Reply]]) -> list[Reply]:
    return [reply for command, reply in answers if isinstance(command, EndOfMessage)]


def _editor(*edits: Reply) -> Answer:
    return lambda m: [*edits, Continue()] if isinstance(m, EndOfMessage) else [Continue()]


async def test_two_filters_changing_one_header_later_wins(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Both change Subject: the later filter's value goes out once; a conflict is logged."""
    first = _editor(ChangeHeader(1, b"Subject", b"first"), AddHeader(b"X-One", b"1"))
    second = _editor(ChangeHeader(1, b"Subject", b"second"), AddHeader(b"X-Two", b"2"))
    async with (
        fake_upstream(scripted(first)) as one,
        fake_upstream(scripted(second)) as two,
    ):
        with capture_logs() as logs:
            answers = await play([_filter("one", one.port, True), _filter("two", two.port, True)])
    assert _at_eom(answers) == [
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
    skipper = scripted(
        lambda m: [Skip()] if isinstance(m, Body) else [Continue()], protocol=Protocol.SKIP
    )
    no_body = scripted(_continue, protocol=Protocol.NOBODY)
    async with (
        fake_upstream(skipper) as one,
        fake_upstream(no_body) as two,
    ):
        answers = await play([_filter("one", one.port, True), _filter("two", two.port, True)])
    assert [reply for _, reply in answers[-2:]] == [Skip(), Continue()]


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
        config = msgspec.structs.replace(_filter("slow", one.port, True), timeout_data=Duration(20))
        answers = await play([config])
    assert _at_eom(answers) == [Progress(), Progress(), Progress(), Continue()]


async def test_late_joiner_accepting_the_replayed_sender_gets_nothing_more(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """ACCEPT to a replayed MAIL ends its part: the rest is not replayed, the message goes on."""
    seen: list[str] = []
    accepter = scripted(lambda m: [Accept()] if isinstance(m, Mail) else [Continue()], seen=seen)
    async with fake_upstream(accepter) as one:
        config = msgspec.structs.replace(_filter("late", one.port, True), stages=["data"])
        answers = await play([config])
        await one.wait_finished()
    assert seen == ["Connect", "Helo", "Mail"]
    assert answers[-1][1] == Continue()


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
        await play([config], [*MESSAGE[:2], Mail(sender), *MESSAGE[3:]])
        assert one.finished.is_set() is joins


async def test_enable_turning_false_at_a_later_stage_leaves_the_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Joined at MAIL; false at RCPT: the milter is sent ABORT and nothing more of the message."""
    seen: list[str] = []
    async with fake_upstream(scripted(_continue, seen=seen)) as one:
        config = msgspec.structs.replace(
            _filter("domains", one.port, True),
            stages=["mail", "rcpt"],
            enable=Expression(else_="rcpt_domain != 'y.test'"),  # MESSAGE's recipient: b@y.test
        )
        answers = await play([config])
        await one.wait_finished()  # it has read everything the session sent
    replies = [reply for _, reply in answers]
    assert seen == ["Connect", "Helo", "Mail", "Abort"]
    assert replies[-2:] == [Skip(), Continue()]  # no filter takes the body any more
    assert set(replies) == {Continue(), Skip()}
