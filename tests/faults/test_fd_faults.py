"""The bridge runs out of file descriptors (issue #10: "new sessions tempfailed, running ones
finish").

End to end: ``python -m milterbridge run`` as a subprocess whose RLIMIT_NOFILE is lowered (with
``prlimit``, once it listens) to a few descriptors above what it holds, two real libmilter
filters behind it -- ``early`` joins every session at CONNECT, ``late`` at MAIL and is optional
(``tempFailOnError = false``) -- and MTAs played by our codec. The test opens sessions until the
bridge has no descriptor left, then checks what README "When something breaks" promises:

* a new connection gets the refusal (OPTNEG asking for nothing but CONNECT, TEMPFAIL at CONNECT)
  at once -- whether accept failed for it (it is then accepted with the descriptor the bridge
  keeps in reserve) or gave it the very last descriptor -- rather than waiting in the listen
  backlog, or being closed for want of a filter; ``session_refused`` with reason
  ``fd_exhausted`` (at most one a second) and
  ``milterbridge_limit_hits_total{limit="file_descriptors"}`` for each;
* running sessions finish their messages; a filter that would join one of them now cannot be
  connected (EMFILE) and follows its error policy (``late``: dropped) with a ``filter_error``
  line. That line's kind and cause do not name the shortage yet: the upstream client reports
  it as kind ``refused`` with trio's "all attempts to connect ... failed" (the EMFILE is in the
  exception's cause), so the test does not pin either;
* once sessions end, new ones are served normally, and the bridge is back to the descriptors
  it started with (no socket left behind).

The accept loop's own decisions (reserve out, a descriptor freed meanwhile, ENOBUFS) are checked
in-process with a scripted listener, since no real socket produces them on demand.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from milterbridge.milter import (
    CLOSED,
    Action,
    Body,
    Command,
    Connect,
    Continue,
    Data,
    EndOfHeaders,
    EndOfMessage,
    Family,
    Header,
    Helo,
    Mail,
    OptNegReply,
    Quit,
    Rcpt,
    Reply,
    Tempfail,
)
from milterbridge.server.accept import RETRY_SECONDS, AcceptLoop
from milterbridge.server.refuse import REFUSE_PROTOCOL, RefusalLog
from milterbridge.transport import MilterStream
from tests.fixtures.filter_process import FilterProcess, running_filter
from tests.integration.bridge_process import BridgeProcess
from tests.integration.mta_driver import POSTFIX_OFFER, exchange, open_mta

CONNECT = Connect(b"client.test", Family.INET, 4000, b"192.0.2.1")
#: Sessions that fit in the descriptors the test leaves to the bridge above what it holds when
#: idle (its reserve included): two each, the MTA's connection and ``early``'s. Fewer than
#: ``circuitFailures`` (5), so that ``late``'s failures do not open its circuit.
SESSIONS = 3
#: Connections made at once while no descriptor is left: all refused, one after the other.
WAITING = 3


def config(early: FilterProcess, late: FilterProcess) -> str:
    return (
        f'[[milter]]\nname = "early"\nhostname = "127.0.0.1"\nport = {early.port}\n'
        'stages = ["connect"]\n'
        f'[[milter]]\nname = "late"\nhostname = "127.0.0.1"\nport = {late.port}\n'
        'stages = ["mail"]\ntempFailOnError = false\n'
    )


@pytest.fixture
def filters(tmp_path: Path) -> Iterator[tuple[FilterProcess, FilterProcess]]:
    with (
        running_filter({}, tmp_path / "filters", name="early") as early,
        running_filter({}, tmp_path / "filters", name="late") as late,
    ):
        yield early, late


# --- the bridge process, seen from outside -----------------------------------------------------


def descriptors(pid: int) -> list[str]:
    """What each of the process's open descriptors points to."""
    links = []
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            links.append(os.readlink(entry))
        except FileNotFoundError:  # closed while listing
            continue
    return links


def connected_sockets(pid: int) -> int:
    """The process's TCP sockets that are not listening (connections, open or closing)."""
    ours = {link[len("socket:[") : -1] for link in descriptors(pid) if link.startswith("socket:")}
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in ours and fields[3] != "0A":  # 0A: LISTEN
                count += 1
    return count


