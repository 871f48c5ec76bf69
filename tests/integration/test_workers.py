"""``--workers N`` end to end: one port, N processes, a supervisor that restarts and stops them.

Every worker logs its ``worker_index`` on every line, so the ``session_end`` lines tell which
worker served each connection.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from milterbridge.milter import OptNegReply, Quit

from .bridge_process import BridgeProcess
from .mta_driver import POSTFIX_OFFER, exchange, open_mta

#: Connections made to see both workers serve: the kernel hashes each connection to a worker, so
#: with 2 workers all of them landing on one has probability 2 ** -39.
CONNECTIONS = 40


async def served(address: str, count: int) -> None:
    """``count`` MTA sessions one after the other, each negotiated and ended with QUIT."""
    for _ in range(count):
        mta = await open_mta(address)
        (reply,) = await exchange(mta, POSTFIX_OFFER)
        assert isinstance(reply, OptNegReply)
        await exchange(mta, Quit())
        await mta.aclose()


def workers(tmp_path: Path, listen: str, args: list[str]) -> BridgeProcess:
    """Two workers: started when both log ``listening`` (imports take seconds on a busy host)."""
    return BridgeProcess(
        tmp_path / "bridge", listen=listen, args=args, listening=2, start_timeout=60
    )


def workers_of(bridge: BridgeProcess, event: str = "session_end") -> set[int]:
    return {line["worker_index"] for line in bridge.events(event)}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def consecutive_free_ports() -> int:
    """A port P with P + 1 free as well (for the admin listeners of two workers)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port < 65535:
            with socket.socket() as following:
                try:
                    following.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port


async def test_two_workers_share_port_zero_and_both_serve(tmp_path: Path) -> None:
    """Port 0 is resolved once for both; sessions land on both; admin ports are base + index."""
    admin = consecutive_free_ports()
    args = ["--workers", "2", "--admin-listen", f"127.0.0.1:{admin}"]
    with workers(tmp_path, "inet:127.0.0.1:0", args) as bridge:
        listening = bridge.events("listening")
        (address,) = {line["addresses"][0] for line in listening}
        assert not address.endswith(":0")
        assert {line["worker_index"]: line["admin"] for line in listening} == {
            0: f"127.0.0.1:{admin}",
            1: f"127.0.0.1:{admin + 1}",
        }
        await served(address, CONNECTIONS)
        await bridge.until_logged("session_end", CONNECTIONS)
        assert workers_of(bridge) == {0, 1}
        assert bridge.stop() == 0


async def test_a_killed_worker_is_restarted_and_the_port_keeps_serving(tmp_path: Path) -> None:
    with workers(tmp_path, "inet:127.0.0.1:0", ["--workers", "2"]) as bridge:
        address = bridge.address()
        await bridge.until_logged("worker_ready", 2)
        victim = next(line for line in bridge.events("worker_started") if line["worker_index"] == 0)
        os.kill(victim["pid"], signal.SIGKILL)
        (died,) = await bridge.until_logged("worker_died")
        assert (died["worker_index"], died["pid"], died["signal"]) == (0, victim["pid"], "SIGKILL")
        await served(address, 5)  # worker 1 serves alone meanwhile
        restarted = (await bridge.until_logged("worker_started", 3))[-1]
        assert restarted["worker_index"] == 0
        assert restarted["pid"] != victim["pid"]
        await bridge.until_logged("worker_ready", 3, within=30)
        await served(address, CONNECTIONS)
        ends = await bridge.until_logged("session_end", 5 + CONNECTIONS)
        assert {line["worker_index"] for line in ends[5:]} == {0, 1}
        assert bridge.stop() == 0


async def test_sigterm_stops_every_worker_and_exits_0(tmp_path: Path) -> None:
    """SIGTERM (and before it a SIGHUP) reach every worker; the parent waits for them."""
    config = tmp_path / "bridge.toml"
    config.write_text('[server]\ndrainDeadline = "5s"\n')
    args = ["--workers", "2", "--config", str(config)]
    with workers(tmp_path, "inet:127.0.0.1:0", args) as bridge:
        await bridge.until_logged("worker_ready", 2)
        pids = [line["pid"] for line in bridge.events("worker_started")]
        bridge.send_signal(signal.SIGHUP)
        await bridge.until_logged("config_reloaded", 2)
        assert workers_of(bridge, "config_reloaded") == {0, 1}
        bridge.send_signal(signal.SIGTERM)
        assert bridge.wait(30) == 0
    assert not any(alive(pid) for pid in pids)
    exited = bridge.events("worker_exited")
    assert sorted((line["worker_index"], line["exit_code"]) for line in exited) == [(0, 0), (1, 0)]
    assert workers_of(bridge, "draining") == {0, 1}
    last = bridge.logs()[-1]
    assert last["event"] == "stopped"
    assert "worker_index" not in last  # the supervisor's own line, after its workers'


async def test_workers_share_a_unix_listener(tmp_path: Path) -> None:
    """The supervisor binds the socket and passes it down: every connection is served."""
    with workers(tmp_path, f"unix:{tmp_path}/milter.sock", ["--workers", "2"]) as bridge:
        assert {line["addresses"][0] for line in bridge.events("listening")} == {
            f"unix:{tmp_path}/milter.sock"
        }
        await served(bridge.listen, 10)
        await bridge.until_logged("session_end", 10)
        assert bridge.stop() == 0


def test_a_taken_port_stops_the_supervisor_before_any_worker(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        spec = f"inet:127.0.0.1:{taken.getsockname()[1]}"
        bridge = BridgeProcess(tmp_path / "bridge", listen=spec, args=["--workers", "2"])
        try:
            bridge.start(timeout=10)
        except AssertionError:
            pass  # it never listens
        assert bridge.wait(10) == 1
    (line,) = bridge.events("cannot_listen")
    assert line["error"].startswith(f"{spec}: ")
    assert not bridge.events("worker_started")


def test_more_workers_than_admin_ports_is_a_usage_error(tmp_path: Path) -> None:
    bridge = BridgeProcess(
        tmp_path / "bridge", args=["--workers", "3", "--admin-listen", "127.0.0.1:65534"]
    )
    try:
        bridge.start(timeout=10)
    except AssertionError:
        pass
    assert bridge.wait(10) == 2
    assert "above 65535" in bridge.log_path.read_text()
