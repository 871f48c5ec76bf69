"""The parts every fault matrix shares (tests only): the MTA, the filters, the expectations.

The MTA is our codec in the MTA role over a stream to the session (a memory stream unless a
cell needs a real socket); it plays one message the way Postfix does and records every packet
the session answers with. Filters are scripted fakes (tests/fake_upstream.py) or a real hook
server (tests/fixtures/hook_server.py). A cell's expectations are written as data: the log lines
(``Line``) and the metric changes (``Delta``, ``Level``) it must produce.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from milterbridge.config import HookFilter, MilterFilter
from milterbridge.durations import Duration
from milterbridge.engine.hook_answer import HookAnswer
from milterbridge.engine.verdicts import Stage
from milterbridge.metrics import Metrics
from milterbridge.milter import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
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
    Progress,
    Quit,
    Rcpt,
    Reply,
    Role,
)
from milterbridge.transport import MilterStream
from milterbridge.upstream.hook_request import HookInput
from tests.fake_upstream import Peer

#: One message, as Postfix sends it when every step is wanted.
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
#: The stage of each command of MESSAGE.
STAGES = ["connect", "helo", "mail", "rcpt", "data", "header", "eoh", "body", "eom"]
#: The id every fault cell gives its session, to find it in each log line.
SESSION_ID = "fault-cell"


def milter_filter(name: str, port: int, temp_fail: bool, **extra: Any) -> MilterFilter:
    """A milter on loopback that joins at connect, with short timeouts (virtual seconds)."""
    settings: dict[str, Any] = {
        "stages": ["connect"],
        "timeout_connect": Duration(2),
        "timeout_command": Duration(3),
        "timeout_data": Duration(5),
    }
    settings.update(extra)
    return MilterFilter(
        name=name, hostname="127.0.0.1", port=port, temp_fail_on_error=temp_fail, **settings
    )


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


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- the MTA ------------------------------------------------------------------------------------


@dataclass
class Answered:
    """Everything the session sent for one command: PROGRESS and edits, then the final reply."""

    stage: str
    replies: list[Reply]

    @property
    def final(self) -> Reply:
        return self.replies[-1]

    @property
    def progress(self) -> int:
        return sum(isinstance(reply, Progress) for reply in self.replies)


class Mta:
    """Postfix's side of one connection to the session: our codec in the MTA role."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.milter = MilterStream(stream, Connection(Role.MTA))

    async def negotiate(self) -> None:
        await self.milter.send(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
        await self.milter.receive()

    async def command(self, command: Command) -> Answered | None:
        """Send one command (unless the session declined its step) and read what is owed."""
        options = self.milter.connection.negotiated
        assert options is not None
        if not options.sends(type(command)):
            return None  # as Postfix does: a step the filter declined is not sent
        await self.milter.send(command)
        replies: list[Reply] = []
        while self.milter.connection.awaiting is not None:
            reply = await self.milter.receive()
            assert isinstance(reply, Reply), reply
            replies.append(reply)
        if not replies:
            return None
        return Answered(Stage.of(type(command)).value, replies)

    async def message(self, commands: Sequence[Command] = MESSAGE) -> list[Answered]:
        """Play ``commands``, stopping after the first answer that is not CONTINUE."""
        answers: list[Answered] = []
        for command in commands:
            answered = await self.command(command)
            if answered is None:
                continue
            answers.append(answered)
            if answered.final != Continue():
                break
        return answers

    async def quit(self) -> None:
        await self.milter.send(Quit())
        await self.stream.aclose()

    async def closed_by_session(self) -> bool:
        """Whether the session closed the connection (rather than sending anything)."""
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return True
        return data == b""


# --- a hook that keeps the body -----------------------------------------------------------------


@dataclass
class SpoolingHook:
    """An in-process hook client for one ``data`` hook that continues: with it the session keeps
    the body (in the spool), so that a cell's spool check has a file to look for."""

    config: HookFilter = field(
        default_factory=lambda: HookFilter(name="spooler", url="http://127.0.0.1:1/hook")
    )
    #: Per data call: how many headers and how many body bytes it was given.
    calls: list[tuple[int, int]] = field(default_factory=list)

    async def call(self, hook: HookFilter, request: HookInput) -> HookAnswer:
        assert hook is self.config
        if request.body is not None:
            self.calls.append((len(request.headers), len(request.body.read())))
        await trio.lowlevel.checkpoint()
        return HookAnswer(Continue(), (), ())


# --- expectations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """A log line the cell must produce exactly once, with these fields among its own."""

    event: str
    fields: Mapping[str, object] = field(default_factory=dict)

    def find(self, logs: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
        matching = [
            line
            for line in logs
            if line["event"] == self.event
            and all(line.get(key) == value for key, value in self.fields.items())
        ]
        assert len(matching) == 1, (self, [line for line in logs if line["event"] == self.event])
        (line,) = matching
        assert line.get("session_id") == SESSION_ID, line  # every line names its session
        return line


@dataclass(frozen=True)
class Delta:
    """A counter (or gauge) series that must move by exactly ``by`` during the cell."""

    metric: str
    labels: Mapping[str, str] = field(default_factory=dict)
    by: float = 1

    def read(self, registry: CollectorRegistry) -> float:
        return registry.get_sample_value(self.metric, dict(self.labels)) or 0.0


@dataclass(frozen=True)
class Level:
    """A gauge series that must read ``value`` after the cell (None: the series must not exist,
    nothing ever set it)."""

    metric: str
    labels: Mapping[str, str]
    value: float | None


def errors(filter_name: str, kind: str) -> Delta:
    return Delta("milterbridge_filter_errors_total", {"filter": filter_name, "kind": kind})


def failed_request(filter_name: str, stage: str) -> Delta:
    labels = {"filter": filter_name, "stage": stage, "verdict": "error"}
    return Delta("milterbridge_filter_requests_total", labels)


def protocol_errors(peer: str, by: float = 1) -> Delta:
    return Delta("milterbridge_protocol_errors_total", {"peer": peer}, by)


def limit_hits(limit: str) -> Delta:
    return Delta("milterbridge_limit_hits_total", {"limit": limit})


def up(filter_name: str, value: float | None) -> Level:
    return Level("milterbridge_filter_up", {"filter": filter_name}, value)


class MetricWatch:
    """A fresh registry for one cell, read before and after."""

    def __init__(self, names: Sequence[str]) -> None:
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry, names, process_metrics=False)
        self.names = names

    def start(self, deltas: Sequence[Delta]) -> list[tuple[Delta, float]]:
        """Each series' value now, for ``check``."""
        return [(delta, delta.read(self.registry)) for delta in deltas]

    def check(self, before: Sequence[tuple[Delta, float]], levels: Sequence[Level] = ()) -> None:
        for delta, value in before:
            assert delta.read(self.registry) - value == delta.by, delta
        for level in levels:
            now = self.registry.get_sample_value(level.metric, dict(level.labels))
            assert now == level.value, level

    def total(self, metric: str, **labels: str) -> float:
        """The sum of every series of ``metric`` whose labels include ``labels``."""
        total = 0.0
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name == metric and labels.items() <= sample.labels.items():
                    total += sample.value
        return total


__all__ = [
    "MESSAGE",
    "SESSION_ID",
    "STAGES",
    "Answered",
    "Delta",
    "Level",
    "Line",
    "MetricWatch",
    "Mta",
    "SpoolingHook",
    "closed_port",
    "errors",
    "failed_request",
    "healthy",
    "limit_hits",
    "milter_filter",
    "protocol_errors",
    "up",
]