async def idle_descriptors(bridge: BridgeProcess) -> int:
    """How many descriptors the bridge holds once it has no connection open at all (polled:
    closing a connection is not instant on the bridge's side)."""
    with trio.fail_after(10):
        while connected_sockets(bridge.pid):  # noqa: ASYNC110 -- another process: polled
            await trio.sleep(0.02)
    return len(descriptors(bridge.pid))


async def reserve_back(bridge: BridgeProcess, idle: int) -> None:
    """Until the bridge holds its reserve descriptor again (after a refusal closed): as many
    open /dev/null as when it was idle (its standard streams and the reserve)."""
    with trio.fail_after(10):
        while descriptors(bridge.pid).count(os.devnull) < idle:  # noqa: ASYNC110
            await trio.sleep(0.02)


async def until_probed(admin: httpx.AsyncClient, *names: str) -> None:
    """Until /readyz has every milter reachable (the bridge probed each once)."""
    with trio.fail_after(10):
        while True:
            filters = (await admin.get("/readyz")).json()["filters"]
            if all(filters.get(name, {}).get("state") == "reachable" for name in names):
                return
            await trio.sleep(0.05)


async def scrape(admin: httpx.AsyncClient, name: str, **labels: str) -> float:
    text = (await admin.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"no sample {name}{labels} in /metrics")


# --- the MTA ------------------------------------------------------------------------------------


async def step(mta: MilterStream, command: Command) -> list[Reply]:
    """``command`` as Postfix sends it (not at all for a step the bridge declined)."""
    negotiated = mta.connection.negotiated
    assert negotiated is not None
    return await exchange(mta, command) if negotiated.sends(type(command)) else []


async def connect(address: str) -> tuple[MilterStream, OptNegReply, list[Reply]]:
    """A new MTA connection: its OPTNEG answer and CONNECT's replies."""
    mta = await open_mta(address)
    (answer,) = await exchange(mta, POSTFIX_OFFER)
    assert isinstance(answer, OptNegReply)
    return mta, answer, await step(mta, CONNECT)


def is_refusal(answer: OptNegReply) -> bool:
    """The refusal's OPTNEG answer: no action, every step but CONNECT declined."""
    return answer.actions == Action.NONE and answer.protocol == REFUSE_PROTOCOL


async def refused(address: str) -> None:
    """One connection while no descriptor is left: refused at once, as Postfix sees it."""
    mta, answer, replies = await connect(address)
    assert is_refusal(answer)
    assert replies == [Tempfail()]
    await mta.send(Quit())  # as Postfix ends a tempfailed milter conversation
    assert await mta.receive() is CLOSED
    await mta.aclose()


MESSAGE = [
    Helo(b"client.test"),
    Mail(b"<a@x.test>"),
    Rcpt(b"<b@y.test>"),
    Data(),
    Header(b"Subject", b"fd"),
    EndOfHeaders(),
    Body(b"body\r\n"),
]


async def deliver(mta: MilterStream) -> list[Reply]:
    """One message after CONNECT: every step continued; end-of-message's replies."""
    for command in MESSAGE:
        assert await step(mta, command) in ([], [Continue()]), command
    return await step(mta, EndOfMessage())


