"""Option negotiation: building a filter's answer and validating it as an MTA."""

from __future__ import annotations

import pytest

from milterbridge.milter import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    Action,
    Body,
    Connect,
    Data,
    Header,
    LocalProtocolError,
    MacroStage,
    OptNeg,
    OptNegReply,
    Protocol,
    QuitNoClose,
    Unknown,
    agree,
    answer_offer,
)
from milterbridge.milter.negotiation import effective_offer

POSTFIX_V6 = OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL)
POSTFIX_V2 = OptNeg(2, ALL_ACTIONS, Protocol(0x7F))


def test_answer_is_narrowed_to_the_offer() -> None:
    """Bits the MTA did not offer are dropped, as libmilter drops them, never requested."""
    reply = answer_offer(
        POSTFIX_V2,
        actions=ALL_ACTIONS,
        protocol=Protocol.NR_HDR | Protocol.NOUNKNOWN | Protocol.NODATA | Protocol.NOHELO,
        macros={MacroStage.CONNECT: b"j"},
    )
    assert reply.version == 2
    assert reply.protocol == Protocol.NOHELO
    assert reply.macros == ()  # macro lists need version 6 and SETSYMLIST
    assert agree(POSTFIX_V2, reply).version == 2


def test_answer_with_macro_lists_requests_setsymlist() -> None:
    """Macro lists in the answer come with SMFIF_SETSYMLIST, sorted by stage."""
    reply = answer_offer(
        POSTFIX_V6,
        actions=Action.ADDHDRS,
        protocol=Protocol.SKIP,
        macros={MacroStage.EOM: b"i", MacroStage.CONNECT: b"j {client_addr}"},
    )
    assert reply.actions == Action.ADDHDRS | Action.SETSYMLIST
    assert reply.macros == ((MacroStage.CONNECT, b"j {client_addr}"), (MacroStage.EOM, b"i"))
    negotiated = agree(POSTFIX_V6, reply)
    assert negotiated.macros == {
        MacroStage.CONNECT: (b"j", b"{client_addr}"),
        MacroStage.EOM: (b"i",),
    }
    assert negotiated.skip


def test_sendmail_style_commas_in_macro_lists() -> None:
    """Sendmail accepts commas between macro names; so do we."""
    reply = OptNegReply(6, Action.SETSYMLIST, Protocol.NONE, ((MacroStage.HELO, b"a,b c"),))
    assert agree(POSTFIX_V6, reply).macros == {MacroStage.HELO: (b"a", b"b", b"c")}


def test_two_lists_for_one_stage_are_refused() -> None:
    """A stage named twice in the answer is ambiguous: refused."""
    reply = OptNegReply(
        6, Action.SETSYMLIST, Protocol.NONE, ((MacroStage.HELO, b"a"), (MacroStage.HELO, b"b"))
    )
    with pytest.raises(LocalProtocolError, match="two macro lists"):
        agree(POSTFIX_V6, reply)


def test_zero_offer_means_version_1_sets() -> None:
    """An MTA offering 0 actions/protocol gets libmilter's v1 sets (0x0F / 0x3F)."""
    offer = effective_offer(OptNeg(2, Action.NONE, Protocol.NONE))
    assert offer.actions == Action(0x0F)
    assert offer.protocol == Protocol(0x3F)


def test_negotiated_flags_answer_may_i_and_must_i() -> None:
    """NO_* removes events, NR_* removes replies, versions remove DATA/UNKNOWN/QUIT_NC."""
    v6 = agree(
        POSTFIX_V6,
        OptNegReply(6, Action.NONE, Protocol.NOHDRS | Protocol.NR_BODY | Protocol.HDR_LEADSPC),
    )
    assert not v6.sends(Header) and v6.sends(Body) and v6.no_reply(Body)
    assert not v6.no_reply(Connect)
    assert v6.leading_space
    v2 = agree(POSTFIX_V2, OptNegReply(2, Action.NONE, Protocol.NONE))
    assert not v2.sends(Data) and not v2.sends(Unknown) and not v2.sends(QuitNoClose)


@pytest.mark.parametrize(
    ("bits", "size"),
    [(Protocol.NONE, 65535), (Protocol.MDS_256K, 262143), (Protocol.MDS_1M, 1048575)],
)
def test_mds_bits_give_the_data_size(bits: Protocol, size: int) -> None:
    """SMFIP_MDS_* select the larger packet sizes of Sendmail's _FFR_MDS_NEGOTIATE."""
    offer = OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL | Protocol.MDS_256K | Protocol.MDS_1M)
    assert agree(offer, OptNegReply(6, Action.NONE, bits)).max_data_size == size
