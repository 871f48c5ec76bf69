"""Golden bytes for every packet type, written by hand from the protocol reference (§2-§4).

Each case is (message, wire bytes). The same table drives encoding and decoding, so a mistake in
either direction fails here; the bytes were not produced by our encoder.
"""

from __future__ import annotations

import pytest

from milterbridge.milter import (
    COMMANDS,
    REPLIES,
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
    ConnFail,
    Continue,
    Data,
    DelRcpt,
    Discard,
    EndOfHeaders,
    EndOfMessage,
    Family,
    Header,
    Helo,
    InsertHeader,
    LocalProtocolError,
    Macro,
    MacroStage,
    Mail,
    Message,
    OptNeg,
    OptNegReply,
    Progress,
    Protocol,
    Quarantine,
    Quit,
    QuitNoClose,
    Rcpt,
    Reject,
    ReplaceBody,
    ReplyCode,
    Shutdown,
    Skip,
    Tempfail,
    Unknown,
)

COMMAND_CASES: list[tuple[Message, bytes]] = [
    # Postfix's default offer, milter_protocol=6 (protocol notes §4.1).
    (
        OptNeg(6, Action(0x1FF), Protocol(0x1FFFFF)),
        b"\x00\x00\x00\x0dO\x00\x00\x00\x06\x00\x00\x01\xff\x00\x1f\xff\xff",
    ),
    (
        Macro(b"C", ((b"j", b"mx.test"), (b"{daemon_name}", b"smtpd"))),
        b"\x00\x00\x00\x20DCj\x00mx.test\x00{daemon_name}\x00smtpd\x00",
    ),
    (Macro(b"L"), b"\x00\x00\x00\x02DL"),
    (
        Connect(b"client.test", Family.INET, 25, b"192.0.2.1"),
        b"\x00\x00\x00\x1aCclient.test\x004\x00\x19192.0.2.1\x00",
    ),
    (
        Connect(b"[2001:db8::1]", Family.INET6, 0x1234, b"2001:db8::1"),
        b"\x00\x00\x00\x1eC[2001:db8::1]\x006\x12\x342001:db8::1\x00",
    ),
    (
        Connect(b"localhost", Family.UNIX, 0, b"/run/sock"),
        b"\x00\x00\x00\x18Clocalhost\x00L\x00\x00/run/sock\x00",
    ),
    (Connect(b"unknown", Family.UNKNOWN), b"\x00\x00\x00\x0aCunknown\x00U"),
    (Helo(b"client.test"), b"\x00\x00\x00\x0dHclient.test\x00"),
    (
        Mail(b"<a@x.test>", (b"SIZE=100", b"BODY=8BITMIME")),
        b"\x00\x00\x00\x23M<a@x.test>\x00SIZE=100\x00BODY=8BITMIME\x00",
    ),
    (Mail(b"<>"), b"\x00\x00\x00\x04M<>\x00"),
    (Rcpt(b"<b@y.test>", (b"NOTIFY=NEVER",)), b"\x00\x00\x00\x19R<b@y.test>\x00NOTIFY=NEVER\x00"),
    (Rcpt(b"<c@y.test>"), b"\x00\x00\x00\x0cR<c@y.test>\x00"),
    (Data(), b"\x00\x00\x00\x01T"),
    (Header(b"Subject", b"hi\n there"), b"\x00\x00\x00\x13LSubject\x00hi\n there\x00"),
    (Header(b"X-Empty", b""), b"\x00\x00\x00\x0aLX-Empty\x00\x00"),
    (EndOfHeaders(), b"\x00\x00\x00\x01N"),
    (Body(b"line\r\n"), b"\x00\x00\x00\x07Bline\r\n"),
    (EndOfMessage(), b"\x00\x00\x00\x01E"),
    (EndOfMessage(b"tail\r\n"), b"\x00\x00\x00\x07Etail\r\n"),
    (Abort(), b"\x00\x00\x00\x01A"),
    (Unknown(b"XFOO bar"), b"\x00\x00\x00\x0aUXFOO bar\x00"),
    (Quit(), b"\x00\x00\x00\x01Q"),
    (QuitNoClose(), b"\x00\x00\x00\x01K"),
]

