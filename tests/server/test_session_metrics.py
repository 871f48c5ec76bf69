"""What a session counts and logs: every metric of design §11 moves as the session runs, and
each message gets one canonical ``message_end`` line without content or secrets."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from milterbridge.config import HookFilter
from milterbridge.engine.hook_answer import HookAnswer
from milterbridge.metrics import Metrics
from milterbridge.milter import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    AddHeader,
    ChangeHeader,
    Connection,
    Continue,
    EndOfMessage,
    Message,
    OptNeg,
    Reject,
    Reply,
    Role,
)
from milterbridge.server.session import MtaSession
from milterbridge.transport import MilterStream
from milterbridge.upstream import FailureKind, UpstreamFailure
from milterbridge.upstream.hook_request import HookInput
from tests.fake_upstream import fake_upstream

from .test_session_faults import MESSAGE, _filter
from .test_session_hooks import RecordingHooks, _hook, play
from .test_session_merge import scripted


def _metrics(*names: str) -> tuple[CollectorRegistry, Metrics]:
    registry = CollectorRegistry()
    return registry, Metrics(registry, names, process_metrics=False)


def _milter_edit(message: Message) -> list[Reply]:
    if isinstance(message, EndOfMessage):
        return [ChangeHeader(1, b"Subject", b"from milter"), AddHeader(b"X-M", b"1"), Continue()]
    return [Continue()]


def _hook_edit(_: HookFilter, request: HookInput) -> HookAnswer:
    if request.stage == "data":
        return HookAnswer(Continue(), (ChangeHeader(1, b"Subject", b"from hook"),), ())
    return HookAnswer(Continue(), (), ())


async def test_one_message_moves_every_session_and_filter_metric(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry, metrics = _metrics("m", "policy")
    async with fake_upstream(scripted(_milter_edit)) as upstream:
        milter = _filter("m", upstream.port, True)
        with capture_logs() as logs:
            await play(
                [_hook(stages=["rcpt", "data"])],
                RecordingHooks(_hook_edit),
                milters=[milter],
                metrics=metrics,
            )
    value = registry.get_sample_value
    assert value("milterbridge_sessions_total") == 1
    assert value("milterbridge_sessions_active") == 0
    assert value("milterbridge_messages_total", {"verdict": "accept"}) == 1
    for stage in ("connect", "helo", "mail", "rcpt", "eom"):
        assert value("milterbridge_stage_duration_seconds_count", {"stage": stage}) == 1, stage
    requests = "milterbridge_filter_requests_total"
    assert value(requests, {"filter": "m", "stage": "eom", "verdict": "continue"}) == 1
    assert value(requests, {"filter": "m", "stage": "connect", "verdict": "continue"}) == 1
    assert value(requests, {"filter": "policy", "stage": "rcpt", "verdict": "continue"}) == 1
    assert value(requests, {"filter": "policy", "stage": "eom", "verdict": "continue"}) == 1
    assert value(requests, {"filter": "policy", "stage": "connect", "verdict": "continue"}) == 0
    duration = "milterbridge_filter_duration_seconds_count"
    assert value(duration, {"filter": "m", "stage": "eom"}) == 1
    assert value("milterbridge_edits_total", {"filter": "m", "kind": "change_header"}) == 1
    assert value("milterbridge_edits_total", {"filter": "m", "kind": "add_header"}) == 1
    assert value("milterbridge_edits_total", {"filter": "policy", "kind": "change_header"}) == 1
    assert value("milterbridge_merge_conflicts_total", {"kind": "header"}) == 1
    assert value("milterbridge_filter_up", {"filter": "m"}) == 1
    assert value("milterbridge_filter_up", {"filter": "policy"}) == 1

    (line,) = [entry for entry in logs if entry["event"] == "message_end"]
    assert line["verdict"] == "accept"
    assert line["client"] == "192.0.2.1"
    assert line["helo"] == "client.test"
    assert line["sender"] == "<a@x.test>"
    assert line["recipients"] == 1
    assert line["filters"]["m"]["verdict"] == "continue"
    assert line["filters"]["policy"]["verdict"] == "continue"
    assert line["edits"] == {"change_header": 2, "add_header": 1}
    assert line["duration"] >= 0
    text = repr(logs)
    assert "body\\r\\n" not in text and "from milter" not in text and "from hook" not in text


async def test_a_failing_hook_is_counted_as_an_error_and_the_message_as_tempfailed() -> None:
    registry, metrics = _metrics("policy")

    def decide(_: HookFilter, request: HookInput) -> HookAnswer | UpstreamFailure:
        if request.stage == "data":
            return UpstreamFailure(FailureKind.REFUSED, "policy", "data", "refused")
        return HookAnswer(Continue(), (), ())

    with capture_logs() as logs:
        await play([_hook()], RecordingHooks(decide), metrics=metrics)
    value = registry.get_sample_value
    assert value("milterbridge_filter_errors_total", {"filter": "policy", "kind": "refused"}) == 1
    errors = {"filter": "policy", "stage": "eom", "verdict": "error"}
    assert value("milterbridge_filter_requests_total", errors) == 1
    assert value("milterbridge_filter_up", {"filter": "policy"}) == 0
    assert value("milterbridge_messages_total", {"verdict": "tempfail"}) == 1
    (line,) = [entry for entry in logs if entry["event"] == "message_end"]
    assert line["verdict"] == "tempfail"
    assert line["filters"]["policy"]["verdict"] == "error"
    assert line["filters"]["policy"]["error"] == "refused"


async def test_garbage_from_the_mta_is_a_protocol_error() -> None:
    registry, metrics = _metrics()
    mta_stream, session_stream = trio.testing.memory_stream_pair()
    session = MtaSession(session_stream, max_packet=1 << 20, session_id="s", metrics=metrics)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        await MilterStream(mta_stream, Connection(Role.MTA)).send(
            OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL)
        )
        await mta_stream.send_all(b"\x00\x00\x00\x01Z")  # no such command
    assert registry.get_sample_value("milterbridge_protocol_errors_total", {"peer": "mta"}) == 1
    assert registry.get_sample_value("milterbridge_sessions_active") == 0


async def test_a_message_refused_at_mail_is_counted_with_its_verdict() -> None:
    registry, metrics = _metrics("policy")

    def decide(_: HookFilter, request: HookInput) -> HookAnswer:
        return HookAnswer(Reject() if request.stage == "mail" else Continue(), (), ())

    with capture_logs() as logs:
        await play([_hook(stages=["mail"])], RecordingHooks(decide), MESSAGE[:3], metrics=metrics)
    assert registry.get_sample_value("milterbridge_messages_total", {"verdict": "reject"}) == 1
    assert [entry["verdict"] for entry in logs if entry["event"] == "message_end"] == ["reject"]


async def test_packets_are_traced_at_debug_only_by_kind() -> None:
    """Per-packet lines exist (debug) and name packet kinds, never content."""
    with capture_logs() as logs:
        await play([_hook()], RecordingHooks(_hook_edit))
    packets = [entry["packet"] for entry in logs if entry["event"] == "mta_packet"]
    assert packets[:3] == ["OptNeg", "Connect", "Helo"]
    assert {entry["log_level"] for entry in logs if entry["event"].startswith("mta_")} == {"debug"}
    for entry in logs:
        if entry["event"] == "mta_packet":
            assert set(entry) <= {"event", "log_level", "packet", "session_id"}


async def test_at_info_level_the_trace_calls_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above debug level the session does not even call the logger for packet traces."""
    import milterbridge.server.session as session_module
    from milterbridge.logs import configure_logging

    real = session_module.log
    traced: list[object] = []

    class Spy:
        def debug(self, event: str, **_: object) -> None:
            traced.append(event)

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

    monkeypatch.setattr(session_module, "log", Spy())
    configure_logging("info", "json")
    await play([_hook()], RecordingHooks(_hook_edit))
    assert traced == []
