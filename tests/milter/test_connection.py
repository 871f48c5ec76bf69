"""The Connection in both roles, over a fake link: complete sessions and every refusal."""

from __future__ import annotations

import pytest

from milterbridge.milter import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    CLOSED,
    NEED_DATA,
    Abort,
    Accept,
    Action,
    AddHeader,
    Body,
    ChangeFrom,
    ChangeHeader,
    Connect,
    Connection,
    ConnFail,
    Continue,
    Data,
    Discard,
    EndOfHeaders,
    EndOfMessage,
    Family,
    Header,
    Helo,
    InsertHeader,
    LocalProtocolError,
    Macro,
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
    RemoteProtocolError,
    ReplaceBody,
    ReplyCode,
    Role,
    Shutdown,
    Skip,
    Tempfail,
    Unknown,
)

from .pair import Pair

CONNECT = Connect(b"client.test", Family.INET, 4321, b"192.0.2.7")


def _open(pair: Pair) -> None:
    pair.mta(Macro(b"C", ((b"j", b"mx.test"),)), CONNECT)
    pair.filter(Continue())
    pair.mta(Helo(b"client.test"))
    pair.filter(Continue())


def _message_up_to_eom(pair: Pair) -> None:
    for command in (Mail(b"<a@x.test>"), Rcpt(b"<b@y.test>"), Data()):
        pair.mta(command)
        pair.filter(Continue())
    pair.mta(Header(b"Subject", b"hi"))
    pair.filter(Continue())
    pair.mta(EndOfHeaders())
    pair.filter(Continue())
    pair.mta(Body(b"hello\r\n"))
    pair.filter(Continue())
    pair.mta(EndOfMessage())


def test_full_session_two_messages_and_quit() -> None:
    """Negotiate, connect, two messages with edits, abort between, quit: both sides agree."""
    pair = Pair()
    pair.negotiate()
    _open(pair)
    _message_up_to_eom(pair)
    edits: list[Message] = [
        ReplaceBody(b"a"),
        ReplaceBody(b"b"),
        AddHeader(b"X-A", b"1"),
        InsertHeader(0, b"X-I", b"2"),
        ChangeHeader(1, b"Subject", b"new"),
        ChangeFrom(b"<s@z.test>"),
        Quarantine(b"why"),
        Progress(),
        Accept(),
    ]
    assert pair.filter(*edits) == edits
    pair.mta(Abort())
    _message_up_to_eom(pair)
    pair.filter(Continue())
    pair.mta(Abort(), Quit())
    assert pair.mta_side.closed and pair.filter_side.closed


def test_quit_nc_starts_a_new_session_on_the_same_connection() -> None:
    """After QUIT_NC the next command is a CONNECT again, without a new OPTNEG."""
    pair = Pair()
    pair.negotiate()
    _open(pair)
    pair.mta(QuitNoClose())
    pair.mta(CONNECT)
    pair.filter(Continue())
    with pytest.raises(LocalProtocolError):
        pair.mta_side.send(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))


def test_no_reply_steps_are_not_awaited_and_replies_to_them_are_refused() -> None:
    """With NR_HDR the MTA sends headers back to back; a reply to one desynchronises -> error."""
    pair = Pair()
    pair.negotiate(Protocol.NR_HDR)
    _open(pair)
    for command in (Mail(b"<a>"), Rcpt(b"<b>"), Data()):
        pair.mta(command)
        pair.filter(Continue())
    pair.mta(Header(b"A", b"1"), Header(b"B", b"2"))
    assert pair.mta_side.awaiting is None
    with pytest.raises(LocalProtocolError, match="no reply is expected"):
        pair.filter_side.send(Continue())


def test_disabled_steps_must_not_be_sent_and_may_be_skipped() -> None:
    """NOHELO/NOHDRS: the MTA skips those steps; sending one anyway is refused."""
    pair = Pair()
    pair.negotiate(Protocol.NOHELO | Protocol.NOHDRS)
    pair.mta(CONNECT)
    pair.filter(Continue())
    pair.mta(Mail(b"<a>"))
    pair.filter(Continue())
    pair.mta(Rcpt(b"<b>"))
    pair.filter(Continue())
    with pytest.raises(LocalProtocolError, match="exclude"):
        pair.mta_side.send(Header(b"A", b"1"))


def test_version_2_never_gets_data_unknown_or_quit_nc() -> None:
    """A version 2 filter gets no DATA, UNKNOWN or QUIT_NC (Postfix's version masks)."""
    for command in (Data(), Unknown(b"X"), QuitNoClose()):
        pair = Pair()
        offer = OptNeg(2, Action(0x3F), Protocol(0x7F))
        pair.mta(offer)
        pair.filter(OptNegReply(2, Action.ADDHDRS, Protocol.NONE))
        pair.mta(CONNECT)
        pair.filter(Continue())
        pair.mta(Mail(b"<a>"))
        pair.filter(Continue())
        pair.mta(Rcpt(b"<a>"))
        pair.filter(Continue())
        with pytest.raises(LocalProtocolError):
            pair.mta_side.send(command)


