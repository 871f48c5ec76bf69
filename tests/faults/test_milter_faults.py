"""The fault matrix of an upstream milter: every way it can fail, under both error policies.

One row per fault (README "When something breaks", design §7). Each cell runs one session with
two milters joined at connect -- ``good`` (healthy) and ``bad`` (the row's script, on its own
loopback port) -- plus an in-process data hook, so that the body goes to the spool (memory limit
1 byte) and the spool check has a file to look for. The MTA plays one message and stops at the
first answer that is not CONTINUE. Time is virtual (autojump_clock): timeoutConnect 2 s,
timeoutCommand 3 s, timeoutData 5 s.

Every cell asserts the reply the MTA gets (tempFailOnError true: TEMPFAIL at the row's stage;
false: CONTINUE throughout, the good milter decides), the one ``filter_error`` line and its
fields, the metrics that must move and by how much, and that nothing is left behind
(tests/faults/leaks.py).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from milterbridge.milter import (
    ALL_ACTIONS,
    AddHeader,
    Body,
    Command,
    Continue,
    Data,
    EndOfHeaders,
    EndOfMessage,
    Header,
    Helo,
    Mail,
    OptNeg,
    OptNegReply,
    Protocol,
    Rcpt,
    Tempfail,
)
from milterbridge.server.session import MtaSession
from milterbridge.upstream import UpstreamEndpoint, milter_client
from tests.fake_upstream import FakeUpstream, Peer, Script, fake_upstream

from .harness import (
    SESSION_ID,
    STAGES,
    Answered,
    Delta,
    Line,
    MetricWatch,
    Mta,
    SpoolingHook,
    closed_port,
    errors,
    failed_request,
    healthy,
    milter_filter,
    protocol_errors,
    up,
)
from .leaks import LeakCheck

GOOD, BAD = "good", "bad"
#: The first three bytes of a CONTINUE packet: a reply begun and never finished.
HALF = Continue().frame()[:3]
#: A whole packet with a reply letter that does not exist.
GARBAGE = b"\x00\x00\x00\x01Z"
#: A length word far over maxResponseSize (50 MB by default).
OVERSIZE = b"\x0f\xff\xff\xff"
#: Stages inside a message (from MAIL on): a failure there is in the message's log line.
IN_MESSAGE = frozenset(STAGES[STAGES.index("mail") :])
#: Stages at which a TEMPFAIL ends the message (and counts it); RCPT refuses one recipient.
MESSAGE_ENDING = IN_MESSAGE - {"rcpt"}

# --- what the bad milter does -------------------------------------------------------------------

Action = Callable[[Peer], Awaitable[None]]


async def hang(peer: Peer) -> None:
    await trio.sleep_forever()


async def close(peer: Peer) -> None:
    await peer.stream.aclose()


def send(data: bytes) -> Action:
    async def action(peer: Peer) -> None:
        await peer.raw(data)

    return action


def drip(data: bytes, interval: float) -> Action:
    """``data`` one byte at a time, ``interval`` seconds apart."""

    async def action(peer: Peer) -> None:
        for byte in data:
            await peer.raw(bytes([byte]))
            await trio.sleep(interval)

    return action


def at(stop: type[Command], *actions: Action) -> Script:
    """Behave until ``stop`` arrives, then do ``actions`` instead of answering it."""

    async def script(peer: Peer) -> None:
        await peer.negotiate()
        while not isinstance(await peer.receive(), stop):
            if peer.codec.awaiting is not None:
                await peer.reply(Continue())
        for action in actions:
            await action(peer)

    return script


async def bad_version(peer: Peer) -> None:
    """Answers OPTNEG with a protocol version nobody offered."""
    await peer.expect(OptNeg)
    await peer.raw(OptNegReply(7, ALL_ACTIONS, Protocol.NONE).frame())


async def plain_text(peer: Peer) -> None:
    """Answers the TLS ClientHello with plain milter packets."""
    await peer.stream.receive_some(65536)
    await peer.raw(Continue().frame() * 20)


async def stray_reply(peer: Peer) -> None:
    """Answers HELO twice: the second CONTINUE arrives when nothing was asked."""
    await peer.negotiate()
    while not isinstance(await peer.receive(), Helo):
        await peer.reply(Continue())
    await peer.reply(Continue())
    await peer.raw(Continue().frame())
    await peer.wait_eof()


# --- the matrix ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One fault of the bad milter and what it must lead to.

    ``stage`` is the MTA step that gets the policy's answer; ``failed_at`` the failure's own
    stage in the log line (``optneg`` covers connect, TLS and negotiation); ``changes`` the
    metric series that must move; ``up`` what ``filter_up{filter="bad"}`` reads afterwards
    (None: never set, the filter was neither reached nor lost).
    """

    script: Script | None  # None: nobody listens on the bad milter's port
    stage: str
    kind: str
    failed_at: str
    changes: tuple[Delta, ...]
    up: float | None
    settings: dict[str, Any] = field(default_factory=dict)
    #: The bad milter's TLS certificate: "unknown_ca" (a CA the system does not trust) or
    #: "wrong_name" (a trusted CA, issued for another name).
    certificate: str | None = None
    #: Words the failure's cause must contain.
    cause: str = ""
    #: PROGRESS packets the MTA gets at ``stage`` while the bridge waits.
    progress: int = 0