# --- the test -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spare",
    [
        # Room for three sessions exactly: accept fails for the fourth connection, which is
        # accepted with the reserve and refused.
        pytest.param(2 * SESSIONS, id="accept-fails"),
        # One more: accept gives the fourth connection the last descriptor, none is left for
        # ``early``: refused all the same (not closed, which would leave the MTA to its
        # milter_default_action). That descriptor, free again, lets one ``late`` join.
        pytest.param(2 * SESSIONS + 1, id="last-descriptor"),
    ],
)
async def test_out_of_descriptors_new_sessions_are_refused_and_running_ones_finish(
    tmp_path: Path, filters: tuple[FilterProcess, FilterProcess], spare: int
) -> None:
    early, late = filters
    free = spare - 2 * SESSIONS  # once the sessions run: for as many joins of ``late``
    path = tmp_path / "bridge.toml"
    path.write_text(config(early, late))
    with BridgeProcess(tmp_path / "bridge", args=["--config", str(path)]) as bridge:
        (listening,) = bridge.events("listening")
        address = bridge.address()
        async with httpx.AsyncClient(base_url=f"http://{listening['admin']}") as admin:
            await until_probed(admin, "early", "late")
        idle = await idle_descriptors(bridge)
        devnull = descriptors(bridge.pid).count(os.devnull)
        limit = idle + spare
        _, hard = resource.prlimit(bridge.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(bridge.pid, resource.RLIMIT_NOFILE, (limit, hard))

        with trio.fail_after(30):
            # Sessions until the bridge has no descriptor left: two each (the MTA's, early's).
            running: list[MilterStream] = []
            while True:
                mta, answer, replies = await connect(address)
                if is_refusal(answer):
                    assert replies == [Tempfail()]
                    await mta.send(Quit())
                    await mta.aclose()
                    break
                assert replies == [Continue()]
                running.append(mta)
                assert len(running) <= SESSIONS
            assert len(running) == SESSIONS

            await reserve_back(bridge, devnull)
            # More connections while nothing is free: each refused, none left waiting.
            async with trio.open_nursery() as nursery:
                for _ in range(WAITING):
                    nursery.start_soon(refused, address)
            await reserve_back(bridge, devnull)

            # The running sessions finish their messages; ``late`` cannot join them.
            for mta in running:
                assert await deliver(mta) == [Continue()]
            for mta in running:
                await exchange(mta, Quit())
                await mta.aclose()
            assert await idle_descriptors(bridge) == idle  # no socket left behind

            # Descriptors are back: a new session is served by both filters again.
            mta, answer, replies = await connect(address)
            assert not is_refusal(answer)
            assert replies == [Continue()]
            assert await deliver(mta) == [Continue()]
            await exchange(mta, Quit())
            await mta.aclose()

            errors = bridge.events("filter_error")
            (kind,) = {line["kind"] for line in errors}
            async with httpx.AsyncClient(base_url=f"http://{listening['admin']}") as admin:
                hits = await scrape(
                    admin, "milterbridge_limit_hits_total", limit="file_descriptors"
                )
                accepted = await scrape(admin, "milterbridge_messages_total", verdict="accept")
                late_errors = await scrape(
                    admin, "milterbridge_filter_errors_total", filter="late", kind=kind
                )
            assert hits == 1 + WAITING
            assert accepted == SESSIONS + 1
            assert late_errors == SESSIONS - free
            assert await idle_descriptors(bridge) == idle
        assert bridge.stop() == 0

    refusals = bridge.events("session_refused")
    assert refusals, "no session_refused line"
    assert all(line["reason"] == "fd_exhausted" for line in refusals)
    assert refusals[0]["error"] == "Too many open files"
    assert refusals[0]["limit"] == limit
    assert sum(1 + line["suppressed"] for line in refusals) <= 1 + WAITING
    assert not bridge.events("accept_failed")  # the reserve answered every time

    assert [(line["filter"], line["policy"]) for line in errors] == [("late", "skip")] * (
        SESSIONS - free
    )
    # At the connect, before a byte was sent (kind and cause: see the module docstring).
    assert {line["stage"] for line in errors} == {"optneg"}
    assert {line["kind"] for line in errors} == {"local_resources"}
    assert all("Too many open files" in line["cause"] for line in errors)
    outcomes = [line["outcome"] for line in bridge.events("session_end")]
    assert outcomes == ["quit"] * (SESSIONS + 1)
    verdicts = [line["verdict"] for line in bridge.events("message_end")]
    assert verdicts == ["accept"] * (SESSIONS + 1)
    # ``early`` saw every message, ``late`` those it could join and the one after the shortage.
    assert len(early.events("eom")) == SESSIONS + 1
    assert len(late.events("eom")) == free + 1


# --- the accept loop's decisions, with a scripted listener ---------------------------------------


class ScriptedListener:
    """A listener whose ``accept`` fails with the errors given, then hands out memory streams;
    it records whether the loop's reserve was held at each call."""

    def __init__(self, loop: AcceptLoop | None, *errors: int) -> None:
        self.loop = loop
        # What the loop waits on for a connection to be there: a socket with data to read.
        self.socket, self._writer = socket.socketpair()
        self._writer.send(b"connection waiting")
        self.errors = list(errors)
        self.reserve_held: list[bool] = []
        self.peers: list[trio.abc.Stream] = []

    async def accept(self) -> Any:
        await trio.lowlevel.checkpoint()
        if self.loop is not None:
            self.reserve_held.append(self.loop.reserve.held)
        if self.errors:
            code = self.errors.pop(0)
            raise OSError(code, os.strerror(code))
        if self.peers:
            await trio.sleep_forever()  # one connection is enough for a test
        ours, theirs = trio.testing.memory_stream_pair()
        self.peers.append(theirs)
        return ours

    async def aclose(self) -> None:
        self.socket.close()
        self._writer.close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> ScriptedListener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Recorder:
    """The two things the loop can do with an accepted connection, recorded."""

    def __init__(self) -> None:
        self.handled: list[str] = []
        self.done = trio.Event()

    async def session(self, stream: Any) -> None:
        self.handled.append("session")
        self.done.set()

    async def refusal(self, stream: Any, error: OSError) -> None:
        self.handled.append(f"refused: {error.strerror}")
        self.done.set()


async def test_out_of_descriptors_the_reserve_accepts_and_is_taken_back(
    nursery: trio.Nursery,
) -> None:
    recorder = Recorder()
    loop = AcceptLoop(recorder.session, recorder.refusal, nursery)
    # EMFILE, and again once a connection is seen waiting: then the reserve is spent on it.
    listener = ScriptedListener(loop, errno.EMFILE, errno.EMFILE)
    with trio.fail_after(5):
        await nursery.start(loop.serve, [listener])
        await recorder.done.wait()
        await trio.testing.wait_all_tasks_blocked()
    assert listener.reserve_held[:3] == [True, True, False]
    assert recorder.handled == ["refused: Too many open files"]
    assert loop.reserve.held  # taken back once the refused connection was closed
    nursery.cancel_scope.cancel()


async def test_a_descriptor_freed_meanwhile_serves_the_waiting_connection(
    nursery: trio.Nursery,
) -> None:
    """EMFILE, but by the time a connection is there a session has ended: it is served, and
    the reserve stays untouched."""
    recorder = Recorder()
    loop = AcceptLoop(recorder.session, recorder.refusal, nursery)
    listener = ScriptedListener(loop, errno.EMFILE)
    with trio.fail_after(5):
        await nursery.start(loop.serve, [listener])
        await recorder.done.wait()
    assert recorder.handled == ["session"]
    assert listener.reserve_held[:2] == [True, True]
    assert loop.reserve.held
    nursery.cancel_scope.cancel()


async def test_no_memory_for_a_socket_is_waited_out(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """ENOBUFS: closing a descriptor would not help; wait, log once, accept again."""
    recorder = Recorder()
    loop = AcceptLoop(recorder.session, recorder.refusal, nursery)
    listener = ScriptedListener(loop, errno.ENOBUFS, errno.ENOBUFS)
    with capture_logs() as logs:
        started = trio.current_time()
        await nursery.start(loop.serve, [listener])
        await recorder.done.wait()
    assert trio.current_time() - started == pytest.approx(2 * RETRY_SECONDS)
    assert recorder.handled == ["session"]
    assert all(listener.reserve_held)  # never spent on it
    (failed,) = [line for line in logs if line["event"] == "accept_failed"]
    assert failed["error"] == "No buffer space available"
    nursery.cancel_scope.cancel()


async def test_refusals_are_rate_limited_per_reason(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A flood of one kind of refusal never hides the other kind's first line."""
    log = RefusalLog(interval=1.0)
    with capture_logs() as logs:
        log.refused("max_sessions")
        log.refused("max_sessions")
        log.refused("fd_exhausted")
        log.refused("fd_exhausted")
        await trio.sleep(1)
        log.refused("fd_exhausted")
    assert [(line["reason"], line["suppressed"]) for line in logs] == [
        ("max_sessions", 0),
        ("fd_exhausted", 0),
        ("fd_exhausted", 1),
    ]