@pytest.mark.parametrize(
    ("reply", "next_command"),
    [
        (Accept(), Helo(b"x")),
        (Reject(), Mail(b"<a>")),
        (ReplyCode(b"421 4.7.0 bye"), Mail(b"<a>")),
        (Tempfail(), Helo(b"x")),
        (Shutdown(), Helo(b"x")),
    ],
)
def test_connection_level_decisions_end_the_filters_part(
    reply: Message, next_command: Message
) -> None:
    """After a connection-level decision only ABORT/QUIT may follow (libmilter drops the rest)."""
    refused, allowed = Pair(), Pair()
    for pair in (refused, allowed):
        pair.negotiate()
        pair.mta(CONNECT)
        pair.filter(reply)
    with pytest.raises(LocalProtocolError, match="connection"):
        refused.mta_side.send(next_command)
    allowed.mta(Abort(), Quit())
    assert allowed.filter_side.closed


@pytest.mark.parametrize("reply", [Accept(), Reject(), Tempfail(), Discard()])
def test_message_level_decisions_end_the_message(reply: Message) -> None:
    """After a final decision at MAIL, RCPT/DATA are refused but a new MAIL after ABORT works."""
    pair = Pair()
    pair.negotiate()
    _open(pair)
    pair.mta(Mail(b"<a>"))
    pair.filter(reply)
    with pytest.raises(LocalProtocolError, match="message"):
        Pair._carry(pair.mta_side, pair.filter_side, (Rcpt(b"<b>"),))


def test_rcpt_reject_refuses_only_that_recipient() -> None:
    """REJECT at RCPT keeps the message going: more RCPTs and DATA are legal."""
    pair = Pair()
    pair.negotiate()
    _open(pair)
    pair.mta(Mail(b"<a>"))
    pair.filter(Continue())
    pair.mta(Rcpt(b"<bad>"))
    pair.filter(ReplyCode(b"550 5.1.1 no such user"))
    pair.mta(Rcpt(b"<good>"))
    pair.filter(Continue())
    pair.mta(Data())
    pair.filter(Continue())


def test_skip_stops_the_body_but_not_end_of_message() -> None:
    """After SKIP no more BODY may be sent; END-OF-MESSAGE still is."""
    pair = Pair()
    pair.negotiate(Protocol.SKIP)
    _open(pair)
    for command in (Mail(b"<a>"), Rcpt(b"<b>"), Data(), EndOfHeaders(), Body(b"x")):
        pair.mta(command)
        pair.filter(Skip() if isinstance(command, Body) else Continue())
    with pytest.raises(LocalProtocolError, match="skip"):
        pair.mta_side.send(Body(b"y"))


def test_skip_needs_negotiation_and_a_body_packet() -> None:
    """SKIP without SMFIP_SKIP, or in reply to anything but BODY, is refused."""
    pair = Pair()
    pair.negotiate()
    _open(pair)
    pair.mta(Mail(b"<a>"))
    with pytest.raises(LocalProtocolError, match="Skip"):
        pair.filter_side.send(Skip())


@pytest.mark.parametrize(
    "edit",
    [AddHeader(b"X", b"y"), ReplaceBody(b"x"), Quarantine(b"r"), ChangeFrom(b"<a>")],
)
def test_edits_outside_end_of_message_are_refused(edit: Message) -> None:
    """An edit in reply to a header is a protocol violation (Postfix: unexpected response)."""
    pair = Pair()
    pair.negotiate()
    _open(pair)
    for command in (Mail(b"<a>"), Rcpt(b"<b>"), Data()):
        pair.mta(command)
        pair.filter(Continue())
    pair.mta(Header(b"A", b"1"))
    pair.mta_side.receive_data(edit.frame())
    with pytest.raises(RemoteProtocolError, match="outside end-of-message"):
        pair.mta_side.next_event()


def test_edits_need_their_negotiated_action() -> None:
    """A filter that negotiated only ADDHDRS may not change the sender."""
    pair = Pair()
    pair.negotiate(actions=Action.ADDHDRS)
    _open(pair)
    _message_up_to_eom(pair)
    pair.filter(AddHeader(b"X", b"1"))
    with pytest.raises(LocalProtocolError, match="CHGFROM"):
        pair.filter_side.send(ChangeFrom(b"<a>"))


def test_replace_body_packets_must_be_consecutive() -> None:
    """REPLBODY, another edit, REPLBODY again: Postfix refuses it, so do we."""
    pair = Pair()
    pair.negotiate()
    _open(pair)
    _message_up_to_eom(pair)
    pair.filter(ReplaceBody(b"a"), AddHeader(b"X", b"1"))
    with pytest.raises(LocalProtocolError, match="ReplaceBody"):
        pair.filter_side.send(ReplaceBody(b"b"))