TLS = {"use_tls": True}

CELLS: dict[str, Cell] = {
    "refused": Cell(None, "connect", "refused", "optneg", (errors(BAD, "refused"),), up=0),
    "connect_timeout": Cell(
        hang, "connect", "connect_timeout", "optneg", (errors(BAD, "connect_timeout"),), up=0
    ),
    "tls_handshake_hangs": Cell(
        hang,
        "connect",
        "connect_timeout",
        "optneg",
        (errors(BAD, "connect_timeout"),),
        up=0,
        settings=TLS,
    ),
    "tls_answered_in_plain_text": Cell(
        plain_text, "connect", "tls", "optneg", (errors(BAD, "tls"),), up=0, settings=TLS
    ),
    "tls_unknown_ca": Cell(
        healthy,
        "connect",
        "tls",
        "optneg",
        (errors(BAD, "tls"),),
        up=0,
        settings=TLS,
        certificate="unknown_ca",
        cause="certificate verify failed",
    ),
    "tls_wrong_name": Cell(
        healthy,
        "connect",
        "tls",
        "optneg",
        (errors(BAD, "tls"),),
        up=0,
        settings=TLS,
        certificate="wrong_name",
        cause="mismatch",
    ),
    "negotiation": Cell(
        bad_version,
        "connect",
        "negotiation",
        "optneg",
        (errors(BAD, "negotiation"), protocol_errors("filter")),
        up=None,
    ),
    "garbage": Cell(
        at(Helo, send(GARBAGE)),
        "helo",
        "garbage",
        "helo",
        (errors(BAD, "garbage"), protocol_errors("filter"), failed_request(BAD, "helo")),
        up=1,
    ),
    "drips_past_timeout_command": Cell(
        at(Mail, drip(Continue().frame(), 1.0)),
        "mail",
        "command_timeout",
        "mail",
        (errors(BAD, "command_timeout"), failed_request(BAD, "mail")),
        up=1,
    ),
    "reply_at_the_wrong_moment": Cell(
        stray_reply,
        "mail",
        "protocol",
        "mail",
        (errors(BAD, "protocol"), protocol_errors("filter"), failed_request(BAD, "mail")),
        up=1,
        cause="no reply is expected",
    ),
    "closes_mid_packet": Cell(
        at(Rcpt, send(HALF), close),
        "rcpt",
        "closed",
        "rcpt",
        (errors(BAD, "closed"), failed_request(BAD, "rcpt")),
        up=1,
    ),
    "oversize": Cell(
        at(Data, send(OVERSIZE)),
        "data",
        "oversize",
        "data",
        (errors(BAD, "oversize"), protocol_errors("filter"), failed_request(BAD, "data")),
        up=1,
    ),
    "edit_before_end_of_message": Cell(
        at(Header, send(AddHeader(b"X", b"y").frame())),
        "header",
        "protocol",
        "header",
        (errors(BAD, "protocol"), protocol_errors("filter"), failed_request(BAD, "header")),
        up=1,
    ),
    "hangs_mid_reply": Cell(
        at(EndOfHeaders, send(HALF), hang),
        "eoh",
        "command_timeout",
        "eoh",
        (errors(BAD, "command_timeout"), failed_request(BAD, "eoh")),
        up=1,
    ),
    "closes_without_answering": Cell(
        at(Body, close),
        "body",
        "closed",
        "body",
        (errors(BAD, "closed"), failed_request(BAD, "body")),
        up=1,
    ),
    "hangs_mid_reply_at_end_of_message": Cell(
        at(EndOfMessage, send(HALF), hang),
        "eom",
        "data_timeout",
        "eom",
        (errors(BAD, "data_timeout"), failed_request(BAD, "eom")),
        up=1,
        progress=1,  # PROGRESS every 3 s keeps the MTA waiting for the 5 s timeoutData
    ),
}


# --- TLS for the bad milter ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_side(cert: trustme.LeafCert) -> Callable[[trio.SocketStream], trio.abc.Stream]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return lambda stream: trio.SSLStream(stream, context, server_side=True)


