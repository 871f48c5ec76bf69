"""The fault matrix of the MTA side: the MTA vanishes, breaks the protocol, oversteps a limit,
falls silent, or aborts message after message.

One row per fault (README "When something breaks"). Each cell runs one session with two healthy
upstream milters joined at connect (scripted fakes that count the ABORTs they get and, at
end-of-message, add a header saying how many) and an in-process data hook, so that the body goes
to the spool (memory limit 1 byte). The MTA -- our codec in the MTA role, over a memory stream
or, where a TCP reset is the fault, a loopback socket -- negotiates and then does what the row
says. Time is virtual (autojump_clock).

Every cell asserts what the MTA got, the ``session_end`` outcome and the row's other log lines
(each with the session id), the metrics that must move and by how much, that both upstream
milters saw their connection closed, and that nothing is left behind (tests/faults/leaks.py).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from milterbridge.milter import (
    Abort,
    AddHeader,
    Command,
    Continue,
    EndOfMessage,
    Header,
    Message,
    Quit,
    Reply,
)
from milterbridge.server.session import MtaSession
from tests.fake_upstream import FakeUpstream, Peer, Script, fake_upstream

from .harness import (
    MESSAGE,
    SESSION_ID,
    Answered,
    Delta,
    Line,
    MetricWatch,
    Mta,
    SpoolingHook,
    limit_hits,
    milter_filter,
    protocol_errors,
)
from .leaks import LeakCheck, files_under, live_tasks

ONE, TWO = "one", "two"
#: The session's maxMtaPacket in these cells.
MAX_PACKET = 4096
#: The session's idleTimeout in these cells (virtual seconds).
IDLE_TIMEOUT = 30.0
#: Storm cycles: in each, the MTA aborts a message after every step from MAIL to the body chunk,
#: then once more after a MAIL alone.
STORM_CYCLES = 30
#: Where the MTA aborts: after MESSAGE[2:end] -- MAIL, then up to RCPT, ... up to the body chunk.
ABORT_POINTS = range(3, 9)
STORM_ABORTS = STORM_CYCLES * (len(ABORT_POINTS) + 1)


# --- the upstream milters -----------------------------------------------------------------------


def counting(name: str, seen: list[type[Message]]) -> Script:
    """A healthy milter that records every command; at end-of-message it adds ``X-<name>``
    holding how many ABORTs it has had on this connection."""

    async def script(peer: Peer) -> None:
        await peer.negotiate()
        aborts = 0
        while True:
            message = await peer.receive()
            seen.append(type(message))
            if isinstance(message, Quit):
                return
            if isinstance(message, Abort):
                aborts += 1
            elif isinstance(message, EndOfMessage):
                header = AddHeader(f"X-{name}".encode(), str(aborts).encode())
                await peer.reply(header, Continue())
            elif peer.codec.awaiting is not None:
                await peer.reply(Continue())

    return script


def thinking(name: str, seen: list[type[Message]]) -> Script:
    """A healthy milter that never answers END-OF-MESSAGE (it waits for the close instead)."""

    async def script(peer: Peer) -> None:
        await peer.negotiate()
        while True:
            message = await peer.receive()
            seen.append(type(message))
            if isinstance(message, EndOfMessage):
                return  # fake_upstream's handler then reads until the bridge closes
            if peer.codec.awaiting is not None:
                await peer.reply(Continue())

    return script


# --- what the MTA does --------------------------------------------------------------------------


@dataclass
class Scene:
    """What an MTA act can use: its codec, the socket under it (TCP cells), the spool."""

    mta: Mta
    spool: Path
    socket: trio.SocketStream | None = None
    #: Samples taken during a storm: (live tasks, open spool files) after each cycle's MAIL.
    samples: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Played:
    answers: list[Answered]
    #: The session closed the connection on the MTA (rather than the MTA going away).
    closed_by_session: bool = False


Act = Callable[[Scene], Awaitable[Played]]


async def steps(scene: Scene, commands: list[Command]) -> list[Answered]:
    answers = []
    for command in commands:
        answered = await scene.mta.command(command)
        if answered is not None:
            answers.append(answered)
    return answers


def vanish_after(count: int) -> Act:
    """Play the first ``count`` commands, then close the connection without QUIT."""

    async def act(scene: Scene) -> Played:
        answers = await steps(scene, MESSAGE[:count])
        await scene.mta.stream.aclose()
        return Played(answers)

    return act


def reset_after(count: int) -> Act:
    """Play the first ``count`` commands, then reset the TCP connection (SO_LINGER 0)."""

    async def act(scene: Scene) -> Played:
        answers = await steps(scene, MESSAGE[:count])
        assert scene.socket is not None
        scene.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await scene.socket.aclose()
        return Played(answers)

    return act


def cut_mid_packet(count: int) -> Act:
    """Play the first ``count`` commands, then send half of the next one and close."""

    async def act(scene: Scene) -> Played:
        answers = await steps(scene, MESSAGE[:count])
        frame = MESSAGE[count].frame()
        await scene.mta.stream.send_all(frame[: len(frame) // 2])
        await scene.mta.stream.aclose()
        return Played(answers)

    return act


async def vanish_at_end_of_message(scene: Scene) -> Played:
    """Play the message up to END-OF-MESSAGE, send it, and close while the milters think."""
    answers = await steps(scene, MESSAGE[:-1])
    await scene.mta.milter.send(EndOfMessage())
    await scene.mta.stream.aclose()
    return Played(answers)


def then_send(count: int, data: bytes) -> Act:
    """Play the first ``count`` commands, then send ``data`` and wait to be dropped."""

    async def act(scene: Scene) -> Played:
        answers = await steps(scene, MESSAGE[:count])
        await scene.mta.stream.send_all(data)
        return Played(answers, await scene.mta.closed_by_session())

    return act


def fall_silent_after(count: int) -> Act:
    """Play the first ``count`` commands, then say nothing until dropped."""

    async def act(scene: Scene) -> Played:
        answers = await steps(scene, MESSAGE[:count])
        started = trio.current_time()
        closed = await scene.mta.closed_by_session()
        assert trio.current_time() - started == pytest.approx(IDLE_TIMEOUT)
        return Played(answers, closed)

    return act


async def abort_storm(scene: Scene) -> Played:
    """Abort after every step of a message, cycle after cycle; then one whole message and QUIT.

    Each cycle ends with MAIL, whose answer shows the session has handled the ABORT before it:
    the tasks and open spool files are sampled then, and that message is aborted too.
    """
    await steps(scene, MESSAGE[:2])  # CONNECT, HELO
    for _ in range(STORM_CYCLES):
        for end in ABORT_POINTS:
            await steps(scene, [*MESSAGE[2:end], Abort()])
        await steps(scene, [MESSAGE[2]])
        scene.samples.append((len(live_tasks()), len(files_under(scene.spool))))
        await steps(scene, [Abort()])
    answers = await steps(scene, MESSAGE[2:])
    await scene.mta.quit()
    return Played(answers)


# --- the matrix ---------------------------------------------------------------------------------


def continues(*stages: str) -> tuple[tuple[str, tuple[Reply, ...]], ...]:
    return tuple((stage, (Continue(),)) for stage in stages)


@dataclass(frozen=True)
class Cell:
    """One fault of the MTA and what it must lead to.

    ``replies`` is every packet the MTA gets per step, from its last MAIL (or from CONNECT);
    ``outcome`` the ``session_end`` outcome; ``lines`` the other lines it must log, once each;
    ``changes`` the metric series that must move.
    """

    act: Act
    replies: tuple[tuple[str, tuple[Reply, ...]], ...]
    outcome: str
    lines: tuple[Line, ...] = ()
    changes: tuple[Delta, ...] = ()
    closed_by_session: bool = False
    transport: str = "memory"  # or "tcp": a loopback socket pair
    #: ABORTs each upstream milter must have received.
    aborts: int = 0
    #: The verdict ``messages_total`` counts, if the cell finishes a message.
    verdict: str | None = None
    #: The data hook's calls: (headers, body bytes) it was given for each finished message.
    data_calls: tuple[tuple[int, int], ...] = ()
    #: The upstream milters' script, from their name and the list to record commands in.
    upstream: Callable[[str, list[type[Message]]], Script] = counting


ABORTED = Line("message_end", {"verdict": "aborted"})
GARBAGE = b"\x00\x00\x00\x01Z"

CELLS: dict[str, Cell] = {
    "vanishes_mid_header": Cell(
        vanish_after(6),
        continues("connect", "helo", "mail", "rcpt", "data", "header"),
        "closed",
        (ABORTED,),
    ),
    "vanishes_mid_body": Cell(
        vanish_after(8),
        continues("connect", "helo", "mail", "rcpt", "data", "header", "eoh", "body"),
        "closed",
        (ABORTED, Line("limit_hit", {"limit": "spool_memory"})),
    ),
    "connection_reset_mid_body": Cell(
        reset_after(8),
        continues("connect", "helo", "mail", "rcpt", "data", "header", "eoh", "body"),
        "connection_lost",
        (ABORTED,),
        transport="tcp",
    ),
    "vanishes_mid_packet": Cell(
        cut_mid_packet(5),
        continues("connect", "helo", "mail", "rcpt", "data"),
        "connection_lost",
        (ABORTED,),
    ),
    "vanishes_while_end_of_message_waits": Cell(
        vanish_at_end_of_message,
        continues("connect", "helo", "mail", "rcpt", "data", "header", "eoh", "body"),
        "connection_lost",
        (ABORTED,),
        upstream=thinking,
        data_calls=((1, len(b"body\r\n")),),  # the hook was asked before the MTA left
    ),
    "sends_garbage": Cell(
        then_send(5, GARBAGE),
        continues("connect", "helo", "mail", "rcpt", "data"),
        "protocol_error",
        (ABORTED,),
        (protocol_errors("mta"),),
        closed_by_session=True,
    ),
    "packet_over_max_mta_packet": Cell(
        then_send(6, Header(b"X-Big", b"x" * MAX_PACKET).frame()),
        continues("connect", "helo", "mail", "rcpt", "data", "header"),
        "protocol_error",
        (ABORTED, Line("limit_hit", {"limit": "max_mta_packet"})),
        (protocol_errors("mta"), limit_hits("max_mta_packet")),
        closed_by_session=True,
    ),
    "idles_past_idle_timeout": Cell(
        fall_silent_after(4),
        continues("connect", "helo", "mail", "rcpt"),
        "idle_timeout",
        (ABORTED, Line("limit_hit", {"limit": "idle_timeout", "seconds": IDLE_TIMEOUT})),
        (limit_hits("idle_timeout"),),
        closed_by_session=True,
    ),
    "abort_storm": Cell(
        abort_storm,
        (
            *continues("mail", "rcpt", "data", "header", "eoh", "body"),
            (
                "eom",
                (
                    AddHeader(b"X-one", str(STORM_ABORTS).encode()),
                    AddHeader(b"X-two", str(STORM_ABORTS).encode()),
                    Continue(),
                ),
            ),
        ),
        "quit",
        (Line("message_end", {"verdict": "accept"}),),
        aborts=STORM_ABORTS,
        verdict="accept",
        data_calls=((1, len(b"body\r\n")),),  # the last message's own header and body only
    ),
}


# --- one cell -----------------------------------------------------------------------------------


async def stream_pair(transport: str) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """(the MTA's end, the session's end)."""
    if transport == "memory":
        return trio.testing.memory_stream_pair()
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        mta_end = await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1])
        return mta_end, await listener.accept()


async def play(
    cell: Cell, watch: MetricWatch, upstreams: list[FakeUpstream], leaks: LeakCheck
) -> tuple[Played, Scene, list[MutableMapping[str, Any]]]:
    """Run the session; check its leaks as soon as it has returned (while it still exists, so
    that nothing it forgot to close is closed by the garbage collector first)."""
    hook = SpoolingHook()
    filters = [
        milter_filter(ONE, upstreams[0].port, True),
        milter_filter(TWO, upstreams[1].port, True),
    ]
    mta_end, session_end = await stream_pair(cell.transport)
    session = MtaSession(
        session_end,
        max_packet=MAX_PACKET,
        session_id=SESSION_ID,
        filters=filters,
        hooks=[hook.config],
        hook_client=hook,
        metrics=watch.metrics,
        spool_memory=1,
        spool_directory=str(leaks.spool),
        idle_timeout=IDLE_TIMEOUT,
    )
    scene = Scene(
        Mta(mta_end), leaks.spool, mta_end if isinstance(mta_end, trio.SocketStream) else None
    )
    with capture_logs([merge_contextvars]) as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            await scene.mta.negotiate()
            played = await cell.act(scene)
            await trio.aclose_forcefully(scene.mta.stream)
    leaks.session_ended([upstream.port for upstream in upstreams])
    assert hook.calls == list(cell.data_calls)
    return played, scene, logs


@pytest.mark.parametrize("name", list(CELLS))
async def test_mta_fault(name: str, tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    cell = CELLS[name]
    leaks = LeakCheck(tmp_path / "spool")
    watch = MetricWatch([ONE, TWO, SpoolingHook().config.name])
    before = watch.start(
        (
            *cell.changes,
            Delta("milterbridge_sessions_total"),
            Delta("milterbridge_sessions_active", by=0),
        )
    )
    seen: dict[str, list[type[Message]]] = {ONE: [], TWO: []}
    with trio.fail_after(600):
        async with (
            fake_upstream(cell.upstream(ONE, seen[ONE])) as one,
            fake_upstream(cell.upstream(TWO, seen[TWO])) as two,
        ):
            played, scene, logs = await play(cell, watch, [one, two], leaks)
            for upstream in (one, two):
                await upstream.wait_finished()
                assert upstream.saw_eof

    # What the MTA got.
    tail = played.answers[-len(cell.replies) :]
    assert [(answer.stage, tuple(answer.replies)) for answer in tail] == list(cell.replies)
    assert played.closed_by_session == cell.closed_by_session

    # The log lines.
    Line("session_end", {"outcome": cell.outcome}).find(logs)
    for line in cell.lines:
        line.find(logs)
    assert not [line for line in logs if line["event"] in ("filter_error", "session_crashed")]

    # The metrics.
    watch.check(before)
    if not any(delta.metric == "milterbridge_protocol_errors_total" for delta in cell.changes):
        assert watch.total("milterbridge_protocol_errors_total") == 0
    spilled = [line for line in logs if line.get("limit") == "spool_memory"]
    limits = [delta for delta in cell.changes if delta.metric == "milterbridge_limit_hits_total"]
    assert watch.total("milterbridge_limit_hits_total") == len(limits) + len(spilled)
    assert watch.total("milterbridge_messages_total") == (cell.verdict is not None)
    if cell.verdict is not None:
        assert watch.total("milterbridge_messages_total", verdict=cell.verdict) == 1

    # The upstream milters: each ABORT reached both, and nothing grew during a storm.
    for name_, commands in seen.items():
        assert commands.count(Abort) == cell.aborts, name_
    if scene.samples:
        tasks, spool_files = zip(*scene.samples, strict=True)
        assert len(set(tasks)) == 1, "the number of tasks changed during the storm"
        assert set(spool_files) == {0}, "a spool file outlived its aborted message"

    leaks.finished()