def test_malformed_reply_code_is_refused_by_the_mta_side() -> None:
    """A REPLYCODE whose enhanced class differs from its code is a remote protocol error."""
    pair = Pair()
    pair.negotiate()
    pair.mta(CONNECT)
    pair.mta_side.receive_data(ReplyCode(b"550 4.7.1 mixed").frame())
    with pytest.raises(RemoteProtocolError, match="REPLYCODE"):
        pair.mta_side.next_event()


def test_conn_fail_is_never_legal() -> None:
    """SMFIR_CONN_FAIL decodes, but no MTA accepts it as a reply."""
    pair = Pair()
    pair.negotiate()
    pair.mta(CONNECT)
    with pytest.raises(LocalProtocolError, match="CONN_FAIL"):
        pair.filter_side.send(ConnFail())


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        (OptNegReply(7, Action.NONE, Protocol.NONE), "version"),
        (OptNegReply(1, Action.NONE, Protocol.NONE), "version"),
        (OptNegReply(6, Action(0x200), Protocol.NONE), "actions"),
        (OptNegReply(6, Action.NONE, Protocol.MDS_1M), "protocol bits"),
    ],
)
def test_negotiation_answer_is_validated(reply: OptNegReply, problem: str) -> None:
    """The MTA side refuses an answer outside its offer, as Sendmail would."""
    pair = Pair()
    pair.mta(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
    pair.mta_side.receive_data(reply.frame())
    with pytest.raises(RemoteProtocolError, match=problem) as info:
        pair.mta_side.next_event()
    assert info.value.kind.value == "negotiation"


def test_offer_below_version_2_is_refused() -> None:
    """libmilter refuses protocol version 1; so does our filter side."""
    filter_side = Connection(Role.FILTER)
    filter_side.receive_data(OptNeg(1, Action(0x0F), Protocol(0x3F)).frame())
    with pytest.raises(RemoteProtocolError, match="version"):
        filter_side.next_event()


def test_errors_are_sticky() -> None:
    """After a protocol error every later call fails too."""
    filter_side = Connection(Role.FILTER)
    filter_side.receive_data(b"\x00\x00\x00\x01Z")
    with pytest.raises(RemoteProtocolError, match="unknown command"):
        filter_side.next_event()
    with pytest.raises(RemoteProtocolError, match="error state"):
        filter_side.next_event()
    with pytest.raises(RemoteProtocolError):
        filter_side.send(Continue())


def test_reply_letter_from_the_mta_is_unknown() -> None:
    """A filter-side connection does not accept reply letters as commands."""
    filter_side = Connection(Role.FILTER)
    filter_side.receive_data(Continue().frame())
    with pytest.raises(RemoteProtocolError, match="unknown command letter"):
        filter_side.next_event()


def test_command_before_optneg_is_refused() -> None:
    """The first packet must be OPTNEG."""
    filter_side = Connection(Role.FILTER)
    filter_side.receive_data(CONNECT.frame())
    with pytest.raises(RemoteProtocolError, match="before OPTNEG"):
        filter_side.next_event()


def test_eof_between_packets_is_closed_and_mid_packet_is_an_error() -> None:
    """The MTA may hang up between packets; a half packet is a truncation error."""
    filter_side = Connection(Role.FILTER)
    filter_side.receive_data(b"")
    assert filter_side.next_event() is CLOSED
    filter_side = Connection(Role.FILTER)
    filter_side.receive_data(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL).frame()[:7])
    assert filter_side.next_event() is NEED_DATA
    filter_side.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        filter_side.next_event()
    assert info.value.kind.value == "truncated"


def test_filter_closing_while_a_reply_is_owed_is_an_error() -> None:
    """An upstream that hangs up instead of answering is a truncation, not a clean close."""
    pair = Pair()
    pair.negotiate()
    pair.mta(CONNECT)
    pair.mta_side.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="without answering Connect"):
        pair.mta_side.next_event()


def test_command_while_awaiting_a_reply_is_refused() -> None:
    """The protocol is strictly request/response: no second command before the reply."""
    pair = Pair()
    pair.negotiate()
    pair.mta(CONNECT)
    with pytest.raises(LocalProtocolError, match="awaiting the reply"):
        pair.mta_side.send(Helo(b"x"))


def test_out_of_order_message_commands_are_refused() -> None:
    """RCPT before MAIL, DATA after headers, MAIL inside a message: all refused."""
    pair = Pair()
    pair.negotiate()
    _open(pair)
    with pytest.raises(LocalProtocolError, match="out of order"):
        pair.mta_side.send(Rcpt(b"<b>"))


def test_roles_cannot_send_each_others_packets() -> None:
    """The MTA side cannot send a reply and the filter side cannot send a command."""
    with pytest.raises(LocalProtocolError):
        Connection(Role.MTA).send(Continue())
    with pytest.raises(LocalProtocolError):
        Connection(Role.FILTER).send(CONNECT)
