"""Passes: a later pass sees the message as the earlier passes left it (design §6)."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import trio
import trio.testing

from milterbridge.config import HookFilter, MilterFilter
from milterbridge.engine.hook_answer import HookAnswer
from milterbridge.milter import (
    AddHeader,
    Body,
    ChangeHeader,
    Continue,
    EndOfHeaders,
    EndOfMessage,
    Header,
    Message,
    Protocol,
    Quarantine,
    Quit,
    ReplaceBody,
    Reply,
    Tempfail,
)
from tests.fake_upstream import FakeUpstream, Peer, Script, fake_upstream

from .test_session_faults import _filter
from .test_session_hooks import RecordingHooks, _hook, _replies, play

Seen = list[tuple[str, bytes, bytes]]


def recording(edits: Sequence[Reply], seen: Seen, final: Reply | None = None) -> Script:
    """A milter that records headers and body, and sends ``edits`` (then ``final``) at EOM."""

    async def script(peer: Peer) -> None:
        await peer.negotiate()
        while True:
            message: Message = await peer.receive()
            match message:
                case Header(name=name, value=value):
                    seen.append(("header", name, value))
                case Body(chunk=chunk):
                    seen.append(("body", chunk, b""))
                case EndOfHeaders():
                    seen.append(("eoh", b"", b""))
                case EndOfMessage():
                    seen.append(("eom", b"", b""))
                    await peer.reply(*edits, final or Continue())
                    continue
            if isinstance(message, Quit):
                return
            if peer.codec.awaiting is not None:
                await peer.reply(Continue())

    return script


def _in_pass(config: MilterFilter, number: int) -> MilterFilter:
    return msgspec.structs.replace(config, pass_=number)


async def _two_passes(
    first: Script,
    second: Script,
    hooks: Sequence[HookFilter] = (),
    client: RecordingHooks | None = None,
) -> tuple[list[tuple[object, Reply]], FakeUpstream, FakeUpstream]:
    async with fake_upstream(first) as one, fake_upstream(second) as two:
        milters = [
            _filter("scanner", one.port, True),
            _in_pass(_filter("signer", two.port, True), 2),
        ]
        _, answers = await play(hooks, client or RecordingHooks(), milters=milters)
        await one.wait_finished()
        await two.wait_finished()
    return answers, one, two  # type: ignore[return-value]


async def test_the_second_pass_sees_the_first_pass_edits_and_both_scripts_go_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    first_seen: Seen = []
    second_seen: Seen = []
    first = recording(
        [ChangeHeader(1, b"Subject", b"[scanned] hi"), AddHeader(b"X-One", b"1")], first_seen
    )
    second = recording([AddHeader(b"X-Signature", b"v=1")], second_seen)
    answers, _, _ = await _two_passes(first, second)
    assert ("header", b"Subject", b"hi") in first_seen
    assert [item for item in second_seen if item[0] == "header"] == [
        ("header", b"Subject", b"[scanned] hi"),
        ("header", b"X-One", b"1"),
    ]
    assert ("body", b"body\r\n", b"") in second_seen
    assert second_seen[-1][0] == "eom"
    assert _replies(answers, EndOfMessage) == [
        ChangeHeader(1, b"Subject", b"[scanned] hi"),
        AddHeader(b"X-One", b"1"),
        AddHeader(b"X-Signature", b"v=1"),
        Continue(),
    ]


async def test_a_refusal_in_the_first_pass_ends_the_message_before_the_second(
    autojump_clock: trio.testing.MockClock,
) -> None:
    second_seen: Seen = []
    first = recording([AddHeader(b"X-One", b"1")], [], final=Tempfail())
    answers, _, _ = await _two_passes(first, recording([], second_seen))
    assert _replies(answers, EndOfMessage) == [Tempfail()]
    assert second_seen == []


async def test_quarantine_in_the_first_pass_ends_it_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    second_seen: Seen = []
    first = recording([Quarantine(b"virus")], [])
    answers, _, _ = await _two_passes(first, recording([AddHeader(b"X-S", b"1")], second_seen))
    assert _replies(answers, EndOfMessage) == [Quarantine(b"virus"), Continue()]
    assert second_seen == []


async def test_the_last_body_replacement_goes_first_and_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    second_seen: Seen = []
    first = recording([AddHeader(b"X-One", b"1"), ReplaceBody(b"disclaimer\r\n")], [])
    second = recording([ReplaceBody(b"signed\r\n")], second_seen)
    answers, _, _ = await _two_passes(first, second)
    assert [item for item in second_seen if item[0] == "body"] == [("body", b"disclaimer\r\n", b"")]
    assert _replies(answers, EndOfMessage) == [
        ReplaceBody(b"signed\r\n"),
        AddHeader(b"X-One", b"1"),
        Continue(),
    ]


async def test_a_hook_of_the_second_pass_gets_the_edited_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    first = recording([ChangeHeader(1, b"Subject", b"edited"), ReplaceBody(b"new body\r\n")], [])
    client = RecordingHooks(lambda _, __: HookAnswer(Continue(), (AddHeader(b"X-H", b"2"),), ()))
    async with fake_upstream(first) as one:
        hook = _hook(pass_=2)
        _, answers = await play([hook], client, milters=[_filter("scanner", one.port, True)])
    (data,) = [request for _, request in client.calls]
    assert data.headers == [(b"Subject", b"edited")]
    assert client.bodies == [b"new body\r\n"]
    assert _replies(answers, EndOfMessage)[-2:] == [AddHeader(b"X-H", b"2"), Continue()]


async def test_a_later_pass_alone_costs_the_mta_no_reply_per_header(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Only pass-2 milters: Postfix is asked not to wait at headers and body."""
    async with fake_upstream(recording([], [])) as one:
        hook = _hook(stages=["rcpt"])  # pass 1: answers at RCPT only
        negotiated, answers = await play(
            [hook], RecordingHooks(), milters=[_in_pass(_filter("signer", one.port, True), 2)]
        )
    assert negotiated.protocol & Protocol.NR_HDR and negotiated.protocol & Protocol.NR_BODY
    assert not _replies(answers, Header)
    assert _replies(answers, EndOfMessage) == [Continue()]