REPLY_CASES: list[tuple[Message, bytes]] = [
    (
        OptNegReply(6, Action(0x3F), Protocol(0x80)),
        b"\x00\x00\x00\x0dO\x00\x00\x00\x06\x00\x00\x00\x3f\x00\x00\x00\x80",
    ),
    (
        OptNegReply(
            6,
            Action(0x101),
            Protocol(0),
            ((MacroStage.CONNECT, b"j {client_addr}"), (MacroStage.EOM, b"i")),
        ),
        b"\x00\x00\x00\x27O\x00\x00\x00\x06\x00\x00\x01\x01\x00\x00\x00\x00"
        b"\x00\x00\x00\x00j {client_addr}\x00\x00\x00\x00\x05i\x00",
    ),
    (Continue(), b"\x00\x00\x00\x01c"),
    (Accept(), b"\x00\x00\x00\x01a"),
    (Reject(), b"\x00\x00\x00\x01r"),
    (Tempfail(), b"\x00\x00\x00\x01t"),
    (Discard(), b"\x00\x00\x00\x01d"),
    (Skip(), b"\x00\x00\x00\x01s"),
    (Progress(), b"\x00\x00\x00\x01p"),
    (Shutdown(), b"\x00\x00\x00\x014"),
    (ConnFail(), b"\x00\x00\x00\x01f"),
    (ReplyCode(b"550 5.7.1 go away"), b"\x00\x00\x00\x13y550 5.7.1 go away\x00"),
    (AddHeader(b"X-A", b"1"), b"\x00\x00\x00\x07hX-A\x001\x00"),
    (InsertHeader(1, b"X-I", b"v"), b"\x00\x00\x00\x0bi\x00\x00\x00\x01X-I\x00v\x00"),
    (ChangeHeader(2, b"Subject", b""), b"\x00\x00\x00\x0em\x00\x00\x00\x02Subject\x00\x00"),
    (AddRcpt(b"<n@z.test>"), b"\x00\x00\x00\x0c+<n@z.test>\x00"),
    (
        AddRcptPar(b"<n@z.test>", b"NOTIFY=NEVER"),
        b"\x00\x00\x00\x192<n@z.test>\x00NOTIFY=NEVER\x00",
    ),
    (AddRcptPar(b"<n@z.test>"), b"\x00\x00\x00\x0c2<n@z.test>\x00"),
    (DelRcpt(b"<b@y.test>"), b"\x00\x00\x00\x0c-<b@y.test>\x00"),
    (ChangeFrom(b"<s@z.test>", b"RET=HDRS"), b"\x00\x00\x00\x15e<s@z.test>\x00RET=HDRS\x00"),
    (ChangeFrom(b"<>"), b"\x00\x00\x00\x04e<>\x00"),
    (ReplaceBody(b"new\r\n"), b"\x00\x00\x00\x06bnew\r\n"),
    (ReplaceBody(b""), b"\x00\x00\x00\x01b"),
    (Quarantine(b"spam"), b"\x00\x00\x00\x06qspam\x00"),
]


def _decode(frame: bytes, table: dict[bytes, type[Message]]) -> Message:
    length = int.from_bytes(frame[:4], "big")
    assert length == len(frame) - 4
    return table[frame[4:5]].from_payload(frame[5:])


@pytest.mark.parametrize(("message", "wire"), COMMAND_CASES, ids=lambda v: type(v).__name__)
def test_command_golden_bytes(message: Message, wire: bytes) -> None:
    """Each MTA command encodes to, and decodes from, the bytes the reference gives."""
    assert message.frame() == wire
    assert _decode(wire, dict(COMMANDS)) == message


@pytest.mark.parametrize(("message", "wire"), REPLY_CASES, ids=lambda v: type(v).__name__)
def test_reply_golden_bytes(message: Message, wire: bytes) -> None:
    """Each filter reply encodes to, and decodes from, the bytes the reference gives."""
    assert message.frame() == wire
    assert _decode(wire, dict(REPLIES)) == message


def test_every_type_has_a_golden_case() -> None:
    """No packet type is left without hand-written bytes."""
    assert {type(m) for m, _ in COMMAND_CASES} == set(COMMANDS.values())
    assert {type(m) for m, _ in REPLY_CASES} == set(REPLIES.values())


@pytest.mark.parametrize(
    ("cls", "payload"),
    [
        (OptNeg, b"\x00" * 11),
        (OptNeg, b"\x00" * 13),
        (Macro, b""),
        (Macro, b"Cj\x00"),
        (Macro, b"Cj\x00v"),
        (Connect, b"host"),
        (Connect, b"host\x00"),
        (Connect, b"host\x00X\x00\x19a\x00"),
        (Connect, b"host\x004\x00"),
        (Connect, b"host\x004\x00\x19addr"),
        (Connect, b"host\x00Uextra"),
        (Helo, b"x"),
        (Helo, b"x\x00y\x00"),
        (Mail, b""),
        (Mail, b"<a>"),
        (Header, b"Subject\x00"),
        (Header, b"a\x00b\x00c\x00"),
        (Unknown, b"cmd"),
        (Data, b"x"),
        (Continue, b"\x00"),
        (Accept, b"x"),
        (ReplyCode, b"550 x"),
        (InsertHeader, b"\x00\x00\x01"),
        (InsertHeader, b"\x00\x00\x00\x01X\x00"),
        (ChangeHeader, b"\x00\x00\x00\x01X\x00v"),
        (AddRcptPar, b"a\x00b\x00c\x00"),
        (ChangeFrom, b"<a>"),
        (Quarantine, b"r"),
        (OptNegReply, b"\x00" * 12 + b"\x00\x00\x00\x07j\x00"),
        (OptNegReply, b"\x00" * 12 + b"\x00\x00\x00"),
        (OptNegReply, b"\x00" * 12 + b"\x00\x00\x00\x01abc"),
    ],
)
def test_malformed_payload_is_refused(cls: type[Message], payload: bytes) -> None:
    """Payloads that break the encoding raise a MALFORMED protocol error, never crash."""
    with pytest.raises(LocalProtocolError) as info:
        cls.from_payload(payload)
    assert info.value.kind.value == "malformed"


@pytest.mark.parametrize(
    "message",
    [
        Helo(b"a\x00b"),
        Header(b"X", b"v\x00"),
        Macro(b"CC"),
        Connect(b"h", Family.INET, 70000, b"a"),
        InsertHeader(2**32, b"X", b"v"),
    ],
)
def test_unencodable_fields_are_refused(message: Message) -> None:
    """A NUL inside a string or an out-of-range number cannot be encoded silently."""
    with pytest.raises(LocalProtocolError):
        message.frame()
