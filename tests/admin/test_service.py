"""The admin listener inside the service: serve() starts it, the filter probe feeds it."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Callable

import httpx
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from milterbridge.admin import Readiness
from milterbridge.app import (
    REFRESH_SECONDS,
    RETRY_SECONDS,
    CannotListen,
    filter_health,
    serve,
    watch_filters,
)
from milterbridge.cli import main
from milterbridge.config import AdminConfig, Config, MilterFilter, ServerConfig
from milterbridge.metrics import Metrics
from milterbridge.server.filters import OptionsCache
from milterbridge.upstream import UpstreamFailure
from milterbridge.upstream.failure import FailureKind
from tests.fake_upstream import FakeUpstream, Peer, fake_upstream, handle

#: Built once: httpx would load the CA bundle for every client (plain HTTP needs none).
TLS = ssl.create_default_context()


async def healthy(peer: Peer) -> None:
    await peer.negotiate()


def config(admin: str, *ports: int) -> Config:
    return Config(
        server=ServerConfig(listen=["inet:127.0.0.1:0"]),
        admin=AdminConfig(listen=admin),
        milter=[
            MilterFilter(name=f"m{i}", hostname="127.0.0.1", port=port, timeout_connect=5)
            for i, port in enumerate(ports)
        ],
    )


async def until(condition: Callable[[], bool]) -> None:
    """Let the service run until ``condition`` holds (each pass waits for it to go quiet)."""
    while not condition():
        await trio.testing.wait_all_tasks_blocked(0.001)


def up(registry: CollectorRegistry, name: str) -> float | None:
    return registry.get_sample_value("milterbridge_filter_up", {"filter": name})


async def test_serve_starts_the_admin_listener_and_becomes_ready(nursery: trio.Nursery) -> None:
    """The reported admin address serves /metrics and /readyz; ready once the probe answered."""
    registry, readiness = CollectorRegistry(), Readiness()
    with trio.fail_after(10), capture_logs() as logs:
        async with fake_upstream(healthy) as milter:
            addresses = await nursery.start(
                lambda task_status: serve(
                    config("127.0.0.1:0", milter.port),
                    registry=registry,
                    readiness=readiness,
                    task_status=task_status,
                )
            )
            assert addresses.admin is not None
            assert addresses[0].startswith("inet:127.0.0.1:")
            await until(lambda: readiness.state("m0") != "unknown")
            async with httpx.AsyncClient(verify=TLS, base_url=f"http://{addresses.admin}") as http:
                ready = await http.get("/readyz")
                assert ready.status_code == 200, ready.text
                assert ready.json()["filters"]["m0"]["state"] == "reachable"
                scrape = await http.get("/metrics")
                assert 'milterbridge_filter_up{filter="m0"} 1.0' in scrape.text
    (listening,) = [line for line in logs if line["event"] == "listening"]
    assert listening["admin"] == addresses.admin
    assert listening["addresses"] == list(addresses)


async def test_serve_reports_a_filter_down_at_start(nursery: trio.Nursery) -> None:
    """A refused probe: unready with the reason, filter_up 0, one probe_failed line."""
    registry, readiness = CollectorRegistry(), Readiness()
    with trio.fail_after(10), capture_logs() as logs:
        await nursery.start(
            lambda task_status: serve(
                config("", closed_port()),
                registry=registry,
                readiness=readiness,
                task_status=task_status,
            )
        )
        await until(lambda: readiness.state("m0") != "unknown")
    report = readiness.report()
    assert not report.ready
    assert report.filters["m0"].state == "unreachable"
    assert report.filters["m0"].reason.startswith("refused: ")
    assert up(registry, "m0") == 0
    (failed,) = [line for line in logs if line["event"] == "probe_failed"]
    assert (failed["filter"], failed["kind"]) == ("m0", "refused")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_watch_retries_a_down_milter_and_refreshes_every_milter(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Down: probed again every RETRY_SECONDS; all up: every REFRESH_SECONDS."""
    reserved = trio.socket.socket()  # bound but not listening: connections are refused
    await reserved.bind(("127.0.0.1", 0))
    port = reserved.getsockname()[1]
    filters = [MilterFilter(name="m0", hostname="127.0.0.1", port=port)]
    send, receive = trio.open_memory_channel[tuple[float, str, bool]](10)

    def report(name: str, failure: UpstreamFailure | None) -> None:
        send.send_nowait((trio.current_time(), name, failure is None))

    cache: OptionsCache = {}
    nursery.start_soon(watch_filters, filters, cache, report)
    assert await receive.receive() == (0, "m0", False)
    assert await receive.receive() == (RETRY_SECONDS, "m0", False)
    reserved.listen(8)
    await nursery.start(serve_fake_milter, trio.SocketListener(reserved))
    assert await receive.receive() == (2 * RETRY_SECONDS, "m0", True)
    assert "m0" in cache
    assert await receive.receive() == (2 * RETRY_SECONDS + REFRESH_SECONDS, "m0", True)


