"""The instruments of milterbridge.metrics: each method moves exactly its sample."""

from __future__ import annotations

import platform

import pytest
import trio
from prometheus_client import CollectorRegistry

from milterbridge import __version__
from milterbridge.engine.headers import ConflictKind
from milterbridge.engine.verdicts import Stage, Verdict
from milterbridge.metrics import (
    CONFLICT_KINDS,
    EDIT_KINDS,
    FILTER_ERROR_KINDS,
    LIMITS,
    PEERS,
    STAGE_BUCKETS,
    STAGES,
    VERDICTS,
    Metrics,
)
from milterbridge.upstream.failure import FailureKind


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry, ["rspamd", "opendkim"])


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_sessions_count_and_gauge(metrics: Metrics, registry: CollectorRegistry) -> None:
    """Opening counts a session and raises the gauge; closing lowers only the gauge."""
    metrics.session_opened()
    metrics.session_opened()
    metrics.session_closed()
    assert value(registry, "milterbridge_sessions_total") == 2
    assert value(registry, "milterbridge_sessions_active") == 1


def test_message_verdict(metrics: Metrics, registry: CollectorRegistry) -> None:
    """A message is counted under its verdict only."""
    metrics.message("quarantine")
    assert value(registry, "milterbridge_messages_total", verdict="quarantine") == 1
    assert value(registry, "milterbridge_messages_total", verdict="accept") == 0


