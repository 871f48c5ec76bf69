"""``milterbridge bench``: a protocol-level load generator that plays the MTA.

Why it exists: the bridge's cost per message has to be measured without an MTA in the way
(Postfix's own CPU and its one-process-per-session design blur every figure), and against any
milter -- the bridge, or a filter directly, so the difference is the bridge's share. It speaks
the milter protocol through the project's own codec (``Connection(Role.MTA)``, which encodes
every packet and validates the conversation), so whatever the bridge or a filter negotiates,
the generator follows the same rules Postfix does: a step the milter disabled is not sent, a
step it asked not to answer is not waited for, SKIP ends the body, a verdict before
end-of-message ends the message.

Each session is one milter connection, like one SMTP session at Postfix: OPTNEG, CONNECT,
HELO, then ``--per-session`` messages (MAIL, RCPT per recipient, DATA, the headers, EOH, the
body in chunks of at most 65,535 bytes, EOM, then ABORT as Postfix sends it after every
transaction), then QUIT. Macros go where Postfix's default macro lists put them (the connect
list with ``--macro`` values; ``i`` before DATA, every header, EOH, every body chunk and EOM).

Latency is measured per step: from writing the step's packets to reading its final reply
(edits and PROGRESS included). ``open`` is the TCP/Unix connect plus OPTNEG; ``end_to_end`` is
from the start of ``open`` (the first message of a session) or of MAIL (a later one) to the
end-of-message answer, or to the verdict that ended the message earlier. Percentiles are the
nearest-rank values of the collected samples: every sample is kept up to
:data:`SAMPLE_LIMIT` per stage and process; beyond that a uniform reservoir of that size
stands for them (Vitter's algorithm R), and the summary says so.

One process drives the load from one core. ``--processes N`` starts N generator processes
(``python -m milterbridge.bench``) that split the sessions and the messages, wait for each other
after their warm-up, and hand their raw samples back to the parent, which merges them, so the
percentiles stay exact over all processes.
"""

from __future__ import annotations

import argparse
import array
import datetime
import errno
import math
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import msgspec
import trio

from .listeners import InetSpec, ListenerSpecError, parse_listener
from .milter import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    CHUNK_SIZE,
    CLOSED,
    NEED_DATA,
    Abort,
    Accept,
    Body,
    Command,
    Connect,
    Connection,
    Data,
    Discard,
    EndOfHeaders,
    EndOfMessage,
    ErrorKind,
    Event,
    Family,
    Header,
    Helo,
    Macro,
    Mail,
    Message,
    OptNeg,
    OptNegReply,
    Progress,
    ProtocolError,
    Quarantine,
    Quit,
    Rcpt,
    Reject,
    Reply,
    ReplyCode,
    Role,
    Shutdown,
    Skip,
    Tempfail,
)
from .transport import READ_SIZE

#: The steps whose latency is reported, in protocol order.
STAGES = ("open", "connect", "helo", "mail", "rcpt", "data", "header", "eoh", "body", "eom")
#: Samples kept per stage and process before the reservoir takes over (8 MB of floats each).
SAMPLE_LIMIT = 1_000_000
#: Verdicts (what the milter decided) and error kinds (the milter could not be talked to).
VERDICTS = ("accepted", "held", "rejected", "tempfailed", "discarded")
ERROR_KINDS = ("refused", "timeout", "closed", "protocol", "other")
#: Error descriptions kept for the summary (the first ones of each process).
ERROR_SAMPLES = 10

POSTFIX_OFFER = OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL)

EXIT_OK = 0
EXIT_ERRORS = 1
EXIT_USAGE = 2


# --------------------------------------------------------------------------------------------
# What to send
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSettings:
    """One load: where, how many at once, how much, and what each message looks like."""

    target: str
    concurrency: int = 20
    messages: int | None = 1000  # None: run for ``duration`` seconds
    duration: float | None = None
    warmup: int = 0
    headers: int = 10
    body_size: int = 2048
    recipients: int = 1
    per_session: int = 1
    macros: tuple[tuple[bytes, bytes], ...] = ()
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("--concurrency must be at least 1")
        if (self.messages is None) == (self.duration is None):
            raise ValueError("give either --messages or --duration")
        if self.messages is not None and self.messages < 1:
            raise ValueError("--messages must be at least 1")
        if self.duration is not None and not self.duration > 0:
            raise ValueError("--duration must be more than 0")
        for name in ("warmup", "headers", "body_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative")
        if self.recipients < 1 or self.per_session < 1:
            raise ValueError("--recipients and --per-session must be at least 1")
        if not self.timeout > 0:
            raise ValueError("--timeout must be more than 0")