async def serve_fake_milter(
    listener: trio.SocketListener, task_status: trio.TaskStatus[None]
) -> None:
    fake = FakeUpstream(port=listener.socket.getsockname()[1])

    async def connection(stream: trio.SocketStream) -> None:
        await handle(fake, healthy, stream)

    await trio.serve_listeners(connection, [listener], task_status=task_status)


def test_filter_health_logs_a_failure_and_a_recovery_once_each() -> None:
    """Repeated failed probes log one warning; the first success after them one info line."""
    registry, readiness = CollectorRegistry(), Readiness(["m0"])
    report = filter_health(Metrics(registry, ["m0"]), readiness)
    failure = UpstreamFailure(FailureKind.REFUSED, "m0", "optneg", "connection refused")
    with capture_logs() as logs:
        report("m0", failure)
        report("m0", failure)
        report("m0", None)
        report("m0", None)
    assert [(line["event"], line["log_level"]) for line in logs] == [
        ("probe_failed", "warning"),
        ("filter_reachable", "info"),
    ]
    assert up(registry, "m0") == 1
    assert readiness.state("m0") == "reachable"


async def test_empty_admin_listen_turns_the_listener_off(nursery: trio.Nursery) -> None:
    """listen = "" serves no HTTP; serve reports no admin address."""
    with trio.fail_after(10):
        addresses = await nursery.start(serve, config(""))
    assert addresses.admin is None
    assert len(addresses) == 1


async def test_admin_port_taken_fails_serve_and_frees_the_milter_port() -> None:
    """An admin address that cannot be bound is an OSError; the milter listener is closed."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        admin = f"127.0.0.1:{taken.getsockname()[1]}"
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            milter_port = free.getsockname()[1]
        cfg = Config(
            server=ServerConfig(listen=[f"inet:127.0.0.1:{milter_port}"]),
            admin=AdminConfig(listen=admin),
        )
        with trio.fail_after(10), pytest.raises(ExceptionGroup) as raised:
            await serve(cfg)
        assert raised.group_contains(CannotListen, match=f"^admin {admin}: ")
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", milter_port))  # free again: serve closed its listener


def test_cli_refuses_a_bad_admin_listen(capsys: pytest.CaptureFixture[str]) -> None:
    """--admin-listen is checked like [admin] listen, before anything starts."""
    # In-process runs keep core dumps on: turning them off would turn them off for pytest (and,
    # through the hard limit, for every process it starts from then on).
    assert main(["run", "--admin-listen", "8900", "--allow-core-dumps"]) == 2
    assert "--admin-listen '8900': expected HOST:PORT" in capsys.readouterr().err


def test_cli_reports_a_taken_port_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A listener that cannot be bound ends the run with exit 1 and a cannot_listen line."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        admin = f"127.0.0.1:{taken.getsockname()[1]}"
        argv = ["run", "--listen", "inet:127.0.0.1:0", "--admin-listen", admin]
        argv.append("--allow-core-dumps")  # in-process: see test_cli_refuses_a_bad_admin_listen
        assert main([*argv, "--log-format", "json"]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    (line,) = [line for line in lines if line["event"] == "cannot_listen"]
    assert line["error"].startswith(f"admin {admin}: ")
    assert "Traceback" not in json.dumps(lines)
