"""Every failure class of an upstream milter, under both values of tempFailOnError.

The MTA is our codec over a memory stream; the milters are scripted fakes on loopback ports
(one healthy, one failing as the test says); time is virtual (autojump_clock). Each case checks
the reply the MTA gets at the failing stage, the ``filter_error`` log line and its kind, and
that the session ends cleanly with every upstream connection closed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from milterbridge.config import MilterFilter
from milterbridge.durations import Duration
from milterbridge.milter import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    AddHeader,
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
    Mail,
    OptNeg,
    OptNegReply,
    Protocol,
    Quit,
    Rcpt,
    Reply,
    Role,
    Tempfail,
)
from milterbridge.server.session import MtaSession
from milterbridge.transport import MilterStream
from tests.fake_upstream import Peer, fake_upstream

MESSAGE: list[Command] = [
    Connect(b"client.test", Family.INET, 4000, b"192.0.2.1"),
    Helo(b"client.test"),
    Mail(b"<a@x.test>"),
    Rcpt(b"<b@y.test>"),
    Data(),
    Header(b"Subject", b"hi"),
    EndOfHeaders(),
    Body(b"body\r\n"),
    EndOfMessage(),
]
STAGES = ["connect", "helo", "mail", "rcpt", "data", "header", "eoh", "body", "eom"]


async def healthy(peer: Peer) -> None:
    """A filter that wants everything and continues at every step."""
    await peer.negotiate()
    while True:
        try:
            message = await peer.receive()
        except trio.BrokenResourceError:
            return
        if isinstance(message, Quit):
            return
        if peer.codec.awaiting is not None:
            await peer.reply(Continue())


async def answer_until(peer: Peer, stop: type[Command]) -> None:
    """Negotiate and continue until ``stop`` arrives (unanswered)."""
    await peer.negotiate()
    while True:
        message = await peer.receive()
        if isinstance(message, stop):
            return
        if peer.codec.awaiting is not None:
            await peer.reply(Continue())


async def hang_forever(peer: Peer) -> None:
    await trio.sleep_forever()


def _hang_at(stop: type[Command]) -> Callable[[Peer], Awaitable[None]]:
    async def script(peer: Peer) -> None:
        await answer_until(peer, stop)
        await trio.sleep_forever()

    return script


def _close_at(stop: type[Command]) -> Callable[[Peer], Awaitable[None]]:
    async def script(peer: Peer) -> None:
        await answer_until(peer, stop)
        await peer.stream.aclose()

    return script


def _raw_at(stop: type[Command], data: bytes) -> Callable[[Peer], Awaitable[None]]:
    async def script(peer: Peer) -> None:
        await answer_until(peer, stop)
        await peer.raw(data)

    return script


async def not_tls(peer: Peer) -> None:
    """Answers the TLS ClientHello with plain milter bytes."""
    await peer.stream.receive_some(65536)
    await peer.raw(Continue().frame() * 20)


async def bad_version(peer: Peer) -> None:
    await peer.expect(OptNeg)
    await peer.raw(OptNegReply(7, ALL_ACTIONS, Protocol.NONE).frame())


# (failing script, extra filter settings, the stage where it fails, the failure kind)
CASES: dict[str, tuple[Callable[[Peer], Awaitable[None]] | None, dict[str, Any], str, str]] = {
    "refused": (None, {}, "connect", "refused"),
    "connect_timeout": (hang_forever, {}, "connect", "connect_timeout"),
    "tls": (not_tls, {"use_tls": True}, "connect", "tls"),
    "negotiation": (bad_version, {}, "connect", "negotiation"),
    "command_timeout": (_hang_at(Mail), {}, "mail", "command_timeout"),
    "data_timeout": (_hang_at(EndOfMessage), {}, "eom", "data_timeout"),
    "closed": (_close_at(Rcpt), {}, "rcpt", "closed"),
    "garbage": (_raw_at(Helo, b"\x00\x00\x00\x01Z"), {}, "helo", "garbage"),
    "oversize": (_raw_at(Data, b"\x0f\xff\xff\xff"), {}, "data", "oversize"),
    "protocol": (_raw_at(Header, AddHeader(b"X", b"y").frame()), {}, "header", "protocol"),
}


def _filter(name: str, port: int, temp_fail: bool, **extra: Any) -> MilterFilter:
    return MilterFilter(
        name=name,
        hostname="127.0.0.1",
        port=port,
        stages=["connect"],
        temp_fail_on_error=temp_fail,
        timeout_connect=Duration(2),
        timeout_command=Duration(3),
        timeout_data=Duration(5),
        **extra,
    )


async def _play_mta(stream: trio.abc.Stream) -> list[tuple[str, Reply]]:
    """Postfix's side: one message, stopping at the first refusal; returns (stage, reply)."""
    mta = MilterStream(stream, Connection(Role.MTA))
    await mta.send(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
    await mta.receive()
    answers: list[tuple[str, Reply]] = []
    for stage, command in zip(STAGES, MESSAGE, strict=True):
        await mta.send(command)
        while mta.connection.awaiting is not None:
            reply = await mta.receive()
            assert isinstance(reply, Reply)
            if mta.connection.awaiting is None:
                answers.append((stage, reply))
        if answers and answers[-1][1] != Continue():
            break
    await mta.send(Quit())
    await stream.aclose()
    return answers


async def _run(bad_port: int, temp_fail: bool, extra: dict[str, Any], good_port: int) -> Any:
    filters = [
        _filter("good", good_port, True),
        _filter("bad", bad_port, temp_fail, **extra),
    ]
    mta_stream, session_stream = trio.testing.memory_stream_pair()
    session = MtaSession(session_stream, max_packet=1 << 20, session_id="s", filters=filters)
    with capture_logs([merge_contextvars]) as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            answers = await _play_mta(mta_stream)
    return answers, logs


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("temp_fail", [True, False], ids=["tempfail", "skip"])
@pytest.mark.parametrize("case", list(CASES))
async def test_failure_class_and_policy(
    case: str, temp_fail: bool, autojump_clock: trio.testing.MockClock
) -> None:
    """tempFailOnError: the failing stage is tempfailed; otherwise the good filter decides."""
    script, extra, stage, kind = CASES[case]
    async with fake_upstream(healthy) as good:
        if script is None:
            answers, logs = await _run(_closed_port(), temp_fail, extra, good.port)
        else:
            async with fake_upstream(script) as bad:
                answers, logs = await _run(bad.port, temp_fail, extra, good.port)
    replies = dict(answers)
    if temp_fail:
        assert replies[stage] == Tempfail(), answers
        assert list(replies)[-1] == stage
    else:
        assert set(replies.values()) == {Continue()}, answers
        assert list(replies) == STAGES
    (error,) = [line for line in logs if line["event"] == "filter_error"]
    assert error["filter"] == "bad"
    assert error["kind"] == kind
    assert error["session_id"] == "s"
    (end,) = [line for line in logs if line["event"] == "session_end"]
    assert end["outcome"] == "quit"


async def test_every_filter_failing_to_join_closes_the_mta_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """No filter reachable: the MTA connection is dropped so its default action decides."""
    filters = [_filter("a", _closed_port(), True), _filter("b", _closed_port(), False)]
    mta_stream, session_stream = trio.testing.memory_stream_pair()
    session = MtaSession(session_stream, max_packet=1 << 20, session_id="s", filters=filters)
    mta = MilterStream(mta_stream, Connection(Role.MTA))
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            await mta.send(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
            await mta.receive()
            await mta.send(MESSAGE[0])
            with pytest.raises(Exception, match="without answering Connect"):
                await mta.receive()
    (end,) = [line for line in logs if line["event"] == "session_end"]
    assert end["outcome"] == "all_filters_failed"


@pytest.mark.parametrize("cut_after", [1, 3, 5, 7])
async def test_mta_vanishing_mid_message_closes_every_upstream(
    cut_after: int, autojump_clock: trio.testing.MockClock
) -> None:
    """The MTA disappears after some commands: the session ends and both milters see EOF."""
    async with fake_upstream(healthy) as first, fake_upstream(healthy) as second:
        filters = [_filter("one", first.port, True), _filter("two", second.port, False)]
        mta_stream, session_stream = trio.testing.memory_stream_pair()
        session = MtaSession(session_stream, max_packet=1 << 20, session_id="s", filters=filters)
        mta = MilterStream(mta_stream, Connection(Role.MTA))
        with capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.run)
                await mta.send(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
                await mta.receive()
                for command in MESSAGE[:cut_after]:
                    await mta.send(command)
                    while mta.connection.awaiting is not None:
                        await mta.receive()
                await mta_stream.aclose()
        await first.wait_finished()
        await second.wait_finished()
        assert first.saw_eof and second.saw_eof
    (end,) = [line for line in logs if line["event"] == "session_end"]
    assert end["outcome"] == "closed"
