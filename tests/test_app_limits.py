"""``maxSessions``: a connection beyond it is answered TEMPFAIL at CONNECT, no upstream contacted.

The service runs in-process on a loopback listener with a scripted milter behind it that wants
CONNECT (``stages = ["connect"]``), so a served session reaches the milter at CONNECT and a
refused one must not; time is virtual (autojump_clock).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from milterbridge.app import Service
from milterbridge.config import (
    AdminConfig,
    Config,
    ConfigError,
    MilterFilter,
    ServerConfig,
    parse_config,
)
from milterbridge.milter import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    CLOSED,
    Action,
    Connect,
    Connection,
    Continue,
    Family,
    Helo,
    OptNeg,
    OptNegReply,
    Protocol,
    Quit,
    Role,
    Tempfail,
)
from milterbridge.server.refuse import REFUSE_PROTOCOL, REFUSE_SECONDS, RefusalLog, refuse_session
from milterbridge.transport import MilterStream
from tests.fake_upstream import FakeUpstream, Peer, fake_upstream
from tests.integration.bridge_process import BridgeProcess
from tests.integration.mta_driver import POSTFIX_OFFER, exchange, open_mta
from tests.integration.postfix_harness import PostfixInstance, make_message, require_postfix

CONNECT = Connect(b"client.test", Family.INET, 4000, b"192.0.2.1")


class Recorder:
    """A milter that answers CONTINUE to everything and records each CONNECT it gets."""

    def __init__(self) -> None:
        self.connects = 0

    async def __call__(self, peer: Peer) -> None:
        await peer.negotiate()
        while not isinstance(message := await peer.receive(), Quit):
            if isinstance(message, Connect):
                self.connects += 1
            if peer.codec.awaiting is not None:
                await peer.reply(Continue())


def limited(milter: FakeUpstream, max_sessions: int) -> Config:
    return Config(
        server=ServerConfig(listen=["inet:127.0.0.1:0"], max_sessions=max_sessions),
        admin=AdminConfig(listen=""),
        milter=[MilterFilter(name="m", hostname="127.0.0.1", port=milter.port, stages=["connect"])],
    )


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await trio.testing.wait_all_tasks_blocked(0.001)


async def connect(address: str) -> tuple[MilterStream, OptNegReply, list[Any]]:
    """An MTA that negotiates and sends CONNECT; returns the OPTNEG answer and CONNECT's replies."""
    mta = await open_mta(address)
    (negotiated,) = await exchange(mta, POSTFIX_OFFER)
    assert isinstance(negotiated, OptNegReply)
    return mta, negotiated, await exchange(mta, CONNECT)


def limit_hits(registry: CollectorRegistry, limit: str) -> float | None:
    return registry.get_sample_value("milterbridge_limit_hits_total", {"limit": limit})


