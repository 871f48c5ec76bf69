"""Readiness: whether this process should be sent mail now, and why not (``/readyz``).

Ready means: the milter listeners accept connections, a configuration is loaded, and every
filter is either reachable or deliberately skipped by its circuit breaker (design §7: an open
circuit is the bridge coping with a dead filter, so it must not also take the bridge out of a
load balancer). A filter not probed yet is "unknown" and keeps the process unready, so that a
load balancer waits for the start-up probe instead of sending mail to a bridge that would
tempfail it.

Liveness (``/healthz``) is deliberately not modelled here: it answers as long as the process
runs its event loop, so that an orchestrator restarts a hung process but never one that is
merely waiting for a filter.

The object is plain state: the service sets it, the admin listener renders it. It never blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import msgspec

#: What the bridge last learnt about a filter.
FilterState = Literal["reachable", "unreachable", "unknown"]


class FilterReport(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """One filter in the ``/readyz`` body."""

    state: FilterState
    circuit_open: bool
    #: Whether this filter allows the process to be ready (reachable or circuit open).
    ready: bool
    #: Why it is unreachable or unknown; empty when reachable.
    reason: str


class ReadinessReport(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """The ``/readyz`` body."""

    ready: bool
    listening: bool
    config_loaded: bool
    #: One line per thing that keeps the process unready; empty when ready.
    reasons: list[str]
    filters: dict[str, FilterReport]


@dataclass(slots=True)
class _Filter:
    state: FilterState = "unknown"
    reason: str = "not probed yet"
    circuit_open: bool = False


class Readiness:
    """The service's readiness, updated by the service and read by ``/readyz``.

    Raises ``ValueError`` when told about a filter it does not know: every filter comes from
    the configuration through :meth:`set_filters`, so an unknown name is a bug.
    """

    def __init__(self, filters: Sequence[str] = ()) -> None:
        #: The milter listeners accept connections.
        self.listening = False
        #: A configuration is loaded (false while none is, e.g. a reload that failed validation
        #: before any configuration ran).
        self.config_loaded = False
        self._filters: dict[str, _Filter] = {}
        self.set_filters(filters)

    def set_filters(self, names: Sequence[str]) -> None:
        """Track exactly these filters; the state of those tracked already is kept."""
        self._filters = {name: self._filters.get(name) or _Filter() for name in names}

    def state(self, name: str) -> FilterState:
        """What was last learnt about a filter."""
        return self._get(name).state

    def filter_reachable(self, name: str) -> None:
        """The filter answered (a probe, or a session connected to it)."""
        entry = self._get(name)
        entry.state, entry.reason = "reachable", ""

    def filter_unreachable(self, name: str, reason: str) -> None:
        """The filter could not be reached; ``reason`` says why, for the operator."""
        entry = self._get(name)
        entry.state, entry.reason = "unreachable", reason

    def filter_circuit(self, name: str, open: bool) -> None:
        """The filter's circuit breaker opened (new sessions skip it) or closed."""
        self._get(name).circuit_open = open

    def _get(self, name: str) -> _Filter:
        try:
            return self._filters[name]
        except KeyError:
            raise ValueError(f"unknown filter {name!r}: not tracked for readiness") from None

    def report(self) -> ReadinessReport:
        """The state as ``/readyz`` shows it."""
        reasons: list[str] = []
        if not self.listening:
            reasons.append("milter listeners are not accepting connections")
        if not self.config_loaded:
            reasons.append("no configuration is loaded")
        filters: dict[str, FilterReport] = {}
        for name, entry in self._filters.items():
            ready = entry.state == "reachable" or entry.circuit_open
            if not ready:
                reasons.append(f"filter {name} is {entry.state}: {entry.reason}")
            filters[name] = FilterReport(
                state=entry.state, circuit_open=entry.circuit_open, ready=ready, reason=entry.reason
            )
        return ReadinessReport(
            ready=not reasons,
            listening=self.listening,
            config_loaded=self.config_loaded,
            reasons=reasons,
            filters=filters,
        )


__all__ = ["FilterReport", "FilterState", "Readiness", "ReadinessReport"]
