"""The circuit breaker's states, on trio's virtual clock."""

from __future__ import annotations

import trio
import trio.testing
from structlog.testing import capture_logs

from milterbridge.server.circuit import CircuitBreakers


def _breakers(reports: list[tuple[str, bool]]) -> CircuitBreakers:
    return CircuitBreakers(
        failures=3, backoff=10, backoff_max=25, report=lambda n, o: reports.append((n, o))
    )


async def test_opens_after_consecutive_failures_and_probes_once_after_the_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reports: list[tuple[str, bool]] = []
    breakers = _breakers(reports)
    with capture_logs() as logs:
        for _ in range(2):
            breakers.failed("scan")
        assert breakers.admit("scan") and not breakers.is_open("scan")
        breakers.failed("scan")
        assert breakers.is_open("scan") and not breakers.admit("scan")
        await trio.sleep(9.9)
        assert not breakers.admit("scan")
        await trio.sleep(0.2)
        assert breakers.admit("scan")  # the one half-open attempt
        assert not breakers.admit("scan")  # nobody else meanwhile
        breakers.succeeded("scan")
        assert not breakers.is_open("scan") and breakers.admit("scan")
    assert reports == [("scan", True), ("scan", False)]
    events = [line["event"] for line in logs]
    assert events == ["circuit_opened", "circuit_probe", "circuit_closed"]


async def test_a_failed_probe_doubles_the_backoff_up_to_the_maximum(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breakers = _breakers([])
    for _ in range(3):
        breakers.failed("scan")
    for wait in (10, 20, 25, 25):
        await trio.sleep(wait - 0.1)
        assert not breakers.admit("scan")
        await trio.sleep(0.1)
        assert breakers.admit("scan")
        breakers.failed("scan")


async def test_a_success_resets_the_count(autojump_clock: trio.testing.MockClock) -> None:
    breakers = _breakers([])
    for _ in range(5):
        breakers.failed("scan")
        breakers.failed("scan")
        breakers.succeeded("scan")
    assert not breakers.is_open("scan")
    assert breakers.admit("other")


async def test_a_lost_probe_does_not_keep_the_circuit_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breakers = _breakers([])
    for _ in range(3):
        breakers.failed("scan")
    await trio.sleep(10)
    assert breakers.admit("scan")  # and its session vanishes: neither success nor failure
    await trio.sleep(9)
    assert not breakers.admit("scan")
    await trio.sleep(1)
    assert breakers.admit("scan")


async def test_connections_one_crash_dropped_count_as_one_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A filter that crashes drops all its connections at once and the sessions notice one by
    one: one incident, which must not open the circuit of a filter that is back at once. Failed
    connections opened after that incident count again, one each."""
    breakers = _breakers([])
    opened = trio.current_time()
    await trio.sleep(1)
    for _ in range(5):
        breakers.failed("scan", connected_at=opened)
        await trio.sleep(0.01)
    assert not breakers.is_open("scan")
    for _ in range(2):
        await trio.sleep(0.01)
        breakers.failed("scan", connected_at=trio.current_time())
    assert breakers.is_open("scan")
