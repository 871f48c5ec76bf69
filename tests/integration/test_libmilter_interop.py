"""Our codec in the MTA role against a real libmilter filter (pymilter over Debian's libmilter).

These prove the codec against the reference implementation of the filter side: negotiation with
macro lists and NR/NO flags, every stage, a body over 64 KiB, every end-of-message edit libmilter
can send, custom reply codes, abort then a second message, and QUIT_NC.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import trio

from milterbridge.milter import (
    CHUNK_SIZE,
    Abort,
    Accept,
    Action,
    AddHeader,
    AddRcpt,
    AddRcptPar,
    Body,
    ChangeFrom,
    ChangeHeader,
    Connect,
    Continue,
    Data,
    DelRcpt,
    EndOfHeaders,
    EndOfMessage,
    Family,
    Header,
    Helo,
    InsertHeader,
    Macro,
    MacroStage,
    Mail,
    Progress,
    Protocol,
    Quarantine,
    Quit,
    QuitNoClose,
    Rcpt,
    Reject,
    ReplaceBody,
    ReplyCode,
    Skip,
    Tempfail,
    Unknown,
)
from milterbridge.transport import MilterStream
from tests.fixtures.filter_process import FilterProcess, generated_body, running_filter

from .mta_driver import POSTFIX_OFFER, exchange, open_mta

CONNECT = Connect(b"client.test", Family.INET, 40000, b"192.0.2.10")
BIG_BODY = b"".join(b"line %05d of a body that is longer than 64 KiB\r\n" % i for i in range(2000))


async def _session_start(milter: MilterStream) -> None:
    assert len(await exchange(milter, POSTFIX_OFFER)) == 1
    assert milter.connection.negotiated is not None
    assert await exchange(
        milter,
        Macro(b"C", ((b"j", b"mx.test"), (b"{daemon_name}", b"smtpd"))),
        CONNECT,
    ) == [Continue()]
    assert await exchange(milter, Macro(b"H"), Helo(b"client.test")) == [Continue()]


async def _message(milter: MilterStream, body: bytes = BIG_BODY) -> list[Any]:
    replies: list[Any] = []
    replies += await exchange(
        milter, Macro(b"M", ((b"i", b"QID1"),)), Mail(b"<a@x.test>", (b"SIZE=10",))
    )
    replies += await exchange(milter, Macro(b"R"), Rcpt(b"<b@y.test>"))
    replies += await exchange(milter, Macro(b"R"), Rcpt(b"<c@y.test>", (b"NOTIFY=NEVER",)))
    replies += await exchange(milter, Macro(b"T"), Data())
    for name, value in ((b"From", b"a@x.test"), (b"Subject", b"hello\n world"), (b"X-Old", b"1")):
        replies += await exchange(milter, Macro(b"L"), Header(name, value))
    replies += await exchange(milter, Macro(b"N"), EndOfHeaders())
    for pos in range(0, len(body), CHUNK_SIZE):
        replies += await exchange(milter, Macro(b"B"), Body(body[pos : pos + CHUNK_SIZE]))
    return replies


async def test_full_session_with_every_edit(tmp_path: Path) -> None:
    """Every stage reaches libmilter intact and every edit it sends decodes to the right value."""
    script = {
        "macros": {"connect": "j {daemon_name}", "mail": "i"},
        "eom_edits": [
            ["addheader", "X-Added", "yes"],
            ["insheader", 1, "X-Inserted", "top"],
            ["chgheader", "Subject", 1, "changed"],
            ["chgheader", "X-Old", 1, ""],
            ["chgfrom", "<new@x.test>", "RET=HDRS"],
            ["addrcpt", "<d@y.test>"],
            ["addrcpt_par", "<e@y.test>", "NOTIFY=NEVER"],
            ["delrcpt", "<b@y.test>"],
            ["replacebody_bytes", 70000, "Z"],
            ["quarantine", "held for review"],
            ["progress"],
        ],
        "replies": {"eom": "accept"},
    }
    with running_filter(script, tmp_path) as proc:
        milter = await open_mta(proc.spec)
        await _session_start(milter)
        negotiated = milter.connection.negotiated
        assert negotiated is not None
        assert negotiated.macros == {
            MacroStage.CONNECT: (b"j", b"{daemon_name}"),
            MacroStage.ENVFROM: (b"i",),
        }
        assert negotiated.actions & Action.SETSYMLIST
        assert set(await _message(milter)) == {Continue()}
        edits = await exchange(milter, Macro(b"E"), EndOfMessage())
        new_body = generated_body(70000, "Z")
        assert edits == [
            AddHeader(b"X-Added", b"yes"),
            InsertHeader(1, b"X-Inserted", b"top"),
            ChangeHeader(1, b"Subject", b"changed"),
            ChangeHeader(1, b"X-Old", b""),
            ChangeFrom(b"<new@x.test>", b"RET=HDRS"),
            AddRcpt(b"<d@y.test>"),
            AddRcptPar(b"<e@y.test>", b"NOTIFY=NEVER"),
            DelRcpt(b"<b@y.test>"),
            ReplaceBody(new_body[:CHUNK_SIZE]),
            ReplaceBody(new_body[CHUNK_SIZE:]),
            Quarantine(b"held for review"),
            Progress(),
            Accept(),
        ]
        await exchange(milter, Abort(), Quit())
        await milter.aclose()
        proc.wait_for("close")
        seen = proc.events()
    by_event = {r["event"]: r for r in seen}
    assert by_event["connect"]["addr"] == "192.0.2.10"
    assert by_event["connect"]["port"] == 40000
    assert by_event["connect"]["macros"]["j"] == "mx.test"
    assert by_event["helo"]["name"] == "client.test"
    assert by_event["mail"]["sender"] == "<a@x.test>"
    assert by_event["mail"]["params"] == ["SIZE=10"]
    assert [r["rcpt"] for r in seen if r["event"] == "rcpt"] == ["<b@y.test>", "<c@y.test>"]
    assert [(r["name"], r["value"]) for r in seen if r["event"] == "header"] == [
        ("From", "a@x.test"),
        ("Subject", "hello\n world"),
        ("X-Old", "1"),
    ]
    assert by_event["eom"]["body_len"] == len(BIG_BODY)
    assert by_event["eom"]["body_sha256"] == hashlib.sha256(BIG_BODY).hexdigest()
    assert [r["len"] for r in seen if r["event"] == "body"] == [
        CHUNK_SIZE,
        len(BIG_BODY) - CHUNK_SIZE,
    ]


async def test_abort_then_second_message_and_reply_codes(tmp_path: Path) -> None:
    """A recipient refused with a custom code, ABORT mid-body, then a complete second message."""
    script = {
        "replies": {
            "rcpt": {"<bad@y.test>": ["reject", "550", "5.1.1", "no such user"], "*": "continue"},
            "eom": ["tempfail", "451", "4.7.1", ["busy", "try later"]],
        }
    }
    with running_filter(script, tmp_path) as proc:
        milter = await open_mta(proc.spec)
        await _session_start(milter)
        assert await exchange(milter, Mail(b"<a@x.test>")) == [Continue()]
        assert await exchange(milter, Rcpt(b"<bad@y.test>")) == [
            ReplyCode(b"550 5.1.1 no such user")
        ]
        assert await exchange(milter, Rcpt(b"<ok@y.test>")) == [Continue()]
        assert await exchange(milter, Data()) == [Continue()]
        assert await exchange(milter, EndOfHeaders()) == [Continue()]
        assert await exchange(milter, Body(b"first\r\n")) == [Continue()]
        await exchange(milter, Abort())
        assert set(await _message(milter, b"second\r\n")) == {Continue()}
        assert await exchange(milter, EndOfMessage()) == [
            ReplyCode(b"451-4.7.1 busy\r\n451 4.7.1 try later")
        ]
        await exchange(milter, Quit())
        await milter.aclose()
        proc.wait_for("close")
        events = [r["event"] for r in proc.events()]
    assert events.count("abort") == 1
    assert events.count("eom") == 1
    assert events.count("mail") == 2


async def test_quit_nc_is_accepted_but_stock_libmilter_answers_nothing_after_it(
    tmp_path: Path,
) -> None:
    """QUIT_NC encodes and libmilter takes it, but Debian's libmilter 8.17 then answers nothing.

    The protocol notes (§2.1) say libmilter expects a new CONNECT on the same socket after
    QUIT_NC; measured here, the filter keeps the socket open and never answers the CONNECT
    (a plain C libmilter filter behaves the same). So nothing may rely on QUIT_NC towards stock
    filters: the bridge ends upstream sessions with QUIT and reconnects.
    """
    with running_filter({"replies": {"eom": "continue"}}, tmp_path) as proc:
        milter = await open_mta(proc.spec)
        await _session_start(milter)
        assert await exchange(milter, QuitNoClose()) == []
        await milter.send(Connect(b"second.test", Family.INET6, 25, b"2001:db8::2"))
        with trio.move_on_after(1.5) as waited:
            await milter.receive()
        assert waited.cancelled_caught
        await milter.aclose()
        assert [c["hostname"] for c in proc.events("connect")] == ["client.test"]


async def test_no_reply_disabled_steps_and_skip(tmp_path: Path) -> None:
    """NR headers go unanswered, a disabled step is never sent, SKIP ends the body early."""
    script = {
        "protocol": {"noreply": ["header"], "disable": ["unknown"], "enable": ["skip"]},
        "replies": {"body": "skip", "mail": "continue", "eom": "reject"},
    }
    with running_filter(script, tmp_path) as proc:
        milter = await open_mta(proc.spec)
        await _session_start(milter)
        negotiated = milter.connection.negotiated
        assert negotiated is not None
        assert negotiated.protocol & (Protocol.NR_HDR | Protocol.NOUNKNOWN | Protocol.SKIP) == (
            Protocol.NR_HDR | Protocol.NOUNKNOWN | Protocol.SKIP
        )
        assert not negotiated.sends(Unknown)
        await exchange(milter, Mail(b"<a@x.test>"))
        await exchange(milter, Rcpt(b"<b@y.test>"))
        await exchange(milter, Data())
        assert await exchange(milter, Header(b"A", b"1"), Header(b"B", b"2")) == []
        assert await exchange(milter, EndOfHeaders()) == [Continue()]
        assert await exchange(milter, Body(b"x" * 100)) == [Skip()]
        assert await exchange(milter, EndOfMessage()) == [Reject()]
        await exchange(milter, Abort(), Quit())
        await milter.aclose()
        proc.wait_for("close")
        assert len(proc.events("header")) == 2


async def test_unix_socket_and_tempfail_at_mail(tmp_path: Path) -> None:
    """The codec works over a Unix socket; TEMPFAIL at MAIL ends the message for the filter."""
    script = {"replies": {"mail": "tempfail"}}
    with FilterProcess(script, tmp_path, unix=True) as proc:
        milter = await open_mta(proc.spec)
        await _session_start(milter)
        assert await exchange(milter, Mail(b"<a@x.test>")) == [Tempfail()]
        assert milter.connection.conversation.message_done
        await exchange(milter, Abort())
        assert await exchange(milter, Mail(b"<a@x.test>")) == [Tempfail()]
        await exchange(milter, Quit())
        with trio.fail_after(5):
            await milter.aclose()
