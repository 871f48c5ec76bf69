"""Every Prometheus instrument of the service, built on an injected registry (design §11, §12).

The metric set is design §11's, names and labels as written there, plus three that later issues
fill in: ``milterbridge_filter_circuit_open{filter}`` (the circuit breaker of design §7),
``milterbridge_limit_hits_total{limit}`` (design §12: every limit, when hit, has a metric) and
``milterbridge_state_write_errors_total`` (the admin API's state file could not be written: a
change was refused, and the operator must free or fix its disk).

Labels are bounded sets, never an address, a sender, a recipient or a queue id: ``filter`` is a
configured filter name (each filter is registered, and an unregistered one is refused), and every
other label takes its values from one of the tuples below. A value outside them is a bug in the
caller, not bad input, so it raises ``ValueError`` instead of quietly growing a new series. Every
label combination of a known filter is created at zero up front, so that ``rate()`` and alerts
see a series from the first scrape rather than only after the first event -- except
``milterbridge_filter_up``, which appears with the first thing learnt about the filter (the
start-up probe, for a milter): 0 would claim "down" and fire the filter-down alert for a filter
nobody has tried yet, a hook above all, which is never probed. That costs, per
configured filter, about 330 series (99 request counters, 11 histograms of 19 series, the error,
edit and state series); a bridge with 20 filters exports some 7,000 series.

Durations are seconds measured by the caller on trio's clock (``trio.current_time()``), never
with ``Histogram.time()``, which reads the wall clock: virtual-time tests then see the same
numbers production does. :meth:`Metrics.time_stage` does that for the common case.

Buckets: design §11 asks for 1 ms to 60 s, which suits the filters (their default budgets are
30 s per command and 60 s per data step). The time the MTA waits on the bridge per stage goes on
to 300 s, Postfix's ``milter_content_timeout``: with buckets ending at 60 s, the alert on
end-of-message time approaching that timeout could never fire, because ``histogram_quantile``
cannot report more than the highest finite bucket.

Several processes (``--workers N``, a later issue): each worker gets its own admin listener on
the next port (``127.0.0.1:8900``, ``:8901``, ...) and its own registry; Prometheus scrapes each
as a target and the dashboards ``sum`` over them. We do not use prometheus_client's
multiprocess mode, because in that mode:

- process metrics disappear (``process_*`` describes one process, not a shared directory),
  and CPU per worker is exactly what one would watch when adding workers;
- gauges need a per-metric merge policy, and ``milterbridge_filter_up`` has no right one: one
  worker may reach a filter that another just failed on;
- a hung worker stays invisible, since its last values are still read from its files, while a
  per-worker /healthz and scrape target shows it at once;
- it needs ``PROMETHEUS_MULTIPROC_DIR`` set before the import, files that must be cleaned when
  a worker dies, and it drops Info metrics and custom collectors.

The cost is N scrape targets and N readiness probes, listed in deploy/prometheus.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from typing import Any, Final

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from . import __version__
from .upstream.failure import FailureKind

#: Where a step of the session happens: the MTA's commands (engine.verdicts.Stage) and ABORT.
STAGES: Final = (
    "connect",
    "helo",
    "mail",
    "rcpt",
    "data",
    "header",
    "eoh",
    "body",
    "eom",
    "unknown",
    "abort",
)
#: What a reply, a filter's answer or a whole message came to (engine.verdicts.Verdict, plus
#: ``quarantine`` for a held message and ``error`` for a filter error).
VERDICTS: Final = (
    "continue",
    "accept",
    "reject",
    "tempfail",
    "discard",
    "quarantine",
    "skip",
    "shutdown",
    "error",
)
#: One per kind of edit a filter can ask for at end-of-message (SMFIR_* edit replies).
EDIT_KINDS: Final = (
    "add_header",
    "insert_header",
    "change_header",
    "delete_header",
    "change_from",
    "add_rcpt",
    "delete_rcpt",
    "replace_body",
    "quarantine",
)
#: What two filters fought over (engine.headers.ConflictKind).
CONFLICT_KINDS: Final = ("header", "body", "sender")
#: Who broke the protocol: the MTA talking to us, or a filter we talk to.
PEERS: Final = ("mta", "filter")
#: Why a filter failed: upstream.failure.FailureKind, plus the hook client's two kinds (the hook
#: client adds them to FailureKind; ``dict.fromkeys`` keeps the tuple free of repeats then).
FILTER_ERROR_KINDS: Final = tuple(
    dict.fromkeys([*(kind.value for kind in FailureKind), "http_status", "invalid_response"])
)
#: The limits of design §12, named after their settings. A limit's issue adds it to its config
#: under this name (or renames it here, together with the dashboard).
LIMITS: Final = (
    "max_sessions",
    "max_mta_packet",
    "max_response_size",
    "max_headers",
    "max_recipients",
    "spool_memory",
    "drain_deadline",
    "idle_timeout",
    # Not settings of ours, but limits all the same: the process's RLIMIT_NOFILE (a connection
    # refused at accept) and the room in ``spoolDirectory`` (a message tempfailed).
    "file_descriptors",
    "spool_directory",
)

#: 1 ms to 60 s: filter latencies, under their default budgets (30 s command, 60 s data).
FILTER_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
)
#: On to 300 s (Postfix's milter_content_timeout), with 240 s as the alert threshold's edge.
STAGE_BUCKETS: Final = (*FILTER_BUCKETS, 120.0, 240.0, 300.0)


def _check(label: str, value: str, allowed: Iterable[str]) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {label} {value!r} (expected one of: {', '.join(allowed)})")
    return value


@contextmanager
def _timed(histogram: Histogram) -> Iterator[None]:
    started = trio.current_time()
    try:
        yield
    finally:
        histogram.observe(trio.current_time() - started)


class Metrics:
    """The service's instruments, on one registry, with one method per thing that happens.

    Args:
        registry: where the instruments are registered; tests pass a fresh
            ``CollectorRegistry()`` and read it back with ``get_sample_value``.
        filters: the configured filter names; more come with :meth:`add_filter`.
        process_metrics: register the ``process_*`` and ``python_*`` collectors. False for a
            registry that has them already (prometheus_client's default ``REGISTRY`` does).

    Raises:
        ValueError: from every method, for a label value outside its bounded set or a filter
            that was never added (a bug in the caller).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        filters: Sequence[str],
        *,
        process_metrics: bool = True,
    ) -> None:
        self.registry = registry
        if process_metrics:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        Info("milterbridge_build", "Version of the running bridge.", registry=registry).info(
            {"version": __version__, "python": platform.python_version()}
        )
        self._sessions = Counter(
            "milterbridge_sessions", "MTA connections accepted.", registry=registry
        )
        self._active = Gauge(
            "milterbridge_sessions_active", "MTA connections open now.", registry=registry
        )
        self._messages = Counter(
            "milterbridge_messages",
            "Messages finished, by the verdict the MTA got.",
            ["verdict"],
            registry=registry,
        )
        self._stage = Histogram(
            "milterbridge_stage_duration_seconds",
            "Time the MTA waited for the bridge's answer to one step.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self._requests = Counter(
            "milterbridge_filter_requests",
            "Steps a filter was asked to answer, by its answer.",
            ["filter", "stage", "verdict"],
            registry=registry,
        )
        self._filter_duration = Histogram(
            "milterbridge_filter_duration_seconds",
            "Time a filter took to answer one step (failures included).",
            ["filter", "stage"],
            buckets=FILTER_BUCKETS,
            registry=registry,
        )
        self._errors = Counter(
            "milterbridge_filter_errors",
            "Filter errors (design §7), by kind.",
            ["filter", "kind"],
            registry=registry,
        )
        self._up = Gauge(
            "milterbridge_filter_up",
            "1 if the filter answered its last connection attempt, 0 if not; absent until tried.",
            ["filter"],
            registry=registry,
        )
        self._circuit = Gauge(
            "milterbridge_filter_circuit_open",
            "1 while the filter is skipped by new sessions after repeated failures.",
            ["filter"],
            registry=registry,
        )
        self._edits = Counter(
            "milterbridge_edits",
            "Message edits a filter asked for, by kind.",
            ["filter", "kind"],
            registry=registry,
        )
        self._conflicts = Counter(
            "milterbridge_merge_conflicts",
            "Edits of two filters that could not both be applied, by what they touched.",
            ["kind"],
            registry=registry,
        )
        self._protocol_errors = Counter(
            "milterbridge_protocol_errors",
            "Milter protocol violations, by the peer that broke it.",
            ["peer"],
            registry=registry,
        )
        self._limits = Counter(
            "milterbridge_limit_hits",
            "Times a configured limit refused or cut something, by limit.",
            ["limit"],
            registry=registry,
        )
        self._state_write_errors = Counter(
            "milterbridge_state_write_errors",
            "Admin API changes refused because the state file could not be written.",
            registry=registry,
        )
        for verdict in VERDICTS:
            self._messages.labels(verdict)
        for stage in STAGES:
            self._stage.labels(stage)
        for kind in CONFLICT_KINDS:
            self._conflicts.labels(kind)
        for peer in PEERS:
            self._protocol_errors.labels(peer)
        for limit in LIMITS:
            self._limits.labels(limit)
        self._filters: dict[str, None] = {}
        # Labelled children of the per-step instruments, looked up once: ``labels()`` checks
        # and hashes its arguments on every call, several times per step and filter.
        self._answered: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._waited: dict[str, Any] = {}
        for name in filters:
            self.add_filter(name)

    @property
    def filters(self) -> tuple[str, ...]:
        """The filter names the instruments accept, in the order they were added."""
        return tuple(self._filters)

    def add_filter(self, name: str) -> None:
        """Accept ``name`` as a filter label and create all its series at zero.

        For filters that appear after start-up (config reload, the admin API); adding a known
        filter again changes nothing.
        """
        if name in self._filters:
            return
        self._filters[name] = None
        for stage in STAGES:
            self._filter_duration.labels(name, stage)
            for verdict in VERDICTS:
                self._requests.labels(name, stage, verdict)
        for kind in FILTER_ERROR_KINDS:
            self._errors.labels(name, kind)
        for kind in EDIT_KINDS:
            self._edits.labels(name, kind)
        self._circuit.labels(name).set(0)

    def remove_filter(self, name: str) -> None:
        """Drop every series of a filter that is no longer configured."""
        self._filter(name)
        del self._filters[name]
        self._answered = {key: pair for key, pair in self._answered.items() if key[0] != name}
        for stage in STAGES:
            self._filter_duration.remove(name, stage)
            for verdict in VERDICTS:
                self._requests.remove(name, stage, verdict)
        for kind in FILTER_ERROR_KINDS:
            self._errors.remove(name, kind)
        for kind in EDIT_KINDS:
            self._edits.remove(name, kind)
        self._circuit.remove(name)
        with suppress(KeyError):  # never learnt anything about it
            self._up.remove(name)

    def _filter(self, name: str) -> str:
        if name not in self._filters:
            raise ValueError(f"unknown filter {name!r}: not added to the metrics")
        return name

    # --- the MTA side ----------------------------------------------------------------------

    def session_opened(self) -> None:
        """An MTA connection was accepted."""
        self._sessions.inc()
        self._active.inc()

    def session_closed(self) -> None:
        """An MTA connection ended, however it ended."""
        self._active.dec()

    def message(self, verdict: str) -> None:
        """A message ended with this verdict towards the MTA."""
        self._messages.labels(_check("verdict", verdict, VERDICTS)).inc()

    def stage_waited(self, stage: str, seconds: float) -> None:
        """The MTA waited this long for the bridge's answer to one step."""
        child = self._waited.get(stage)
        if child is None:
            child = self._waited[stage] = self._stage.labels(_check("stage", stage, STAGES))
        child.observe(seconds)

    def time_stage(self, stage: str) -> AbstractContextManager[None]:
        """Observe the time the block takes, on trio's clock, as :meth:`stage_waited`.

        The observation is made even when the block raises: the MTA waited all the same.
        """
        return _timed(self._stage.labels(_check("stage", stage, STAGES)))

    def protocol_error(self, peer: str) -> None:
        """A peer (``mta`` or ``filter``) broke the milter protocol."""
        self._protocol_errors.labels(_check("peer", peer, PEERS)).inc()

    def limit_hit(self, limit: str) -> None:
        """A limit of design §12 refused or cut something."""
        self._limits.labels(_check("limit", limit, LIMITS)).inc()

    def state_write_failed(self) -> None:
        """The state file could not be written (disk full, read-only, changed by another
        process): the admin API change was refused."""
        self._state_write_errors.inc()

    # --- the filters -----------------------------------------------------------------------

    def filter_answered(self, filter: str, stage: str, verdict: str, seconds: float) -> None:
        """A filter answered a step (``verdict="error"`` when it failed), after ``seconds``.

        A failure is also counted by kind with :meth:`filter_failed`; the two are separate
        because the session knows the stage of a request, and the upstream client the kind.
        """
        key = (filter, stage, verdict)
        pair = self._answered.get(key)
        if pair is None:
            name = self._filter(filter)
            _check("stage", stage, STAGES)
            _check("verdict", verdict, VERDICTS)
            pair = self._answered[key] = (
                self._requests.labels(name, stage, verdict),
                self._filter_duration.labels(name, stage),
            )
        pair[0].inc()
        pair[1].observe(seconds)

    def filter_failed(self, filter: str, kind: str) -> None:
        """A filter error of this kind (design §7) happened."""
        self._errors.labels(self._filter(filter), _check("kind", kind, FILTER_ERROR_KINDS)).inc()

    def filter_up(self, filter: str, up: bool) -> None:
        """Whether the last attempt to reach the filter (probe or join) succeeded."""
        self._up.labels(self._filter(filter)).set(1 if up else 0)

    def filter_circuit(self, filter: str, open: bool) -> None:
        """Whether new sessions skip the filter after repeated failures (circuit breaker)."""
        self._circuit.labels(self._filter(filter)).set(1 if open else 0)

    def edits(self, filter: str, kind: str, n: int = 1) -> None:
        """A filter asked for ``n`` edits of this kind in one message."""
        if n < 0:
            raise ValueError(f"edit count {n} is negative")
        self._edits.labels(self._filter(filter), _check("kind", kind, EDIT_KINDS)).inc(n)

    def merge_conflict(self, kind: str) -> None:
        """Two filters' edits of this kind could not both be applied (one won)."""
        self._conflicts.labels(_check("kind", kind, CONFLICT_KINDS)).inc()


__all__ = [
    "CONFLICT_KINDS",
    "EDIT_KINDS",
    "FILTER_BUCKETS",
    "FILTER_ERROR_KINDS",
    "LIMITS",
    "PEERS",
    "STAGES",
    "STAGE_BUCKETS",
    "VERDICTS",
    "Metrics",
]
