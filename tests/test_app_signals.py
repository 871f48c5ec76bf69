"""What SIGTERM/SIGINT and SIGHUP do to a running service: drain, deadline, reload.

In-process: the service runs in the test's nursery on loopback listeners, the MTAs are our codec,
the milters scripted fakes; the signals are the functions the signal handler calls
(``Service.stop``, ``Service.reload``). One subprocess test sends a real SIGTERM.
"""

from __future__ import annotations

import signal
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from milterbridge import app
from milterbridge.app import ABANDON_SECONDS, ConfigSource, Service, ServiceAddresses
from milterbridge.config import AdminConfig, Config, ConfigError, MilterFilter, ServerConfig
from milterbridge.durations import Duration
from milterbridge.milter import (
    CLOSED,
    Connect,
    Continue,
    Family,
    Helo,
    OptNegReply,
    Quit,
    Tempfail,
)
from milterbridge.transport import MilterStream
from tests.fake_upstream import Peer, fake_upstream
from tests.integration.bridge_process import BridgeProcess
from tests.integration.mta_driver import POSTFIX_OFFER, exchange, open_mta

CONNECT = Connect(b"client.test", Family.INET, 4000, b"192.0.2.1")
TLS = ssl.create_default_context()


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await trio.testing.wait_all_tasks_blocked(0.001)


class Running:
    """A service started in a nursery; ``ended`` is set when ``run`` returned."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.ended = trio.Event()
        self.addresses = ServiceAddresses([], None)

    async def start(self, nursery: trio.Nursery) -> Running:
        async def run(task_status: trio.TaskStatus[ServiceAddresses]) -> None:
            await self.service.run(task_status=task_status)
            self.ended.set()

        self.addresses = await nursery.start(run)
        return self

    async def mta(self, *commands: Any) -> MilterStream:
        """An MTA connected and negotiated, then sent ``commands`` (each answered)."""
        mta = await open_mta(self.addresses[0])
        (reply,) = await exchange(mta, POSTFIX_OFFER)
        assert isinstance(reply, OptNegReply)
        for command in commands:
            await exchange(mta, command)
        return mta


def plain(**server: Any) -> Config:
    return Config(
        server=ServerConfig(listen=["inet:127.0.0.1:0"], **server), admin=AdminConfig(listen="")
    )


def limit_hits(registry: CollectorRegistry, limit: str) -> float | None:
    return registry.get_sample_value("milterbridge_limit_hits_total", {"limit": limit})


# --- drain ------------------------------------------------------------------------------------


async def test_stop_closes_the_listeners_and_lets_sessions_finish(nursery: trio.Nursery) -> None:
    """After stop: no new connection, /readyz 503, the open session goes on until it quits."""
    registry = CollectorRegistry()
    config = Config(
        server=ServerConfig(listen=["inet:127.0.0.1:0"]),
        admin=AdminConfig(listen="127.0.0.1:0"),
    )
    with trio.fail_after(10), capture_logs() as logs:
        running = await Running(Service(config, registry=registry)).start(nursery)
        mta = await running.mta()
        running.service.stop()
        await until(lambda: not running.service.readiness.listening)
        host, port = running.addresses[0].removeprefix("inet:").rsplit(":", 1)
        with pytest.raises(OSError):
            await trio.open_tcp_stream(host, int(port))
        async with httpx.AsyncClient(verify=TLS, base_url=f"http://{running.addresses.admin}") as h:
            ready = await h.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["listening"] is False
        assert not running.ended.is_set()
        assert await exchange(mta, Quit()) == []
        await mta.aclose()
        await running.ended.wait()
    (draining,) = [line for line in logs if line["event"] == "draining"]
    assert (draining["sessions"], draining["deadline"]) == (1, 30.0)
    assert not [line for line in logs if line["event"] == "drain_abandoned"]
    assert limit_hits(registry, "drain_deadline") == 0


async def _thinks_forever_at_connect(peer: Peer) -> None:
    await peer.negotiate()
    message = await peer.receive()
    if isinstance(message, Connect):
        await trio.sleep_forever()  # else the probe's QUIT


async def test_the_drain_deadline_abandons_what_is_left(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """At the deadline a step in progress is answered TEMPFAIL and an idle session closed."""
    registry = CollectorRegistry()
    with capture_logs() as logs:
        async with fake_upstream(_thinks_forever_at_connect) as milter:
            config = Config(
                server=ServerConfig(listen=["inet:127.0.0.1:0"], drain_deadline=Duration(10)),
                admin=AdminConfig(listen=""),
                milter=[
                    MilterFilter(
                        name="slow", hostname="127.0.0.1", port=milter.port, stages=["connect"]
                    )
                ],
            )
            running = await Running(Service(config, registry=registry)).start(nursery)
            idle = await running.mta()
            busy = await running.mta()
            await busy.send(CONNECT)
            await trio.sleep(1)  # the milter thinks
            stopped_at = trio.current_time()
            running.service.stop()
            assert await busy.receive() == Tempfail()
            assert trio.current_time() - stopped_at == pytest.approx(10)
            assert await busy.receive() is CLOSED
            assert await idle.receive() is CLOSED
            await running.ended.wait()
            assert trio.current_time() - stopped_at < 10 + ABANDON_SECONDS
            await idle.aclose()
            await busy.aclose()
    assert limit_hits(registry, "drain_deadline") == 2
    (abandoned,) = [line for line in logs if line["event"] == "drain_abandoned"]
    assert (abandoned["sessions"], abandoned["reason"]) == (2, "drain_deadline")
    ends = [line for line in logs if line["event"] == "session_end"]
    assert [line["outcome"] for line in ends] == ["abandoned", "abandoned"]


async def test_a_second_stop_skips_the_wait(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The second SIGTERM: whatever is open is abandoned now, not at the deadline."""
    with capture_logs() as logs:
        running = await Running(Service(plain())).start(nursery)
        idle = await running.mta()
        stopped_at = trio.current_time()
        running.service.stop()
        await trio.sleep(2)
        assert running.service.open_sessions == 1
        running.service.stop()
        assert await idle.receive() is CLOSED
        await idle.aclose()
        await running.ended.wait()
        assert trio.current_time() - stopped_at == pytest.approx(2)
    (abandoned,) = [line for line in logs if line["event"] == "drain_abandoned"]
    assert abandoned["reason"] == "second_signal"


