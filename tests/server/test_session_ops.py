"""Observe mode, circuit breakers and the per-message limits, as the MTA sees them."""

from __future__ import annotations

from collections.abc import Sequence

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
    CLOSED,
    AddHeader,
    Connection,
    Continue,
    Data,
    EndOfHeaders,
    EndOfMessage,
    Header,
    Message,
    OptNeg,
    Rcpt,
    Reject,
    Reply,
    ReplyCode,
    Role,
    Tempfail,
)
from milterbridge.server.circuit import CircuitBreakers
from milterbridge.server.session import MtaSession
from milterbridge.transport import MilterStream
from milterbridge.upstream import FailureKind, UpstreamFailure
from milterbridge.upstream.hook_request import HookInput
from tests.fake_upstream import fake_upstream

from .test_session_faults import MESSAGE, _filter
from .test_session_hooks import RecordingHooks, _hook, _replies, play
from .test_session_merge import scripted


def _metrics(*names: str) -> tuple[CollectorRegistry, Metrics]:
    registry = CollectorRegistry()
    return registry, Metrics(registry, names, process_metrics=False)


# --- observe mode ---------------------------------------------------------------------


def _rejecting_editor(message: Message) -> Sequence[Reply]:
    if isinstance(message, Rcpt):
        return [Reject()]
    if isinstance(message, EndOfMessage):
        return [AddHeader(b"X-Observer", b"1"), Continue()]
    return [Continue()]


async def test_an_observed_milter_is_asked_but_never_obeyed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry, metrics = _metrics("shadow")
    seen: list[str] = []
    async with fake_upstream(scripted(_rejecting_editor, seen=seen)) as upstream:
        shadow = _filter("shadow", upstream.port, True, mode="observe")
        with capture_logs() as logs:
            _, answers = await play([], RecordingHooks(), milters=[shadow], metrics=metrics)
            await upstream.wait_finished()
    assert _replies(answers, Rcpt) == [Continue()]
    assert _replies(answers, EndOfMessage) == [Continue()]  # its header is not added
    assert "Rcpt" in seen and "EndOfMessage" in seen
    observed = [line for line in logs if line["event"] == "observe_verdict"]
    assert [(line["filter"], line["stage"], line["verdict"]) for line in observed] == [
        ("shadow", "rcpt", "reject")
    ]
    (edits,) = [line for line in logs if line["event"] == "observe_edits"]
    assert edits["edits"] == {"add_header": 1}
    value = registry.get_sample_value
    labels = {"filter": "shadow", "stage": "rcpt", "verdict": "reject"}
    assert value("milterbridge_filter_requests_total", labels) == 1
    assert value("milterbridge_edits_total", {"filter": "shadow", "kind": "add_header"}) == 1


async def test_an_observed_hook_that_fails_never_affects_mail() -> None:
    def decide(_: HookFilter, request: HookInput) -> HookAnswer | UpstreamFailure:
        return UpstreamFailure(FailureKind.HTTP_STATUS, "policy", request.stage, "HTTP 500")

    hook = _hook(stages=["rcpt", "data"], mode="observe")  # tempFailOnError stays true
    with capture_logs() as logs:
        _, answers = await play([hook], RecordingHooks(decide))
    assert _replies(answers, Rcpt) == [Continue()]
    assert _replies(answers, EndOfMessage) == [Continue()]
    (error,) = [line for line in logs if line["event"] == "filter_error"]
    assert error["policy"] == "observe"


# --- circuit breakers -----------------------------------------------------------------


