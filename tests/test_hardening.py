"""Core dumps off: a started bridge (and each of its workers) has a core size limit of 0 and is
not dumpable, unless it was started with ``--allow-core-dumps``.

The limit is read from outside, from ``/proc/PID/limits``. The dumpable flag shows nowhere in
``/proc/PID`` for a process running as root (``status`` has no line for it; the files' owner is
root either way), so it is read from the bridge's own log line, which reports what
PR_GET_DUMPABLE gives back; the function itself is checked in a process of its own.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.bridge_process import BridgeProcess

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture
def core_dumps_on() -> Iterator[int]:
    """Start the bridges with core dumps possible (soft limit = hard limit), so that what the
    bridge does to the limit shows; the test process's own limit is restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    assert hard != 0, "the hard core limit is 0 here: nothing could show the bridge lowering it"
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))


def core_limit(pid: int) -> tuple[str, str]:
    """(soft, hard) of "Max core file size" in /proc/PID/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            soft, hard = line.removeprefix("Max core file size").split()[:2]
            return soft, hard
    raise AssertionError(f"no core limit in /proc/{pid}/limits")


def start(tmp_path: Path, workers: int, *args: str) -> BridgeProcess:
    return BridgeProcess(
        tmp_path,
        listen="inet:127.0.0.1:0",
        args=["--workers", str(workers), "--log-level", "debug", *args],
        listening=workers,
    )


def serving(bridge: BridgeProcess, workers: int) -> list[int]:
    """The processes that serve: the bridge itself, or the workers it supervises."""
    if workers == 1:
        return [bridge.pid]
    return [line["pid"] for line in bridge.wait_for("worker_started", workers)]


@pytest.mark.usefixtures("core_dumps_on")
@pytest.mark.parametrize("workers", [1, 2])
def test_a_started_bridge_has_core_dumps_off(tmp_path: Path, workers: int) -> None:
    with start(tmp_path, workers) as bridge:
        pids = serving(bridge, workers)
        for pid in pids:
            assert core_limit(pid) == ("0", "0")
            # What monitoring and the integration tests read stays readable.
            assert "VmRSS" in Path(f"/proc/{pid}/status").read_text()
            assert Path(f"/proc/{pid}/stat").read_text().startswith(f"{pid} ")
        lines = bridge.events("core_dumps_disabled")
    # One line per process (a supervisor and its workers each turn them off for themselves).
    assert len(lines) == (1 if workers == 1 else workers + 1)
    for line in lines:
        assert (line["dumpable"], line["core_limit"]) == (False, [0, 0])
    assert not bridge.events("core_dumps_not_disabled")
    assert not bridge.events("core_dumps_allowed")


@pytest.mark.parametrize("workers", [1, 2])
def test_allow_core_dumps_leaves_both_alone(
    tmp_path: Path, workers: int, core_dumps_on: int
) -> None:
    inherited = "unlimited" if core_dumps_on == resource.RLIM_INFINITY else str(core_dumps_on)
    with start(tmp_path, workers, "--allow-core-dumps") as bridge:
        for pid in serving(bridge, workers):
            assert core_limit(pid) == (inherited, inherited)
        lines = bridge.events("core_dumps_allowed")
    assert len(lines) == (1 if workers == 1 else workers + 1)
    for line in lines:
        assert line["level"] == "info"
        assert (line["dumpable"], line["core_limit"]) == (True, [core_dumps_on] * 2)
    assert not bridge.events("core_dumps_disabled")


def test_disable_core_dumps_takes_in_a_process_of_its_own() -> None:
    """The function itself: both settings take, and PR_GET_DUMPABLE reports it."""
    code = (
        "import resource\n"
        "from milterbridge.hardening import disable_core_dumps, is_dumpable\n"
        "assert is_dumpable() is True\n"
        "assert disable_core_dumps() == []\n"
        "assert is_dumpable() is False\n"
        "assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