async def test_stop_with_nothing_open_ends_at_once(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        running = await Running(Service(plain())).start(nursery)
        running.service.stop()
        await running.ended.wait()


class FakeService:
    """What the signal handler calls, recorded."""

    def __init__(self) -> None:
        self.stops = 0
        self.reloads = 0
        self.open_sessions = 0

    @property
    def stopping(self) -> bool:
        return self.stops > 0

    def stop(self) -> None:
        self.stops += 1

    def reload(self) -> bool:
        self.reloads += 1
        return True


@pytest.mark.parametrize("worker", [False, True])
async def test_signals_map_to_stop_and_reload(
    worker: bool, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """SIGHUP reloads, SIGTERM/SIGINT stop. A worker takes a stop signal that follows another
    within a second for the same one (the supervisor and a service manager may both send it)."""
    send, receive = trio.open_memory_channel[int](10)
    service = FakeService()
    nursery.start_soon(app._obey, receive, service, worker)
    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        send.send_nowait(signum)
    await trio.testing.wait_all_tasks_blocked()
    assert (service.reloads, service.stops) == (1, 1 if worker else 2)
    await trio.sleep(app.DUPLICATE_SIGNAL_SECONDS)
    send.send_nowait(signal.SIGTERM)
    await trio.testing.wait_all_tasks_blocked()
    assert service.stops == (2 if worker else 3)


# --- reload -----------------------------------------------------------------------------------


class Counting:
    """A milter that answers CONTINUE to everything and counts what it is sent."""

    def __init__(self) -> None:
        self.negotiations = 0
        self.seen: list[str] = []

    async def __call__(self, peer: Peer) -> None:
        await peer.negotiate()
        self.negotiations += 1
        while not isinstance(message := await peer.receive(), Quit):
            self.seen.append(type(message).__name__)
            if peer.codec.awaiting is not None:
                await peer.reply(Continue())


def milter_toml(name: str, port: int) -> str:
    return (
        f'[[milter]]\nname = "{name}"\nhostname = "127.0.0.1"\nport = {port}\n'
        'stages = ["connect"]\n'
    )


def write(path: Path, *parts: str, listen: str = "inet:127.0.0.1:0") -> Path:
    path.write_text(f'[server]\nlisten = ["{listen}"]\n[admin]\nlisten = ""\n' + "".join(parts))
    return path


def series(registry: CollectorRegistry, name: str) -> float | None:
    """One per-filter series (created at zero when the filter is added)."""
    return registry.get_sample_value(
        "milterbridge_filter_errors_total", {"filter": name, "kind": "refused"}
    )


async def test_reload_runs_new_sessions_on_the_new_filters(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """New sessions get the new filter set; a session opened before keeps the one it started
    with; a removed filter's series stay until that session ends."""
    one, two = Counting(), Counting()
    registry = CollectorRegistry()
    with trio.fail_after(10), capture_logs() as logs:
        async with fake_upstream(one) as m1, fake_upstream(two) as m2:
            path = write(tmp_path / "bridge.toml", milter_toml("m1", m1.port))
            source = ConfigSource(path)
            service = Service(source.load(), source=source, registry=registry)
            running = await Running(service).start(nursery)
            before = await running.mta(CONNECT)
            assert one.seen == ["Connect"]

            write(path, milter_toml("m2", m2.port))
            assert service.reload()
            after = await running.mta(CONNECT)
            assert two.seen == ["Connect"]
            assert one.seen == ["Connect"]
            await exchange(before, Helo(b"before.test"))
            await exchange(after, Helo(b"after.test"))
            assert one.seen == ["Connect", "Helo"]
            assert two.seen == ["Connect", "Helo"]

            assert list(service.readiness.report().filters) == ["m2"]
            assert series(registry, "m2") == 0
            assert series(registry, "m1") == 0  # still used by the session opened before
            for mta in (before, after):
                await exchange(mta, Quit())
                await mta.aclose()
            await until(lambda: service.open_sessions == 0)
            assert series(registry, "m1") is None
            await until(lambda: service.readiness.state("m2") == "reachable")
    (reloaded,) = [line for line in logs if line["event"] == "config_reloaded"]
    assert reloaded["filters"] == ["m2"]
    assert (reloaded["added"], reloaded["removed"], reloaded["changed"]) == (["m2"], ["m1"], [])


async def test_a_broken_file_is_refused_and_the_old_config_stays(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    counting = Counting()
    with trio.fail_after(10), capture_logs() as logs:
        async with fake_upstream(counting) as m1:
            path = write(tmp_path / "bridge.toml", milter_toml("m1", m1.port))
            source = ConfigSource(path)
            service = Service(source.load(), source=source)
            running = await Running(service).start(nursery)
            old = service.config
            path.write_text("[server\n")
            assert not service.reload()
            assert service.config is old
            mta = await running.mta(CONNECT)
            assert counting.seen == ["Connect"]
            await mta.aclose()
    (failed,) = [line for line in logs if line["event"] == "config_reload_failed"]
    assert failed["log_level"] == "error"
    assert failed["error"].startswith(f"{path}: ")
    assert not [line for line in logs if line["event"] == "config_reloaded"]


async def test_listener_changes_wait_for_a_restart(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A new listen list is named in config_reload_partial; the rest of the file applies."""
    counting = Counting()
    with trio.fail_after(10), capture_logs() as logs:
        async with fake_upstream(counting) as m1:
            path = write(tmp_path / "bridge.toml")
            source = ConfigSource(path)
            service = Service(source.load(), source=source)
            running = await Running(service).start(nursery)
            write(path, milter_toml("m1", m1.port), listen="inet:127.0.0.1:1")
            assert service.reload()
            assert service.config.server.listen == ["inet:127.0.0.1:0"]
            mta = await running.mta(CONNECT)  # the old listener, the new filter
            assert counting.seen == ["Connect"]
            await mta.aclose()
    (partial,) = [line for line in logs if line["event"] == "config_reload_partial"]
    assert partial["not_applied"] == ["server.listen"]
    (reloaded,) = [line for line in logs if line["event"] == "config_reloaded"]
    assert reloaded["filters"] == ["m1"]


async def test_a_milter_that_moved_is_probed_afresh(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Its cached options belong to the old address: dropped, and the new address probed. A
    change of its timeouts alone keeps what is known about it."""
    old, new = Counting(), Counting()
    with trio.fail_after(10):
        async with fake_upstream(old) as first, fake_upstream(new) as second:
            path = write(tmp_path / "bridge.toml", milter_toml("m1", first.port))
            source = ConfigSource(path)
            service = Service(source.load(), source=source)
            await Running(service).start(nursery)
            await until(lambda: service.readiness.state("m1") == "reachable")
            write(path, milter_toml("m1", first.port), 'timeoutCommand = "5s"\n')
            assert service.reload()  # a changed timeout: still the same milter
            assert service.readiness.state("m1") == "reachable"
            write(path, milter_toml("m1", second.port))
            assert service.reload()
            assert service.readiness.state("m1") == "unknown"
            await until(lambda: new.negotiations == 1)
            await until(lambda: service.readiness.state("m1") == "reachable")


async def test_reload_without_a_file_has_nothing_to_read(nursery: trio.Nursery) -> None:
    with trio.fail_after(10), capture_logs() as logs:
        service = Service(plain(), source=ConfigSource(None))
        await Running(service).start(nursery)
        assert not service.reload()
    (skipped,) = [line for line in logs if line["event"] == "config_reload_skipped"]
    assert skipped["reason"] == "no config file: nothing to reload"


# --- a real SIGTERM ---------------------------------------------------------------------------


async def test_sigterm_drains_then_exits_0(tmp_path: Path) -> None:
    """``python -m milterbridge run``: SIGTERM with a session open, drain deadline 1 s: the
    session is abandoned, the process logs draining, drain_abandoned and stopped, and exits 0."""
    config = tmp_path / "bridge.toml"
    config.write_text('[server]\ndrainDeadline = "1s"\n')
    with BridgeProcess(tmp_path / "bridge", args=["--config", str(config)]) as bridge:
        mta = await open_mta(bridge.listen)
        await exchange(mta, POSTFIX_OFFER)
        bridge.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await mta.receive() is CLOSED
        await mta.aclose()
        assert bridge.wait(10) == 0
    events = [line["event"] for line in bridge.logs()]
    assert events.index("stopping") < events.index("draining") < events.index("drain_abandoned")
    assert events[-1] == "stopped"
    (draining,) = bridge.events("draining")
    assert (draining["sessions"], draining["deadline"]) == (1, 1.0)


def test_the_command_line_applies_at_every_load(tmp_path: Path) -> None:
    """--listen and --admin-listen (and a worker's admin port offset) override the file each
    time it is read, so a reload never sees them as a change of the file."""
    path = write(tmp_path / "bridge.toml", listen="inet:127.0.0.1:7000")
    source = ConfigSource(
        path, listen=("inet:127.0.0.1:9000",), admin_listen="[::1]:8900", admin_offset=2
    )
    for _ in range(2):
        config = source.load()
        assert config.server.listen == ["inet:127.0.0.1:9000"]
        assert config.admin.listen == "[::1]:8902"
    assert ConfigSource(path).load().server.listen == ["inet:127.0.0.1:7000"]
    assert app.offset_port("127.0.0.1:0", 3) == "127.0.0.1:0"  # any free port, per worker
    with pytest.raises(ConfigError, match="above 65535"):
        app.offset_port("127.0.0.1:65535", 1)