async def test_an_open_circuit_applies_the_policy_without_calling_the_hook(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry, metrics = _metrics("policy")
    breakers = CircuitBreakers(failures=2, backoff=60)
    calls = 0

    def decide(_: HookFilter, request: HookInput) -> HookAnswer | UpstreamFailure:
        nonlocal calls
        calls += 1
        return UpstreamFailure(FailureKind.COMMAND_TIMEOUT, "policy", request.stage, "slow")

    hook = _hook(stages=["rcpt"])
    for _ in range(2):  # two sessions fail: the circuit opens
        _, answers = await play([hook], RecordingHooks(decide), breakers=breakers)
        assert _replies(answers, Rcpt) == [Tempfail()]
    assert calls == 2 and breakers.is_open("policy")
    with capture_logs() as logs:
        _, answers = await play([hook], RecordingHooks(decide), breakers=breakers, metrics=metrics)
    assert calls == 2  # not tried
    assert _replies(answers, Rcpt) == [Tempfail()]
    assert [line["reason"] for line in logs if line["event"] == "filter_skipped"] == [
        "circuit_open"
    ]
    errors = {"filter": "policy", "kind": "circuit_open"}
    assert registry.get_sample_value("milterbridge_filter_errors_total", errors) == 1


async def test_an_open_circuit_skips_an_optional_milter_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breakers = CircuitBreakers(failures=1, backoff=60)
    breakers.failed("gone")  # it failed before: open
    hook = _hook(stages=["rcpt"])
    async with fake_upstream(scripted(lambda _: [Reject()])) as upstream:
        optional = _filter("gone", upstream.port, False)
        started = trio.current_time()
        _, answers = await play([hook], RecordingHooks(), milters=[optional], breakers=breakers)
    assert _replies(answers, Rcpt) == [Continue()]  # the rejecting milter was never asked
    assert trio.current_time() - started < 1


# --- limits ---------------------------------------------------------------------------


async def test_a_header_flood_is_refused_and_the_filters_see_no_more(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry, metrics = _metrics("m")
    seen: list[str] = []
    headers = [Header(b"X-N", str(n).encode()) for n in range(4)]
    commands = [*MESSAGE[:5], *headers]  # after a refusal the MTA sends nothing more of it
    async with fake_upstream(scripted(lambda _: [Continue()], seen=seen)) as upstream:
        with capture_logs() as logs:
            _, answers = await play(
                [],
                RecordingHooks(),
                commands,
                milters=[_filter("m", upstream.port, True)],
                metrics=metrics,
                max_headers=3,
            )
            await upstream.wait_finished()
    refused = ReplyCode(b"552 5.3.4 Too many header fields")
    assert _replies(answers, Header) == [Continue(), Continue(), Continue(), refused]
    assert seen.count("Header") == 3
    assert [line["limit"] for line in logs if line["event"] == "limit_hit"] == ["max_headers"]
    assert registry.get_sample_value("milterbridge_limit_hits_total", {"limit": "max_headers"}) == 1


async def test_with_no_reply_headers_the_refusal_comes_at_end_of_headers() -> None:
    headers = [Header(b"X-N", str(n).encode()) for n in range(3)]
    commands = [*MESSAGE[:5], *headers, EndOfHeaders(), EndOfMessage()]
    _, answers = await play([_hook()], RecordingHooks(), commands, max_headers=1)
    refused = ReplyCode(b"552 5.3.4 Too many header fields")
    assert _replies(answers, Header) == []  # a data hook asks for no replies to headers
    assert _replies(answers, EndOfMessage) == [refused]  # the first step Postfix waits for


async def test_recipients_beyond_the_limit_are_deferred_one_by_one() -> None:
    client = RecordingHooks()
    rcpts = [Rcpt(f"<r{n}@y.test>".encode()) for n in range(4)]
    commands = [*MESSAGE[:3], *rcpts, Data(), *MESSAGE[5:]]
    _, answers = await play([_hook(stages=["rcpt", "data"])], client, commands, max_recipients=2)
    deferred = ReplyCode(b"452 4.5.3 Too many recipients")
    assert _replies(answers, Rcpt) == [Continue(), Continue(), deferred, deferred]
    assert [len(req.recipients) for _, req in client.calls if req.stage == "data"] == [2]


async def test_an_oversize_packet_from_the_mta_is_a_limit_hit() -> None:
    registry, metrics = _metrics()
    mta_stream, session_stream = trio.testing.memory_stream_pair()
    session = MtaSession(session_stream, max_packet=70_000, session_id="s", metrics=metrics)
    mta = MilterStream(mta_stream, Connection(Role.MTA))
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            await mta.send(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
            await mta.receive()
            await mta_stream.send_all((80_000).to_bytes(4, "big") + b"C")
            assert await mta.receive() is CLOSED
    assert registry.get_sample_value("milterbridge_limit_hits_total", {"limit": "max_mta_packet"})
    assert [line["limit"] for line in logs if line["event"] == "limit_hit"] == ["max_mta_packet"]


async def test_an_mta_that_goes_silent_is_closed_after_the_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry, metrics = _metrics()
    mta_stream, session_stream = trio.testing.memory_stream_pair()
    session = MtaSession(
        session_stream, max_packet=1 << 20, session_id="s", metrics=metrics, idle_timeout=600
    )
    mta = MilterStream(mta_stream, Connection(Role.MTA))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        await mta.send(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
        await mta.receive()
        started = trio.current_time()
        assert await mta.receive() is CLOSED
    assert trio.current_time() - started == 600
    assert session.stats.outcome == "idle_timeout"
    assert (
        registry.get_sample_value("milterbridge_limit_hits_total", {"limit": "idle_timeout"}) == 1
    )
