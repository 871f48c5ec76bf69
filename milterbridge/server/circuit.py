"""Circuit breakers: a filter that keeps failing is skipped by new sessions for a while.

Without one, a dead scanner costs every session its full ``timeoutConnect`` (30 s by default)
before the error policy applies -- long enough for Postfix's own milter timeout to fire first.
With one (design §7), after ``failures`` consecutive failures the filter's circuit **opens**: new
joins and hook calls do not try it, its error policy (tempfail or skip) applies at once. After a
back-off the circuit lets exactly **one** attempt through (half-open): success closes it, failure
opens it again for twice the back-off, up to a maximum.

"Consecutive" counts across all sessions of the process: any answered step resets the count, any
failure adds one -- except the failure of a connection opened before the last failure counted:
a filter that crashes drops every connection it has at once, and the sessions notice one by one
(each at its next command), so those failures are one incident, not one per session. Without
this, one crash of a filter that restarts at once opens its circuit whenever five sessions were
in it, and its policy then applies to all new mail for ``backoff``.

The clock is trio's, so tests drive it with a MockClock. One set of breakers serves the whole
process (each worker process has its own).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog
import trio

log = structlog.get_logger("milterbridge.circuit")

#: Told when a circuit opens (True) or closes (False): the gauge and the readiness.
CircuitReport = Callable[[str, bool], None]


@dataclass
class _Circuit:
    failures: int = 0
    open_until: float | None = None
    backoff: float = 0.0
    #: When the half-open attempt was let through (None: none outstanding).
    probing: float | None = None
    #: When the last failure that counted happened.
    last_failure: float | None = None


class CircuitBreakers:
    """One circuit per filter name."""

    def __init__(
        self,
        *,
        failures: int = 5,
        backoff: float = 10.0,
        backoff_max: float = 300.0,
        report: CircuitReport | None = None,
    ) -> None:
        self.threshold = failures
        self.backoff = backoff
        self.backoff_max = max(backoff, backoff_max)
        self.report = report
        self._circuits: dict[str, _Circuit] = {}

    def is_open(self, name: str) -> bool:
        circuit = self._circuits.get(name)
        return circuit is not None and circuit.open_until is not None

    def admit(self, name: str) -> bool:
        """Whether a new join or call may try the filter now (half-open: one at a time)."""
        circuit = self._circuits.get(name)
        if circuit is None or circuit.open_until is None:
            return True
        now = trio.current_time()
        if now < circuit.open_until:
            return False
        # An attempt whose session vanished before it succeeded or failed must not keep the
        # circuit open for good: after one more back-off, another attempt may go.
        if circuit.probing is not None and now < circuit.probing + circuit.backoff:
            return False
        circuit.probing = now
        log.info("circuit_probe", filter=name)
        return True

    def succeeded(self, name: str) -> None:
        circuit = self._circuits.get(name)
        if circuit is None:
            return
        was_open = circuit.open_until is not None
        del self._circuits[name]
        if was_open:
            log.info("circuit_closed", filter=name)
            if self.report is not None:
                self.report(name, False)

    def failed(self, name: str, connected_at: float | None = None) -> None:
        """A failure; ``connected_at``: when the failed connection was opened (None: the
        attempt to open it failed). A connection older than the last failure counted fails in
        the same incident, and does not count again."""
        circuit = self._circuits.setdefault(name, _Circuit())
        now = trio.current_time()
        if (
            connected_at is not None
            and circuit.last_failure is not None
            and connected_at <= circuit.last_failure
        ):
            return
        circuit.last_failure = now
        circuit.failures += 1
        if circuit.probing is not None:
            circuit.probing = None
            circuit.backoff = min(circuit.backoff * 2, self.backoff_max)
        elif circuit.open_until is None and circuit.failures >= self.threshold:
            circuit.backoff = self.backoff
        else:
            return
        circuit.open_until = now + circuit.backoff
        log.warning(
            "circuit_opened",
            filter=name,
            failures=circuit.failures,
            retry_in=round(circuit.backoff, 3),
        )
        if self.report is not None:
            self.report(name, True)