def test_stage_waited_lands_in_the_right_bucket(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """An observation counts in every bucket at or above it, and in the sum."""
    metrics.stage_waited("eom", 250.0)
    name = "milterbridge_stage_duration_seconds"
    assert value(registry, f"{name}_bucket", stage="eom", le="240.0") == 0
    assert value(registry, f"{name}_bucket", stage="eom", le="300.0") == 1
    assert value(registry, f"{name}_count", stage="eom") == 1
    assert value(registry, f"{name}_sum", stage="eom") == 250.0
    assert value(registry, f"{name}_count", stage="rcpt") == 0


async def test_time_stage_uses_trios_clock(
    metrics: Metrics, registry: CollectorRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    """The block's duration is read from trio's (here virtual) clock, even when it raises."""
    with metrics.time_stage("rcpt"):
        await trio.sleep(7)
    with pytest.raises(RuntimeError), metrics.time_stage("rcpt"):
        await trio.sleep(1)
        raise RuntimeError("the MTA waited all the same")
    assert value(registry, "milterbridge_stage_duration_seconds_sum", stage="rcpt") == 8
    assert value(registry, "milterbridge_stage_duration_seconds_count", stage="rcpt") == 2


def test_filter_answered(metrics: Metrics, registry: CollectorRegistry) -> None:
    """An answer counts under filter, stage and verdict, and its time under filter and stage."""
    metrics.filter_answered("rspamd", "eom", "reject", 0.004)
    labels = {"filter": "rspamd", "stage": "eom"}
    assert value(registry, "milterbridge_filter_requests_total", **labels, verdict="reject") == 1
    assert value(registry, "milterbridge_filter_duration_seconds_count", **labels) == 1
    assert value(registry, "milterbridge_filter_duration_seconds_bucket", **labels, le="0.005") == 1
    assert (
        value(registry, "milterbridge_filter_duration_seconds_bucket", **labels, le="0.0025") == 0
    )
    other = {"filter": "opendkim", "stage": "eom", "verdict": "reject"}
    assert value(registry, "milterbridge_filter_requests_total", **other) == 0


def test_filter_failed(metrics: Metrics, registry: CollectorRegistry) -> None:
    """A failure counts under its filter and kind."""
    metrics.filter_failed("opendkim", "connect_timeout")
    name = "milterbridge_filter_errors_total"
    assert value(registry, name, filter="opendkim", kind="connect_timeout") == 1
    assert value(registry, name, filter="rspamd", kind="connect_timeout") == 0


def test_filter_up_and_circuit(metrics: Metrics, registry: CollectorRegistry) -> None:
    """up is absent until something is known, the circuit closed; both follow the last call."""
    assert value(registry, "milterbridge_filter_up", filter="rspamd") is None
    assert value(registry, "milterbridge_filter_circuit_open", filter="rspamd") == 0
    metrics.filter_up("rspamd", True)
    assert value(registry, "milterbridge_filter_up", filter="rspamd") == 1
    metrics.filter_up("rspamd", False)
    assert value(registry, "milterbridge_filter_up", filter="rspamd") == 0
    metrics.filter_circuit("rspamd", True)
    assert value(registry, "milterbridge_filter_circuit_open", filter="rspamd") == 1
    metrics.filter_circuit("rspamd", False)
    assert value(registry, "milterbridge_filter_circuit_open", filter="rspamd") == 0


def test_edits(metrics: Metrics, registry: CollectorRegistry) -> None:
    """Edits are counted by filter and kind, n at a time."""
    metrics.edits("rspamd", "add_header", 3)
    metrics.edits("rspamd", "add_header")
    assert value(registry, "milterbridge_edits_total", filter="rspamd", kind="add_header") == 4
    with pytest.raises(ValueError, match="negative"):
        metrics.edits("rspamd", "add_header", -1)


def test_merge_conflict_protocol_error_limit_hit(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """The three unlabelled-by-filter counters move under their one label."""
    metrics.merge_conflict("body")
    metrics.protocol_error("mta")
    metrics.limit_hit("max_sessions")
    assert value(registry, "milterbridge_merge_conflicts_total", kind="body") == 1
    assert value(registry, "milterbridge_merge_conflicts_total", kind="header") == 0
    assert value(registry, "milterbridge_protocol_errors_total", peer="mta") == 1
    assert value(registry, "milterbridge_protocol_errors_total", peer="filter") == 0
    assert value(registry, "milterbridge_limit_hits_total", limit="max_sessions") == 1


def test_resource_limits_and_state_write_errors(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """Running out of descriptors or spool room counts as a limit; a refused state file write
    has a counter of its own (it is no limit of mail, and needs an operator)."""
    metrics.limit_hit("file_descriptors")
    metrics.limit_hit("spool_directory")
    metrics.state_write_failed()
    metrics.state_write_failed()
    hits = "milterbridge_limit_hits_total"
    assert value(registry, hits, limit="file_descriptors") == 1
    assert value(registry, hits, limit="spool_directory") == 1
    assert value(registry, hits, limit="spool_memory") == 0
    assert value(registry, "milterbridge_state_write_errors_total") == 2


def test_every_known_series_starts_at_zero(metrics: Metrics, registry: CollectorRegistry) -> None:
    """Every label combination of a configured filter exists before anything happens."""
    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in registry.collect()
        for sample in family.samples
    }

    def zero(name: str, **labels: str) -> bool:
        return samples.get((name, frozenset(labels.items()))) == 0

    for name in metrics.filters:
        assert zero("milterbridge_filter_circuit_open", filter=name)
        for stage in STAGES:
            assert zero("milterbridge_filter_duration_seconds_count", filter=name, stage=stage)
            for verdict in VERDICTS:
                labels = {"filter": name, "stage": stage, "verdict": verdict}
                assert zero("milterbridge_filter_requests_total", **labels)
        assert all(
            zero("milterbridge_filter_errors_total", filter=name, kind=kind)
            for kind in FILTER_ERROR_KINDS
        )
        assert all(zero("milterbridge_edits_total", filter=name, kind=k) for k in EDIT_KINDS)
    assert all(zero("milterbridge_stage_duration_seconds_count", stage=s) for s in STAGES)
    assert all(zero("milterbridge_messages_total", verdict=v) for v in VERDICTS)
    assert all(zero("milterbridge_merge_conflicts_total", kind=k) for k in CONFLICT_KINDS)
    assert all(zero("milterbridge_protocol_errors_total", peer=p) for p in PEERS)
    assert all(zero("milterbridge_limit_hits_total", limit=limit) for limit in LIMITS)
    assert zero("milterbridge_state_write_errors_total")


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.message("maybe"),
        lambda m: m.stage_waited("quit", 1.0),
        lambda m: m.time_stage("optneg"),
        lambda m: m.filter_answered("rspamd", "eom", "ok", 1.0),
        lambda m: m.filter_answered("rspamd", "auth", "accept", 1.0),
        lambda m: m.filter_answered("clamav", "eom", "accept", 1.0),
        lambda m: m.filter_failed("rspamd", "boom"),
        lambda m: m.filter_failed("127.0.0.1", "refused"),
        lambda m: m.filter_up("nobody", True),
        lambda m: m.filter_circuit("nobody", True),
        lambda m: m.edits("rspamd", "chgheader"),
        lambda m: m.merge_conflict("rcpt"),
        lambda m: m.protocol_error("client"),
        lambda m: m.limit_hit("sessions"),
    ],
    ids=[
        "message",
        "stage_waited",
        "time_stage",
        "filter_answered-verdict",
        "filter_answered-stage",
        "filter_answered-filter",
        "filter_failed-kind",
        "filter_failed-filter",
        "filter_up",
        "filter_circuit",
        "edits",
        "merge_conflict",
        "protocol_error",
        "limit_hit",
    ],
)
def test_unknown_label_values_are_bugs(metrics: Metrics, call: object) -> None:
    """A value outside its bounded set raises instead of creating a series."""
    assert callable(call)
    with pytest.raises(ValueError, match="unknown"):
        call(metrics)


def test_added_filter_is_accepted_and_removed_filter_leaves_no_series(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """Filters added after start-up get their series; removed ones lose them and their name."""
    metrics.add_filter("clamav")
    metrics.add_filter("clamav")  # again: nothing changes
    metrics.filter_failed("clamav", "refused")
    metrics.filter_up("clamav", False)
    assert value(registry, "milterbridge_filter_errors_total", filter="clamav", kind="refused") == 1
    metrics.remove_filter("clamav")
    assert (
        value(registry, "milterbridge_filter_errors_total", filter="clamav", kind="refused") is None
    )
    assert value(registry, "milterbridge_filter_up", filter="clamav") is None
    assert value(registry, "milterbridge_filter_circuit_open", filter="clamav") is None
    metrics.remove_filter("rspamd")  # never tried: no up series to remove
    assert metrics.filters == ("opendkim",)
    with pytest.raises(ValueError, match="unknown filter"):
        metrics.filter_up("clamav", True)


def test_label_sets_cover_the_codes_enums() -> None:
    """Every value the engine and the upstream client produce is an accepted label value."""
    assert {stage.value for stage in Stage} <= set(STAGES)
    assert {verdict.value for verdict in Verdict} <= set(VERDICTS)
    assert {kind.value for kind in ConflictKind} == set(CONFLICT_KINDS)
    assert {kind.value for kind in FailureKind} <= set(FILTER_ERROR_KINDS)
    assert {"http_status", "invalid_response"} <= set(FILTER_ERROR_KINDS)
    assert len(FILTER_ERROR_KINDS) == len(set(FILTER_ERROR_KINDS))


def test_buckets_span_one_millisecond_to_the_content_timeout(registry: CollectorRegistry) -> None:
    """Filter buckets run 1 ms to 60 s; the MTA's wait goes on to Postfix's 300 s."""
    Metrics(registry, ["f"])
    filter_bounds = [
        float(s.labels["le"])
        for metric in registry.collect()
        if metric.name == "milterbridge_filter_duration_seconds"
        for s in metric.samples
        if s.name.endswith("_bucket") and s.labels["stage"] == "eom"
    ]
    assert filter_bounds[0] == 0.001
    assert filter_bounds[-2:] == [60.0, float("inf")]
    assert STAGE_BUCKETS[0] == 0.001
    assert STAGE_BUCKETS[-1] == 300.0
    assert 240.0 in STAGE_BUCKETS


def test_build_info_and_process_metrics(registry: CollectorRegistry) -> None:
    """The registry carries the version and the process collectors."""
    Metrics(registry, [])
    build = {"version": __version__, "python": platform.python_version()}
    assert value(registry, "milterbridge_build_info", **build) == 1
    assert value(registry, "process_cpu_seconds_total") is not None
    assert any(metric.name == "python_info" for metric in registry.collect())


def test_process_metrics_can_be_left_to_a_registry_that_has_them() -> None:
    """process_metrics=False registers no process collector of its own (no duplicate error)."""
    registry = CollectorRegistry()
    Metrics(registry, [], process_metrics=False)
    assert value(registry, "process_cpu_seconds_total") is None
    assert value(registry, "milterbridge_sessions_total") == 0