def trust(ca: trustme.CA, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the bridge's milter client trust ``ca`` (as the system store would, were it in it)."""
    context = ssl.create_default_context()
    ca.configure_trust(context)

    def tls_context(endpoint: UpstreamEndpoint) -> ssl.SSLContext:
        return context

    monkeypatch.setattr(milter_client, "tls_context", tls_context)


def wrapping(
    cell: Cell, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> Callable[[trio.SocketStream], trio.abc.Stream] | None:
    if cell.certificate == "unknown_ca":
        return server_side(trustme.CA().issue_cert("127.0.0.1"))
    if cell.certificate == "wrong_name":
        trust(ca, monkeypatch)
        return server_side(ca.issue_cert("other.test"))
    return None


@asynccontextmanager
async def bad_milter(
    cell: Cell, wrap: Callable[[trio.SocketStream], trio.abc.Stream] | None
) -> AsyncIterator[int]:
    """The bad milter's port (a closed one for a refusal)."""
    if cell.script is None:
        yield closed_port()
        return
    async with fake_upstream(cell.script, wrap=wrap) as fake:
        yield fake.port


# --- one cell -----------------------------------------------------------------------------------


async def play(
    watch: MetricWatch,
    good: FakeUpstream,
    bad_port: int,
    temp_fail: bool,
    cell: Cell,
    leaks: LeakCheck,
) -> tuple[list[Answered], list[MutableMapping[str, Any]]]:
    """Run the session; check its leaks as soon as it has returned (while it still exists, so
    that nothing it forgot to close is closed by the garbage collector first)."""
    hook = SpoolingHook()
    filters = [
        milter_filter(GOOD, good.port, True),
        milter_filter(BAD, bad_port, temp_fail, **cell.settings),
    ]
    mta_stream, session_stream = trio.testing.memory_stream_pair()
    session = MtaSession(
        session_stream,
        max_packet=1 << 20,
        session_id=SESSION_ID,
        filters=filters,
        hooks=[hook.config],
        hook_client=hook,
        metrics=watch.metrics,
        spool_memory=1,
        spool_directory=str(leaks.spool),
    )
    mta = Mta(mta_stream)
    with capture_logs([merge_contextvars]) as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            await mta.negotiate()
            answers = await mta.message()
            await mta.quit()
    # Nobody listens on a refusing port: a socket of ours could only be there by coincidence
    # (an ephemeral port of another connection).
    leaks.session_ended([good.port] if cell.script is None else [good.port, bad_port])
    return answers, logs


def expected_replies(cell: Cell, temp_fail: bool) -> list[tuple[str, object]]:
    """(stage, final reply) for each step the MTA plays."""
    if not temp_fail:
        return [(stage, Continue()) for stage in STAGES]  # the good milter decides alone
    until = STAGES[: STAGES.index(cell.stage) + 1]
    return [(stage, Tempfail() if stage == cell.stage else Continue()) for stage in until]


def counted_message(cell: Cell, temp_fail: bool) -> str | None:
    """The ``messages_total`` verdict the cell adds, if any: a TEMPFAIL before MAIL or at RCPT
    ends no message (the MTA quits, and an unfinished message is not counted)."""
    if not temp_fail:
        return "accept"
    return "tempfail" if cell.stage in MESSAGE_ENDING else None


@pytest.mark.parametrize("temp_fail", [True, False], ids=["tempfail", "skip"])
@pytest.mark.parametrize("name", list(CELLS))
async def test_milter_fault(
    name: str,
    temp_fail: bool,
    ca: trustme.CA,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    cell = CELLS[name]
    leaks = LeakCheck(tmp_path / "spool")
    wrap = wrapping(cell, ca, monkeypatch)
    watch = MetricWatch([GOOD, BAD, SpoolingHook().config.name])
    before = watch.start(cell.changes)
    with trio.fail_after(60):
        async with fake_upstream(healthy) as good, bad_milter(cell, wrap) as bad_port:
            answers, logs = await play(watch, good, bad_port, temp_fail, cell, leaks)
            await good.wait_finished()
            assert good.saw_eof

    # The reply the MTA gets, step by step.
    assert [(answer.stage, answer.final) for answer in answers] == expected_replies(cell, temp_fail)
    progress = {answer.stage: answer.progress for answer in answers if answer.progress}
    assert progress == ({cell.stage: cell.progress} if cell.progress else {})

    # The log lines.
    policy = "tempfail" if temp_fail else "skip"
    error = Line("filter_error", {"filter": BAD, "kind": cell.kind, "stage": cell.failed_at}).find(
        logs
    )
    assert error["policy"] == policy
    assert cell.cause in error["cause"]
    assert len([line for line in logs if line["event"] == "filter_error"]) == 1
    Line("session_end", {"outcome": "quit"}).find(logs)
    if cell.stage in IN_MESSAGE:
        message = Line("message_end").find(logs)
        assert message["filters"][BAD]["error"] == cell.kind
    reached_body = any(answer.stage == "body" for answer in answers)
    spilled = [line for line in logs if line.get("limit") == "spool_memory"]
    assert len(spilled) == reached_body  # the spool had a file whenever the body came

    # The metrics.
    watch.check(before, [up(BAD, cell.up)])
    assert watch.total("milterbridge_filter_errors_total", filter=BAD) == 1
    assert watch.total("milterbridge_filter_errors_total", filter=GOOD) == 0
    if not any(delta.labels.get("peer") == "filter" for delta in cell.changes):
        assert watch.total("milterbridge_protocol_errors_total") == 0
    verdict = counted_message(cell, temp_fail)
    assert watch.total("milterbridge_messages_total") == (verdict is not None)
    if verdict is not None:
        assert watch.total("milterbridge_messages_total", verdict=verdict) == 1
    assert watch.total("milterbridge_sessions_active") == 0

    leaks.finished()
