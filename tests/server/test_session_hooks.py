"""The session with HTTP hooks: when each is called, with what, and how its answers merge.

The hook client is replaced by a recorder here, so that the session's own rules -- stages,
``enable``, ``auth``, the spool, pending edits, the failure policy -- are checked one by one; the
real client against a real HTTP server is tests/upstream/test_hook_client.py, and the whole chain
with Postfix is tests/integration/test_postfix_hooks.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from milterbridge.config import Expression, ExpressionMatch, HookFilter, MilterFilter
from milterbridge.engine.hook_answer import HookAnswer
from milterbridge.metrics import Metrics
from milterbridge.milter import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    Accept,
    AddHeader,
    Body,
    ChangeHeader,
    Command,
    Connection,
    Continue,
    Data,
    EndOfHeaders,
    EndOfMessage,
    Header,
    Macro,
    MacroStage,
    Mail,
    Message,
    OptNeg,
    OptNegReply,
    Protocol,
    Quarantine,
    Quit,
    Rcpt,
    Reject,
    RemoteProtocolError,
    Reply,
    ReplyCode,
    Role,
    Tempfail,
)
from milterbridge.server.session import ClientCounts, MtaSession
from milterbridge.transport import MilterStream
from milterbridge.upstream import FailureKind, UpstreamFailure
from milterbridge.upstream.hook_request import HookInput
from tests.fake_upstream import fake_upstream

from .test_session_faults import MESSAGE, _filter
from .test_session_merge import scripted

Decide = Callable[[HookFilter, HookInput], HookAnswer | UpstreamFailure]


def _continue(_: HookFilter, __: HookInput) -> HookAnswer:
    return HookAnswer(Continue(), (), ())


@dataclass
class RecordingHooks:
    """Stands in for the HTTP client: records each call and answers with ``decide``."""

    decide: Decide = _continue
    calls: list[tuple[str, HookInput]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)

    async def call(self, hook: HookFilter, request: HookInput) -> HookAnswer:
        self.calls.append((hook.name, request))
        if request.body is not None:
            self.bodies.append(request.body.read())
        await trio.lowlevel.checkpoint()
        answer = self.decide(hook, request)
        if isinstance(answer, UpstreamFailure):
            raise answer
        return answer

    def stages(self, name: str | None = None) -> list[str]:
        return [req.stage for hook, req in self.calls if name is None or hook == name]


def _hook(name: str = "policy", **extra: Any) -> HookFilter:
    return HookFilter(name=name, url="http://127.0.0.1:1/hook", **extra)


async def play(
    hooks: Sequence[HookFilter],
    client: RecordingHooks,
    commands: Sequence[Command] = MESSAGE,
    *,
    milters: Sequence[MilterFilter] = (),
    spool_memory: int = 1 << 20,
    counts: ClientCounts | None = None,
    protocol: Protocol = ALL_PROTOCOL,
    metrics: Metrics | None = None,
    **session_options: Any,
) -> tuple[OptNegReply, list[tuple[Command, Reply]]]:
    """Our codec plays Postfix through ``commands``; returns the OPTNEG answer and each reply."""
    mta_stream, session_stream = trio.testing.memory_stream_pair()
    session = MtaSession(
        session_stream,
        max_packet=1 << 20,
        session_id="s",
        filters=milters,
        hooks=hooks,
        hook_client=client,
        spool_memory=spool_memory,
        client_counts=counts,
        metrics=metrics,
        **session_options,
    )
    mta = MilterStream(mta_stream, Connection(Role.MTA))
    answers: list[tuple[Command, Reply]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        await mta.send(OptNeg(6, ALL_ACTIONS, protocol))
        negotiated = await mta.receive()
        assert isinstance(negotiated, OptNegReply)
        options = mta.connection.negotiated
        assert options is not None
        for command in commands:
            if not isinstance(command, Macro) and not options.sends(type(command)):
                continue  # as Postfix does: a step the filter declined is not sent
            await mta.send(command)
            while mta.connection.awaiting is not None:
                reply = await mta.receive()
                assert isinstance(reply, Reply)
                answers.append((command, reply))
        await mta.send(Quit())
        await mta_stream.aclose()
    return negotiated, answers


def _replies(answers: list[tuple[Command, Reply]], kind: type[Message]) -> list[Reply]:
    return [reply for command, reply in answers if isinstance(command, kind)]


async def test_a_hook_is_called_at_each_listed_stage_and_data_comes_at_end_of_message() -> None:
    client = RecordingHooks()
    _, answers = await play([_hook(stages=["connect", "rcpt", "data"])], client)
    assert client.stages() == ["connect", "rcpt", "data"]
    connect, rcpt, data = (request for _, request in client.calls)
    assert connect.client_address == "192.0.2.1" and connect.client_port == 4000
    assert connect.sender is None and connect.body is None
    assert rcpt.sender == (b"<a@x.test>", ())
    assert rcpt.recipients == [(b"<b@y.test>", ())]
    assert rcpt.headers == ()
    assert data.headers == [(b"Subject", b"hi")]
    assert data.body_size == len(b"body\r\n")
    assert client.bodies == [b"body\r\n"]
    assert _replies(answers, EndOfMessage) == [Continue()]


async def test_negotiation_asks_only_for_what_the_hooks_need() -> None:
    """An envelope-only hook: no headers or body; replies only where it is called."""
    negotiated, _ = await play([_hook(stages=["mail"])], RecordingHooks(), [])
    protocol = negotiated.protocol
    assert protocol & Protocol.NOHDRS and protocol & Protocol.NOBODY
    assert protocol & Protocol.NR_CONN and protocol & Protocol.NR_RCPT
    assert not protocol & Protocol.NOMAIL and not protocol & Protocol.NR_MAIL
    assert not protocol & Protocol.NOCONNECT and not protocol & Protocol.NORCPT
    macros = {stage: names.split() for stage, names in negotiated.macros}
    assert b"{auth_authen}" in macros[MacroStage.ENVFROM]
    assert b"{daemon_port}" in macros[MacroStage.CONNECT]
    assert b"{tls_version}" in macros[MacroStage.HELO]


async def test_a_data_hook_takes_headers_and_body_without_replies() -> None:
    negotiated, answers = await play([_hook()], RecordingHooks())
    assert negotiated.protocol & Protocol.NR_HDR and negotiated.protocol & Protocol.NR_BODY
    assert not _replies(answers, Header) and not _replies(answers, Body)


async def test_a_rejected_recipient_only_refuses_that_recipient() -> None:
    def decide(_: HookFilter, request: HookInput) -> HookAnswer:
        if request.stage == "rcpt" and request.recipients[-1][0] == b"<bad@y.test>":
            return HookAnswer(ReplyCode(b"550 5.1.1 no such user"), (), ())
        return HookAnswer(Continue(), (), ())

    client = RecordingHooks(decide)
    commands = [*MESSAGE[:4], Rcpt(b"<bad@y.test>"), *MESSAGE[4:]]
    _, answers = await play([_hook(stages=["rcpt", "data"])], client, commands)
    assert _replies(answers, Rcpt) == [Continue(), ReplyCode(b"550 5.1.1 no such user")]
    data = client.calls[-1][1]
    assert data.stage == "data"
    assert data.recipients == [(b"<b@y.test>", ())]


async def test_edits_returned_before_data_are_applied_at_end_of_message() -> None:
    def decide(_: HookFilter, request: HookInput) -> HookAnswer:
        if request.stage == "rcpt":
            return HookAnswer(Continue(), (AddHeader(b"X-Rcpt-Checked", b"yes"),), ())
        return HookAnswer(Continue(), (ChangeHeader(1, b"Subject", b"[ok] hi"),), ())

    _, answers = await play([_hook(stages=["rcpt", "data"])], RecordingHooks(decide))
    assert _replies(answers, EndOfMessage) == [
        AddHeader(b"X-Rcpt-Checked", b"yes"),
        ChangeHeader(1, b"Subject", b"[ok] hi"),
        Continue(),
    ]


async def test_quarantine_and_a_milter_edit_merge_into_one_script() -> None:
    def decide(_: HookFilter, __: HookInput) -> HookAnswer:
        return HookAnswer(Continue(), (Quarantine(b"suspicious"),), ())

    def milter_edit(message: Message) -> list[Reply]:
        if isinstance(message, EndOfMessage):
            return [AddHeader(b"X-Milter", b"1"), Continue()]
        return [Continue()]

    async with fake_upstream(scripted(milter_edit)) as upstream:
        _, answers = await play(
            [_hook()], RecordingHooks(decide), milters=[_filter("m", upstream.port, True)]
        )
    assert _replies(answers, EndOfMessage) == [
        AddHeader(b"X-Milter", b"1"),
        Quarantine(b"suspicious"),
        Continue(),
    ]


async def test_a_milter_accept_does_not_end_the_message_while_a_hook_waits_for_data() -> None:
    """Answering ACCEPT would end the MTA's conversation before the hook's data call."""

    def accept_at_mail(message: Message) -> list[Reply]:
        return [Accept()] if isinstance(message, Mail) else [Continue()]

    client = RecordingHooks()
    async with fake_upstream(scripted(accept_at_mail)) as upstream:
        _, answers = await play([_hook()], client, milters=[_filter("m", upstream.port, True)])
    assert _replies(answers, Mail) == [Continue()]
    assert client.stages() == ["data"]


async def test_auth_is_called_before_mail_only_for_an_authenticated_client() -> None:
    client = RecordingHooks()
    hook = _hook(stages=["auth", "mail"])
    await play([hook], client)
    assert client.stages() == ["mail"]

    client = RecordingHooks()
    login = Macro(Mail.code, ((b"{auth_authen}", b"alice"), (b"{auth_type}", b"PLAIN")))
    commands = [*MESSAGE[:2], login, *MESSAGE[2:]]
    await play([hook], client, commands)
    assert client.stages() == ["auth", "mail"]
    assert client.calls[0][1].macros["auth_authen"] == "alice"


async def test_a_refusal_at_auth_is_the_answer_to_mail() -> None:
    def decide(_: HookFilter, request: HookInput) -> HookAnswer:
        return HookAnswer(Reject() if request.stage == "auth" else Continue(), (), ())

    client = RecordingHooks(decide)
    login = Macro(Mail.code, ((b"{auth_authen}", b"mallory"),))
    commands = [*MESSAGE[:2], login, MESSAGE[2]]
    _, answers = await play([_hook(stages=["auth", "mail"])], client, commands)
    assert _replies(answers, Mail) == [Reject()]
    assert client.stages() == ["auth"]


async def test_enable_decides_at_each_stage() -> None:
    only_y = Expression(
        else_="false", match=[ExpressionMatch(if_="rcpt_domain == 'y.test'", then="true")]
    )
    client = RecordingHooks()
    commands = [*MESSAGE[:3], Rcpt(b"<c@z.test>"), *MESSAGE[3:]]
    await play([_hook(stages=["mail", "rcpt", "data"], enable=only_y)], client, commands)
    # Not at MAIL (no recipient yet), not for c@z.test, yes for b@y.test, and at data the last
    # recipient is b@y.test.
    assert client.stages() == ["rcpt", "data"]
    assert client.calls[0][1].recipients[-1][0] == b"<b@y.test>"


def _failure(kind: FailureKind = FailureKind.HTTP_STATUS) -> UpstreamFailure:
    return UpstreamFailure(kind, "policy", "rcpt", "HTTP 500")


async def test_a_failing_hook_tempfails_by_default_for_the_rest_of_the_session() -> None:
    def decide(_: HookFilter, request: HookInput) -> HookAnswer | UpstreamFailure:
        return _failure() if request.stage == "rcpt" else HookAnswer(Continue(), (), ())

    with capture_logs() as logs:
        _, answers = await play([_hook(stages=["rcpt", "data"])], RecordingHooks(decide))
    assert _replies(answers, Rcpt) == [Tempfail()]
    (error,) = [line for line in logs if line["event"] == "filter_error"]
    assert error["filter"] == "policy" and error["kind"] == "http_status"
    assert error["policy"] == "tempfail"


async def test_a_failing_optional_hook_is_dropped_and_its_earlier_edits_with_it() -> None:
    def decide(_: HookFilter, request: HookInput) -> HookAnswer | UpstreamFailure:
        if request.stage == "data":
            return _failure(FailureKind.DATA_TIMEOUT)
        return HookAnswer(Continue(), (AddHeader(b"X-Half", b"done"),), ())

    client = RecordingHooks(decide)
    _, answers = await play([_hook(stages=["rcpt", "data"], temp_fail_on_error=False)], client)
    assert _replies(answers, EndOfMessage) == [Continue()]


async def test_a_large_body_is_spooled_to_disk_and_reaches_the_hook_whole() -> None:
    chunks = [bytes([65 + n]) * 65535 for n in range(8)]
    commands = [*MESSAGE[:7], *(Body(chunk) for chunk in chunks), EndOfMessage()]
    client = RecordingHooks()
    registry = CollectorRegistry()
    metrics = Metrics(registry, ["policy"], process_metrics=False)
    with capture_logs() as logs:
        _, answers = await play([_hook()], client, commands, spool_memory=100_000, metrics=metrics)
    (spilled,) = [line for line in logs if line["event"] == "limit_hit"]
    assert spilled["limit"] == "spool_memory" and spilled["bytes"] > 100_000
    assert registry.get_sample_value("milterbridge_limit_hits_total", {"limit": "spool_memory"})
    assert client.bodies == [b"".join(chunks)]
    assert client.calls[-1][1].body_size == 8 * 65535
    assert _replies(answers, EndOfMessage) == [Continue()]


async def test_active_connections_counts_open_sessions_from_the_same_address() -> None:
    counts = ClientCounts()
    counts.opened("192.0.2.1")  # another session from the same client is open
    client = RecordingHooks()
    await play([_hook(stages=["connect"])], client, MESSAGE[:1], counts=counts)
    assert client.calls[0][1].active_connections == 2
    assert counts["192.0.2.1"] == 1  # this session's count is gone with it


async def test_a_second_message_starts_with_no_pending_edits_and_an_empty_spool() -> None:
    def decide(_: HookFilter, request: HookInput) -> HookAnswer:
        if request.stage == "rcpt" and request.recipients[-1][0] == b"<b@y.test>":
            return HookAnswer(Continue(), (AddHeader(b"X-First", b"1"),), ())
        return HookAnswer(Continue(), (), ())

    client = RecordingHooks(decide)
    second = [Mail(b"<c@x.test>"), Rcpt(b"<d@y.test>"), Data(), Header(b"A", b"b")]
    commands = [*MESSAGE, *second, EndOfHeaders(), Body(b"two\r\n"), EndOfMessage()]
    _, answers = await play([_hook(stages=["rcpt", "data"])], client, commands)
    assert _replies(answers, EndOfMessage) == [AddHeader(b"X-First", b"1"), Continue(), Continue()]
    assert client.bodies == [b"body\r\n", b"two\r\n"]


async def test_a_bug_in_a_session_ends_that_session_only() -> None:
    """An unexpected exception (our bug) is logged with its traceback and closes the MTA
    connection; it does not escape run(), which would end the whole service."""

    def decide(_: HookFilter, __: HookInput) -> HookAnswer:
        raise RuntimeError("a bug")

    with capture_logs() as logs:
        mta_stream, session_stream = trio.testing.memory_stream_pair()
        session = MtaSession(
            session_stream,
            max_packet=1 << 20,
            session_id="s",
            hooks=[_hook(stages=["connect"])],
            hook_client=RecordingHooks(decide),
        )
        mta = MilterStream(mta_stream, Connection(Role.MTA))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            await mta.send(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
            await mta.receive()
            await mta.send(MESSAGE[0])
            with pytest.raises(RemoteProtocolError, match="without answering Connect"):
                await mta.receive()
    assert session.stats.outcome == "internal_error"
    assert [line["event"] for line in logs if line["log_level"] == "error"] == ["session_crashed"]