async def test_the_session_beyond_the_limit_is_tempfailed_at_connect(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Limit 2: the third MTA gets TEMPFAIL at CONNECT and the milter never hears of it; when
    one of the first two ends, the next MTA is served again."""
    recorder, registry = Recorder(), CollectorRegistry()
    with capture_logs() as logs:
        async with fake_upstream(recorder) as milter:
            service = Service(limited(milter, 2), registry=registry)
            (address,) = await nursery.start(service.run)
            first, _, first_replies = await connect(address)
            second, _, second_replies = await connect(address)
            assert first_replies == second_replies == [Continue()]
            assert service.open_sessions == 2

            third, refusal, third_replies = await connect(address)
            assert third_replies == [Tempfail()]
            assert refusal.actions == Action.NONE
            assert refusal.protocol == REFUSE_PROTOCOL  # Postfix offers every step flag
            assert not refusal.protocol & Protocol.NOCONNECT
            await third.aclose()
            assert recorder.connects == 2
            assert service.open_sessions == 2

            # The served sessions go on as if nothing happened.
            assert await exchange(first, Helo(b"client.test")) == [Continue()]
            await first.send(Quit())
            await first.aclose()
            await until(lambda: service.open_sessions == 1)

            fourth, _, fourth_replies = await connect(address)
            assert fourth_replies == [Continue()]
            assert recorder.connects == 3
            for mta in (second, fourth):
                await mta.send(Quit())
                await mta.aclose()
            await until(lambda: service.open_sessions == 0)
    assert limit_hits(registry, "max_sessions") == 1
    (refused,) = [line for line in logs if line["event"] == "session_refused"]
    assert refused["log_level"] == "warning"
    assert (refused["reason"], refused["limit"], refused["suppressed"]) == ("max_sessions", 2, 0)
    ends = [line for line in logs if line["event"] == "session_end"]
    assert len(ends) == 3  # a refusal is not a session


async def test_a_flood_of_refusals_logs_one_line_a_second(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Every refusal is counted; the log says one line per second, with how many it left out."""
    registry = CollectorRegistry()
    with capture_logs() as logs:
        async with fake_upstream(Recorder()) as milter:
            service = Service(limited(milter, 1), registry=registry)
            (address,) = await nursery.start(service.run)
            served, _, _ = await connect(address)
            for _ in range(5):
                mta, _, replies = await connect(address)
                assert replies == [Tempfail()]
                await mta.aclose()
            await trio.sleep(1)
            mta, _, replies = await connect(address)
            assert replies == [Tempfail()]
            await mta.aclose()
            await served.aclose()
    assert limit_hits(registry, "max_sessions") == 6
    refused = [line for line in logs if line["event"] == "session_refused"]
    assert [line["suppressed"] for line in refused] == [0, 4]


async def test_refusal_log_interval(autojump_clock: trio.testing.MockClock) -> None:
    """The suppressed count covers exactly the refusals since the previous line."""
    log = RefusalLog(interval=1.0)
    with capture_logs() as logs:
        for _ in range(3):
            log.refused("max_sessions")
        await trio.sleep(0.5)
        log.refused("max_sessions")
        await trio.sleep(0.5)
        log.refused("max_sessions")
        log.refused("max_sessions")
    assert [line["suppressed"] for line in logs] == [0, 3]


async def refusal_pair() -> tuple[MilterStream, trio.abc.Stream]:
    mta_stream, bridge_stream = trio.testing.memory_stream_pair()
    return MilterStream(mta_stream, Connection(Role.MTA)), bridge_stream


async def test_refusal_of_an_mta_that_does_not_hang_up(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """After REFUSE_SECONDS the refusal closes the connection itself."""
    mta, stream = await refusal_pair()
    done: list[bool] = []

    async def refuse() -> None:
        done.append(await refuse_session(stream))

    nursery.start_soon(refuse)
    await exchange(mta, OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
    assert await exchange(mta, CONNECT) == [Tempfail()]
    started = trio.current_time()
    assert await mta.receive() is CLOSED
    assert trio.current_time() - started == pytest.approx(REFUSE_SECONDS)
    await trio.testing.wait_all_tasks_blocked()
    assert done == [True]


async def test_refusal_of_a_sendmail_that_says_quit(nursery: trio.Nursery) -> None:
    """Sendmail sends QUIT after a refused CONNECT: the refusal ends there."""
    mta, stream = await refusal_pair()
    done: list[bool] = []

    async def refuse() -> None:
        done.append(await refuse_session(stream))

    nursery.start_soon(refuse)
    # Sendmail offers no step flags (protocol 0 reads as the version 1 set).
    (negotiated,) = await exchange(mta, OptNeg(6, ALL_ACTIONS, Protocol.NONE))
    assert isinstance(negotiated, OptNegReply)
    assert await exchange(mta, CONNECT) == [Tempfail()]
    await mta.send(Quit())
    with trio.fail_after(1):
        assert await mta.receive() is CLOSED
    await trio.testing.wait_all_tasks_blocked()
    assert done == [True]


async def test_refusal_of_a_peer_that_breaks_the_protocol(nursery: trio.Nursery) -> None:
    """Garbage: the connection is dropped, no TEMPFAIL was sent."""
    mta_stream, stream = trio.testing.memory_stream_pair()
    done: list[bool] = []

    async def refuse() -> None:
        done.append(await refuse_session(stream))

    nursery.start_soon(refuse)
    await mta_stream.send_all(b"\x00\x00\x00\x01Z")  # an unknown command
    with trio.fail_after(1):
        assert await mta_stream.receive_some(100) == b""
    await trio.testing.wait_all_tasks_blocked()
    assert done == [False]


def test_max_sessions_is_at_least_one() -> None:
    """``maxSessions = 0`` would refuse every session: the file is refused instead."""
    path = Path("bridge.toml")
    assert parse_config(b"[server]\nmaxSessions = 5\n", path).server.max_sessions == 5
    with pytest.raises(ConfigError, match=r"server\.maxSessions"):
        parse_config(b"[server]\nmaxSessions = 0\n", path)
    deadline = parse_config(b'[server]\ndrainDeadline = "2m"\n', path).server.drain_deadline
    assert float(deadline) == 120


def test_postfix_tells_the_client_to_come_back_later(tmp_path: Path) -> None:
    """Real Postfix with maxSessions = 1: while one SMTP session holds the only milter session,
    a second client is greeted but its MAIL gets a 4xx, and nothing is delivered for it."""
    require_postfix()
    config = tmp_path / "bridge.toml"
    config.write_text("[server]\nmaxSessions = 1\n")
    with (
        BridgeProcess(tmp_path / "bridge", args=["--config", str(config)]) as bridge,
        PostfixInstance(tmp_path, milters=[bridge.listen]) as postfix,
    ):
        with postfix.session() as holder:
            # The first SMTP session holds the only milter session the bridge serves.
            with postfix.session("second.test") as second:
                refused = second.send("a@sender.test", ["b@rcpt.test"], make_message([], b"x\r\n"))
            assert not refused.accepted
            assert refused.mail.code == 451, refused
            accepted = holder.send("a@sender.test", ["b@rcpt.test"], make_message([], b"y\r\n"))
            assert accepted.accepted, accepted
        (refusal,) = bridge.wait_for("session_refused")
        assert refusal["reason"] == "max_sessions"