_FIXED_HEADERS = (
    (b"Received", b"from client.test (client.test [192.0.2.1])\n\tby mx.bench.test"),
    (b"From", b"Bench Sender <bench@sender.test>"),
    (b"To", b"<rcpt1@rcpt.test>"),
    (b"Subject", b"milterbridge bench message"),
    (b"Date", b"Sat, 21 Nov 2026 10:00:00 +0000"),
    (b"Message-ID", b"<bench.0001@sender.test>"),
    (b"MIME-Version", b"1.0"),
    (b"Content-Type", b"text/plain; charset=us-ascii"),
)


def make_headers(count: int) -> list[tuple[bytes, bytes]]:
    """``count`` headers as Postfix passes them (no leading space, folds joined by LF)."""
    headers = list(_FIXED_HEADERS[:count])
    for n in range(len(headers), count):
        headers.append((b"X-Bench-%d" % n, b"value of generated header number %d" % n))
    return headers


def make_body(size: int) -> bytes:
    """``size`` bytes of 78-letter lines ending in CRLF (the last one possibly shorter)."""
    line = b"x" * 78 + b"\r\n"
    return (line * (size // len(line) + 1))[:size]


def message_size(headers: Sequence[tuple[bytes, bytes]], body: bytes) -> int:
    """The message's size in RFC 5322 form: ``Name: value`` lines, a blank line, the body."""
    head = sum(len(n) + 2 + len(v.replace(b"\n", b"\r\n")) + 2 for n, v in headers)
    return head + 2 + len(body)


@dataclass(frozen=True)
class _Plan:
    """Every packet of a session built once: the codec encodes them, nothing is rebuilt."""

    connect: tuple[Command, ...]
    helo: tuple[Command, ...]
    mail: tuple[Command, ...]
    rcpts: tuple[tuple[Command, ...], ...]
    data: tuple[Command, ...]
    headers: tuple[tuple[Command, ...], ...]
    eoh: tuple[Command, ...]
    bodies: tuple[tuple[Command, ...], ...]
    eom: tuple[Command, ...]


def _plan(settings: BenchSettings) -> _Plan:
    queue_id = ((b"i", b"BENCH0001"),)
    connect_macros = dict(
        [
            (b"j", b"mx.bench.test"),
            (b"{daemon_name}", b"bench"),
            (b"{daemon_addr}", b"127.0.0.1"),
            (b"v", b"milterbridge bench"),
            (b"_", b"client.test [192.0.2.1]"),
        ]
    )
    connect_macros.update(settings.macros)
    body = make_body(settings.body_size)
    return _Plan(
        connect=(
            Macro(b"C", tuple(connect_macros.items())),
            Connect(b"client.test", Family.INET, 40000, b"192.0.2.1"),
        ),
        helo=(Helo(b"client.test"),),
        mail=(
            Macro(b"M", (*queue_id, (b"{mail_addr}", b"bench@sender.test"))),
            Mail(b"<bench@sender.test>"),
        ),
        rcpts=tuple(
            (
                Macro(b"R", ((b"{rcpt_addr}", b"rcpt%d@rcpt.test" % n),)),
                Rcpt(b"<rcpt%d@rcpt.test>" % n),
            )
            for n in range(1, settings.recipients + 1)
        ),
        data=(Macro(b"T", queue_id), Data()),
        headers=tuple(
            (Macro(b"L", queue_id), Header(name, value))
            for name, value in make_headers(settings.headers)
        ),
        eoh=(Macro(b"N", queue_id), EndOfHeaders()),
        bodies=tuple(
            (Macro(b"B", queue_id), Body(body[pos : pos + CHUNK_SIZE]))
            for pos in range(0, len(body), CHUNK_SIZE)
        ),
        eom=(Macro(b"E", queue_id), EndOfMessage()),
    )


# --------------------------------------------------------------------------------------------
# What was measured
# --------------------------------------------------------------------------------------------


class Samples:
    """Latencies of one stage in seconds: all of them up to ``limit``, then a reservoir."""

    __slots__ = ("_random", "limit", "seen", "values")

    def __init__(self, limit: int = SAMPLE_LIMIT) -> None:
        self.values = array.array("d")
        self.seen = 0
        self.limit = limit
        self._random = random.Random(len(STAGES))

    def add(self, value: float) -> None:
        self.seen += 1
        if len(self.values) < self.limit:
            self.values.append(value)
            return
        slot = self._random.randrange(self.seen)
        if slot < self.limit:
            self.values[slot] = value

    @property
    def exact(self) -> bool:
        return self.seen == len(self.values)


class RawResult(msgspec.Struct, kw_only=True):
    """What one generator process measured, before any percentile: the unit that is merged."""

    started: float  # wall clock (time.time()) at the start of the measured phase
    ended: float
    cpu_seconds: float  # this process's user + system CPU during the measured phase
    attempted: int = 0
    verdicts: dict[str, int] = msgspec.field(default_factory=dict)
    errors: dict[str, int] = msgspec.field(default_factory=dict)
    error_samples: list[str] = msgspec.field(default_factory=list)
    #: stage -> (samples seen, the kept samples as native doubles)
    samples: dict[str, tuple[int, bytes]] = msgspec.field(default_factory=dict)


class StageLatency(msgspec.Struct):
    count: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


class SummarySettings(msgspec.Struct):
    messages: int | None
    duration_s: float | None
    warmup: int
    headers: int
    body_size: int
    message_size: int
    recipients: int
    per_session: int
    timeout_s: float


class Summary(msgspec.Struct):
    """The ``--json`` document."""

    target: str
    date: str
    concurrency: int
    processes: int
    settings: SummarySettings
    elapsed_s: float
    attempted: int
    completed: int  # messages that got a verdict (errors excluded)
    messages_per_second: float
    verdicts: dict[str, int]
    errors: dict[str, int]
    error_total: int
    error_samples: list[str]
    latency_ms: dict[str, StageLatency]
    sampling: str
    generator_cpu_s: float
    generator_cpu_ms_per_message: float | None


def percentile(ordered: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile of an ascending sequence (not interpolated)."""
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def stage_latency(values: Sequence[float]) -> StageLatency:
    ordered = sorted(values)
    return StageLatency(
        count=len(ordered),
        mean_ms=round(sum(ordered) / len(ordered) * 1000, 4),
        p50_ms=round(percentile(ordered, 50) * 1000, 4),
        p95_ms=round(percentile(ordered, 95) * 1000, 4),
        p99_ms=round(percentile(ordered, 99) * 1000, 4),
        max_ms=round(ordered[-1] * 1000, 4),
    )


def summarize(settings: BenchSettings, raws: Sequence[RawResult], processes: int) -> Summary:
    """Merge the processes' raw results into the summary (percentiles over all samples)."""
    elapsed = max(r.ended for r in raws) - min(r.started for r in raws)
    verdicts = dict.fromkeys(VERDICTS, 0)
    errors = dict.fromkeys(ERROR_KINDS, 0)
    latency: dict[str, StageLatency] = {}
    exact = True
    for raw in raws:
        for name, count in raw.verdicts.items():
            verdicts[name] = verdicts.get(name, 0) + count
        for name, count in raw.errors.items():
            errors[name] = errors.get(name, 0) + count
    for stage in (*STAGES, "end_to_end"):
        merged = array.array("d")
        for raw in raws:
            seen, data = raw.samples.get(stage, (0, b""))
            part = array.array("d")
            part.frombytes(data)
            exact = exact and seen == len(part)
            merged.extend(part)
        if merged:
            latency[stage] = stage_latency(merged)
    completed = sum(verdicts.values())
    cpu = sum(r.cpu_seconds for r in raws)
    body = make_body(settings.body_size)
    return Summary(
        target=settings.target,
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        concurrency=settings.concurrency,
        processes=processes,
        settings=SummarySettings(
            messages=settings.messages,
            duration_s=settings.duration,
            warmup=settings.warmup,
            headers=settings.headers,
            body_size=settings.body_size,
            message_size=message_size(make_headers(settings.headers), body),
            recipients=settings.recipients,
            per_session=settings.per_session,
            timeout_s=settings.timeout,
        ),
        elapsed_s=round(elapsed, 4),
        attempted=sum(r.attempted for r in raws),
        completed=completed,
        messages_per_second=round(completed / elapsed, 2) if elapsed > 0 else 0.0,
        verdicts=verdicts,
        errors=errors,
        error_total=sum(errors.values()),
        error_samples=[s for r in raws for s in r.error_samples][:ERROR_SAMPLES],
        latency_ms=latency,
        sampling="exact" if exact else f"uniform reservoir of {SAMPLE_LIMIT} per stage",
        generator_cpu_s=round(cpu, 3),
        generator_cpu_ms_per_message=round(cpu * 1000 / completed, 4) if completed else None,
    )


# --------------------------------------------------------------------------------------------
# Driving the load
# --------------------------------------------------------------------------------------------


class _Failed(Exception):
    """A session could not go on; ``kind`` is one of ERROR_KINDS."""

    def __init__(self, kind: str, stage: str, detail: str) -> None:
        super().__init__(f"{stage}: {kind}: {detail}")
        self.kind = kind
        self.stage = stage


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    if isinstance(exc, ProtocolError):
        return "closed" if exc.kind is ErrorKind.TRUNCATED else "protocol"
    if isinstance(exc, ConnectionRefusedError | FileNotFoundError):
        return "refused"
    if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError | ConnectionError):
        return "closed"
    return "other"


def _verdict_of(reply: Reply) -> str | None:
    """The message's fate if this final reply decides it; None when the message goes on."""
    if isinstance(reply, ReplyCode):
        return "rejected" if reply.text.startswith(b"5") else "tempfailed"
    if isinstance(reply, Reject):
        return "rejected"
    if isinstance(reply, Tempfail | Shutdown):
        return "tempfailed"
    if isinstance(reply, Discard):
        return "discarded"
    if isinstance(reply, Accept):
        return "accepted"
    return None


class _Quota:
    """Hands out message slots: a fixed number, or as many as fit before a deadline."""

    def __init__(self, messages: int | None, duration: float | None) -> None:
        self.left = messages
        self.deadline = None if duration is None else trio.current_time() + duration

    def take(self) -> bool:
        if self.left is not None:
            if self.left <= 0:
                return False
            self.left -= 1
            return True
        assert self.deadline is not None
        return trio.current_time() < self.deadline


class _Tally:
    """Counters and samples of one phase (the warm-up's are thrown away)."""

    def __init__(self) -> None:
        self.attempted = 0
        self.verdicts: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.error_samples: list[str] = []
        self.samples = {stage: Samples() for stage in (*STAGES, "end_to_end")}

    def verdict(self, name: str) -> None:
        self.verdicts[name] = self.verdicts.get(name, 0) + 1

    def error(self, failure: _Failed) -> None:
        self.errors[failure.kind] = self.errors.get(failure.kind, 0) + 1
        if len(self.error_samples) < ERROR_SAMPLES:
            self.error_samples.append(str(failure))

    @property
    def done(self) -> int:
        return sum(self.verdicts.values()) + sum(self.errors.values())


class _Address:
    """Where to connect, resolved once: a per-session DNS lookup would be measured too."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        parsed = parse_listener(spec)
        self.unix_path: str | None = None
        self.family = socket.AF_UNIX
        self.sockaddr: Any = None
        if isinstance(parsed, InetSpec):
            self.host, self.port = parsed.host, parsed.port
        else:
            self.unix_path = str(parsed.path)

    async def resolve(self) -> None:
        if self.unix_path is not None:
            return
        infos = await trio.socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(f"cannot resolve {self.host}")
        self.family, _, _, _, self.sockaddr = infos[0]

    async def open(self) -> socket.socket:
        """A connected non-blocking socket (TCP_NODELAY on, as Postfix sets it)."""
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            address = self.sockaddr if self.unix_path is None else self.unix_path
            if self.unix_path is None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                code = sock.connect_ex(address)
                if code == errno.EINPROGRESS:
                    await trio.lowlevel.wait_writable(sock)
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                elif code == errno.EAGAIN:  # a Unix socket's backlog is full: wait, retry
                    await trio.sleep(0.001)
                    continue
                if code:
                    raise OSError(code, f"connecting to {self.spec}: {os.strerror(code)}")
                return sock
        except BaseException:
            trio.lowlevel.notify_closing(sock)
            sock.close()
            raise


class _Stream:
    """MilterStream's job for the generator, with less machinery per packet.

    The generator must cost far less per message than what it measures, and on a loaded
    machine its CPU comes out of the bridge's. So it talks to a non-blocking socket through
    trio's low-level readiness waits (one ``recv`` or ``send`` per call, as long as the kernel
    can take it, instead of trio's stream layers), and it does not re-arm TCP_QUICKACK after
    every read: Postfix does not either, so a filter that writes its answer in two pieces with
    Nagle on is measured as Postfix sees it.
    """

    __slots__ = ("connection", "sock")

    def __init__(self, sock: socket.socket, connection: Connection) -> None:
        self.sock = sock
        self.connection = connection

    async def send(self, *messages: Message) -> None:
        data = memoryview(self.connection.send_many(messages))
        sock = self.sock
        while data:
            try:
                sent = sock.send(data)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            data = data[sent:]

    async def receive(self) -> Event:
        connection = self.connection
        sock = self.sock
        while True:
            event = connection.next_event()
            if event is not NEED_DATA:
                return event
            try:
                data = sock.recv(READ_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            connection.receive_data(data)

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


class _Driver:
    """One process's load: ``concurrency`` tasks, each running sessions back to back."""

    def __init__(self, settings: BenchSettings, address: _Address) -> None:
        self.settings = settings
        self.address = address
        self.plan = _plan(settings)
        self.tally = _Tally()

    async def run_phase(self, messages: int | None, duration: float | None) -> _Tally:
        self.tally = _Tally()
        quota = _Quota(messages, duration)
        async with trio.open_nursery() as nursery:
            for _ in range(self.settings.concurrency):
                nursery.start_soon(self._worker, quota)
        return self.tally

    async def _worker(self, quota: _Quota) -> None:
        while quota.take():
            await self._session(quota)

    async def _session(self, quota: _Quota) -> None:
        """One connection carrying up to ``per_session`` messages (the first slot is taken)."""
        tally = self.tally
        settings = self.settings
        clock = time.perf_counter
        stage = "open"
        began = clock()
        milter: _Stream | None = None
        messages_left = settings.per_session
        tally.attempted += 1
        with trio.CancelScope() as scope:
            try:
                scope.deadline = trio.current_time() + settings.timeout
                milter = _Stream(await self.address.open(), Connection(Role.MTA))
                await milter.send(POSTFIX_OFFER)
                reply = await milter.receive()
                if not isinstance(reply, OptNegReply):
                    raise _Failed("protocol", stage, f"{reply!r} in reply to OPTNEG")
                tally.samples["open"].add(clock() - began)
                stage = "connect"
                verdict = await self._step(milter, scope, "connect", self.plan.connect)
                if verdict is None:
                    stage = "helo"
                    verdict = await self._step(milter, scope, "helo", self.plan.helo)
                while True:
                    if verdict is None:
                        verdict = await self._message(milter, scope)
                    tally.samples["end_to_end"].add(clock() - began)
                    tally.verdict(verdict)
                    messages_left -= 1
                    if milter.connection.conversation.connection_done:
                        break
                    await milter.send(Abort())
                    if messages_left <= 0 or not quota.take():
                        break
                    tally.attempted += 1
                    verdict = None
                    began = clock()
                stage = "quit"
                await milter.send(Quit())
            except _Failed as failure:
                tally.error(failure)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                tally.error(_Failed(_error_kind(exc), self._stage_of(milter, stage), str(exc)))
            except ProtocolError as exc:
                tally.error(_Failed(_error_kind(exc), self._stage_of(milter, stage), str(exc)))
        if scope.cancelled_caught:
            tally.error(_Failed("timeout", self._stage_of(milter, stage), "no answer in time"))
        if milter is not None:
            milter.close()

    @staticmethod
    def _stage_of(milter: _Stream | None, fallback: str) -> str:
        """The step that was waiting when a session broke, for the error description."""
        if milter is not None and milter.connection.awaiting is not None:
            return milter.connection.awaiting.__name__.lower()
        return fallback

    async def _message(self, milter: _Stream, scope: trio.CancelScope) -> str:
        """MAIL to EOM of one message; returns its verdict."""
        plan = self.plan
        step = self._step
        verdict = await step(milter, scope, "mail", plan.mail)
        if verdict is not None:
            return verdict
        accepted = 0
        for packets in plan.rcpts:
            reply = await self._reply(milter, scope, "rcpt", packets)
            if reply is None:
                accepted += 1
                continue
            verdict = _verdict_of(reply)
            if (
                verdict in ("accepted", "discarded")
                or milter.connection.conversation.connection_done
            ):
                return verdict or "tempfailed"  # the whole message (SHUTDOWN: the session)
            if verdict is None:
                accepted += 1
        if not accepted:
            return "rejected"
        for stage, packets in (("data", plan.data), *(("header", h) for h in plan.headers)):
            verdict = await step(milter, scope, stage, packets)
            if verdict is not None:
                return verdict
        verdict = await step(milter, scope, "eoh", plan.eoh)
        if verdict is not None:
            return verdict
        for packets in plan.bodies:
            reply = await self._reply(milter, scope, "body", packets)
            if isinstance(reply, Skip):
                break
            if reply is not None and (verdict := _verdict_of(reply)) is not None:
                return verdict
        edits: list[Reply] = []
        reply = await self._reply(milter, scope, "eom", plan.eom, edits)
        assert reply is not None
        verdict = _verdict_of(reply) or "accepted"
        held = any(isinstance(edit, Quarantine) for edit in edits)
        return "held" if held and verdict == "accepted" else verdict

    async def _step(
        self, milter: _Stream, scope: trio.CancelScope, stage: str, packets: Sequence[Command]
    ) -> str | None:
        """Send a step; the verdict if its answer ended the message, else None."""
        reply = await self._reply(milter, scope, stage, packets)
        return None if reply is None else _verdict_of(reply)

    async def _reply(
        self,
        milter: _Stream,
        scope: trio.CancelScope,
        stage: str,
        packets: Sequence[Command],
        edits: list[Reply] | None = None,
    ) -> Reply | None:
        """Send a step if the milter wants it; its final reply, or None when not awaited.

        ``edits`` collects the replies before the final one (end-of-message edits).
        """
        connection = milter.connection
        negotiated = connection.negotiated
        assert negotiated is not None
        if not negotiated.sends(type(packets[-1])):
            return None
        scope.deadline = trio.current_time() + self.settings.timeout
        began = time.perf_counter()
        await milter.send(*packets)
        if connection.awaiting is None:
            return None
        final: Reply | None = None
        while connection.awaiting is not None:
            event = await milter.receive()
            if event is CLOSED:
                raise _Failed("closed", stage, "the milter closed the connection")
            assert isinstance(event, Reply)
            if connection.awaiting is None:
                final = event
            elif edits is not None and not isinstance(event, Progress):
                edits.append(event)
        self.tally.samples[stage].add(time.perf_counter() - began)
        return final


# --------------------------------------------------------------------------------------------
# One process, several processes
# --------------------------------------------------------------------------------------------


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _raw(tally: _Tally, started: float, ended: float, cpu: float) -> RawResult:
    return RawResult(
        started=started,
        ended=ended,
        cpu_seconds=cpu,
        attempted=tally.attempted,
        verdicts=tally.verdicts,
        errors=tally.errors,
        error_samples=tally.error_samples,
        samples={
            stage: (s.seen, s.values.tobytes()) for stage, s in tally.samples.items() if s.seen
        },
    )


class _Counts:
    """Messages done and errors so far, summed over the processes (for the progress line)."""

    def __init__(self, parts: int = 1) -> None:
        self.done = [0] * parts
        self.errors = [0] * parts


async def _progress_line(counts: _Counts, settings: BenchSettings, out: TextIO) -> None:
    """Rewrite one status line on a terminal twice a second."""
    began = last_time = trio.current_time()
    last_done = 0
    total = f"/{settings.messages}" if settings.messages is not None else ""
    while True:
        await trio.sleep(0.5)
        now = trio.current_time()
        done = sum(counts.done)
        rate = (done - last_done) / (now - last_time)
        last_done, last_time = done, now
        out.write(
            f"\r[{now - began:6.1f}s] {done}{total} messages, {rate:7.0f} msg/s, "
            f"{sum(counts.errors)} errors "
        )
        out.flush()


async def _track(driver: _Driver, counts: _Counts, report: TextIO | None) -> None:
    """Copy the driver's counts for the progress line; a child of ``--processes`` also writes
    them to ``report`` (its stderr) as ``@done N E`` lines, which its parent adds up."""
    while True:
        counts.done[0] = driver.tally.done
        counts.errors[0] = sum(driver.tally.errors.values())
        if report is not None:
            report.write(f"@done {counts.done[0]} {counts.errors[0]}\n")
            report.flush()
        await trio.sleep(0.5)


async def run_load(
    settings: BenchSettings,
    *,
    barrier: trio.abc.ReceiveStream | None = None,
    report: TextIO | None = None,
    progress_out: TextIO | None = None,
) -> RawResult:
    """Run the warm-up, then the measured phase, in this process; the raw result.

    ``barrier`` and ``report`` are for a child of ``--processes``: after the warm-up it writes
    ``@ready`` to ``report`` and waits for one line on ``barrier`` (the parent's "go"), then
    reports its counts there while it measures. ``progress_out`` gets the terminal status line.
    """
    address = _Address(settings.target)
    await address.resolve()
    driver = _Driver(settings, address)
    if settings.warmup:
        await driver.run_phase(settings.warmup, None)
    if barrier is not None:
        assert report is not None
        report.write("@ready\n")
        report.flush()
        await barrier.receive_some(64)
    cpu0 = _cpu_seconds()
    started = time.time()
    counts = _Counts()
    async with trio.open_nursery() as nursery:
        if report is not None or progress_out is not None:
            nursery.start_soon(_track, driver, counts, report)
        if progress_out is not None:
            nursery.start_soon(_progress_line, counts, settings, progress_out)
        tally = await driver.run_phase(settings.messages, settings.duration)
        nursery.cancel_scope.cancel()
    ended = time.time()
    if progress_out is not None:
        progress_out.write("\n")
        progress_out.flush()
    return _raw(tally, started, ended, _cpu_seconds() - cpu0)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _child_argv(
    settings: BenchSettings, concurrency: int, messages: int | None, warmup: int
) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "milterbridge.bench",
        "--to",
        settings.target,
        "--concurrency",
        str(concurrency),
        "--warmup",
        str(warmup),
        "--headers",
        str(settings.headers),
        "--body-size",
        str(settings.body_size),
        "--recipients",
        str(settings.recipients),
        "--per-session",
        str(settings.per_session),
        "--timeout",
        str(settings.timeout),
        "--raw-child",
    ]
    argv += ["--messages", str(messages)] if messages is not None else []
    argv += ["--duration", str(settings.duration)] if settings.duration is not None else []
    for name, value in settings.macros:
        argv += ["--macro", f"{name.decode()}={value.decode()}"]
    return argv


class GeneratorProcessError(Exception):
    """A child of ``--processes`` failed (it could not start, or crashed)."""


async def run_processes(
    settings: BenchSettings, processes: int, progress_out: TextIO | None = None
) -> list[RawResult]:
    """Run the load from ``processes`` child processes and collect their raw results.

    Each child gets its share of the sessions, messages and warm-up; all of them finish their
    warm-up before any starts measuring (a barrier through their stdin), so the measured
    phases overlap and the merged elapsed time is the span from the first start to the last
    end.
    """
    sessions = _split(settings.concurrency, processes)
    quotas: list[int | None] = (
        list(_split(settings.messages, processes))
        if settings.messages is not None
        else [None] * processes
    )
    warmups = _split(settings.warmup, processes)
    shares = [
        i for i in range(processes) if sessions[i] > 0 and quotas[i] != 0
    ]  # fewer sessions or messages than processes: the extra ones have nothing to do
    counts = _Counts(len(shares))
    children: list[trio.Process] = []
    outputs: list[bytearray] = []
    ready = trio.Semaphore(0)
    async with trio.open_nursery() as nursery:
        for slot, index in enumerate(shares):
            argv = _child_argv(settings, sessions[index], quotas[index], warmups[index])
            child = await trio.lowlevel.open_process(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            children.append(child)
            outputs.append(bytearray())
            nursery.start_soon(_collect, child, outputs[-1])
            nursery.start_soon(_relay_stderr, child, ready, counts, slot)
        for _ in children:
            await ready.acquire()
        for child in children:
            assert child.stdin is not None
            try:
                await child.stdin.send_all(b"go\n")
                await child.stdin.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # it died during its warm-up: its exit status says so below
        if progress_out is not None:
            progress = trio.CancelScope()

            async def show() -> None:
                with progress:
                    await _progress_line(counts, settings, progress_out)

            nursery.start_soon(show)
            for child in children:
                await child.wait()
            progress.cancel()
            progress_out.write("\n")
    failed = [c.returncode for c in children if c.returncode not in (EXIT_OK, EXIT_ERRORS)]
    if failed:
        raise GeneratorProcessError(f"a generator process failed (exit status {failed[0]})")
    return [msgspec.msgpack.decode(bytes(out), type=RawResult) for out in outputs]


async def _collect(child: trio.Process, buffer: bytearray) -> None:
    assert child.stdout is not None
    while chunk := await child.stdout.receive_some(1 << 20):
        buffer += chunk
    await child.wait()


async def _relay_stderr(
    child: trio.Process, ready: trio.Semaphore, counts: _Counts, slot: int
) -> None:
    """Read a child's stderr: ``@ready`` releases one slot of the barrier, ``@done`` lines
    update the counts, anything else is passed through."""
    assert child.stderr is not None
    pending = b""
    signalled = False
    while chunk := await child.stderr.receive_some(65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line == b"@ready" and not signalled:
                signalled = True
                ready.release()
            elif line.startswith(b"@done "):
                _, done, errors = line.split()
                counts.done[slot], counts.errors[slot] = int(done), int(errors)
            else:
                sys.stderr.write(line.decode(errors="replace") + "\n")
    if not signalled:
        ready.release()  # it died before its warm-up ended: do not wait for it forever


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def format_summary(summary: Summary) -> str:
    """The human-readable report: throughput, verdicts, errors, then the latency table."""
    s = summary.settings
    load = (
        f"{summary.concurrency} sessions, {summary.processes} process"
        f"{'es' if summary.processes > 1 else ''}, {s.headers} headers, {s.body_size}-byte body "
        f"({s.message_size} bytes in all), {s.recipients} recipient"
        f"{'s' if s.recipients > 1 else ''}, {s.per_session} message(s) per session"
    )
    verdicts = ", ".join(f"{k} {v}" for k, v in summary.verdicts.items() if v) or "none"
    errors = ", ".join(f"{k} {v}" for k, v in summary.errors.items() if v) or "none"
    cpu = summary.generator_cpu_ms_per_message
    lines = [
        f"milterbridge bench -> {summary.target}: {summary.completed} messages in "
        f"{summary.elapsed_s:.2f} s = {summary.messages_per_second:.1f} msg/s",
        f"load:      {load}",
        f"verdicts:  {verdicts}",
        f"errors:    {errors}",
        *(f"           {sample}" for sample in summary.error_samples[:5]),
        f"generator: {summary.generator_cpu_s:.2f} s CPU"
        + (f" ({cpu:.3f} ms per message)" if cpu is not None else ""),
        f"latency in ms ({summary.sampling}):",
        f"  {'stage':<11}{'count':>9}{'mean':>10}{'p50':>10}{'p95':>10}{'p99':>10}{'max':>10}",
    ]
    for stage, lat in summary.latency_ms.items():
        lines.append(
            f"  {stage:<11}{lat.count:>9}{lat.mean_ms:>10.3f}{lat.p50_ms:>10.3f}"
            f"{lat.p95_ms:>10.3f}{lat.p99_ms:>10.3f}{lat.max_ms:>10.3f}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


_DESCRIPTION = (
    "Play the MTA against a milter (the bridge or a filter directly) with many sessions at "
    "once; report messages/s, latency per step and end to end (p50/p95/p99), verdicts and "
    "errors by kind. Exit status: 0 every message got a verdict, 1 some failed, 2 usage error."
)


def add_bench_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``bench`` and its options to the ``milterbridge`` command line."""
    bench = subparsers.add_parser(
        "bench",
        help="load generator: play the MTA against a milter at full speed",
        description=_DESCRIPTION,
    )
    _add_options(bench)
    return bench


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--to",
        default="inet:127.0.0.1:8899",
        metavar="SPEC",
        help="the milter: inet:HOST:PORT, inet6:[ADDR]:PORT or unix:PATH",
    )
    parser.add_argument("--concurrency", type=int, default=20, metavar="N", help="sessions at once")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument(
        "--messages", type=int, metavar="N", help="messages to measure (default 1000)"
    )
    amount.add_argument("--duration", type=float, metavar="SECONDS", help="measure this long")
    parser.add_argument(
        "--warmup", type=int, default=0, metavar="N", help="unmeasured messages first"
    )
    parser.add_argument("--headers", type=int, default=10, metavar="N", help="per message")
    parser.add_argument("--body-size", type=int, default=2048, metavar="BYTES", help="per message")
    parser.add_argument("--recipients", type=int, default=1, metavar="N", help="per message")
    parser.add_argument(
        "--per-session", type=int, default=1, metavar="N", help="messages per connection"
    )
    parser.add_argument(
        "--macro",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="sent with the connect macros; repeatable",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, metavar="SECONDS", help="per step and connect"
    )
    parser.add_argument("--processes", type=int, default=1, metavar="N", help="generator processes")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    # Internal: a child of --processes (writes its raw result as msgpack to stdout).
    parser.add_argument("--raw-child", action="store_true", help=argparse.SUPPRESS)


def _settings(args: argparse.Namespace) -> BenchSettings:
    parse_listener(args.to)
    macros = []
    for item in args.macro:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--macro {item!r}: expected NAME=VALUE")
        macros.append((name.encode(), value.encode()))
    messages = args.messages
    if messages is None and args.duration is None:
        messages = 1000
    if args.processes < 1:
        raise ValueError("--processes must be at least 1")
    return BenchSettings(
        target=args.to,
        concurrency=args.concurrency,
        messages=messages,
        duration=args.duration,
        warmup=args.warmup,
        headers=args.headers,
        body_size=args.body_size,
        recipients=args.recipients,
        per_session=args.per_session,
        macros=tuple(macros),
        timeout=args.timeout,
    )


def run_bench(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``bench``: 0 when every message got a verdict, 1 when some failed, 2 usage error."""
    out = out or sys.stdout
    try:
        settings = _settings(args)
    except (ValueError, ListenerSpecError) as exc:
        print(f"milterbridge bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    progress = sys.stderr if sys.stderr.isatty() and not args.raw_child else None
    try:
        if args.raw_child:
            raw = trio.run(_child_main, settings)
            sys.stdout.buffer.write(msgspec.msgpack.encode(raw))
            sys.stdout.flush()
            return EXIT_ERRORS if raw.errors else EXIT_OK
        if args.processes > 1:
            raws = trio.run(run_processes, settings, args.processes, progress)
        else:
            raws = [trio.run(_one_process, settings, progress)]
    except (OSError, GeneratorProcessError) as exc:
        print(f"milterbridge bench: {args.to}: {exc}", file=sys.stderr)
        return EXIT_ERRORS
    summary = summarize(settings, raws, args.processes)
    if args.json:
        out.write(msgspec.json.format(msgspec.json.encode(summary)).decode() + "\n")
    else:
        out.write(format_summary(summary) + "\n")
    out.flush()
    return EXIT_ERRORS if summary.error_total else EXIT_OK


async def _one_process(settings: BenchSettings, progress: TextIO | None) -> RawResult:
    return await run_load(settings, progress_out=progress)


async def _child_main(settings: BenchSettings) -> RawResult:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    try:
        return await run_load(settings, barrier=stdin, report=sys.stderr)
    finally:
        await stdin.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m milterbridge.bench``: the same command without the CLI around it (this is
    also how ``--processes`` starts its children)."""
    parser = argparse.ArgumentParser(prog="milterbridge bench", description=_DESCRIPTION)
    _add_options(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
