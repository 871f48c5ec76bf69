"""The bridge's OPTNEG answer to the MTA from the filters' cached options."""

from __future__ import annotations

from milterbridge.milter import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    Action,
    MacroStage,
    Negotiated,
    OptNeg,
    Protocol,
    agree,
)
from milterbridge.server.options import POSTFIX_DEFAULT_MACROS, answer_mta, offer_for_upstreams

POSTFIX = OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL)


def _options(
    protocol: Protocol = Protocol.NONE,
    actions: Action = Action.ADDHDRS,
    macros: dict[MacroStage, tuple[bytes, ...]] | None = None,
) -> Negotiated:
    return Negotiated(6, actions, protocol, macros or {})


def test_no_filters_declines_every_step() -> None:
    """With nothing behind it the bridge asks the MTA for no events and no edits."""
    reply = answer_mta(POSTFIX, [])
    negotiated = agree(POSTFIX, reply)
    assert reply.actions == Action.NONE
    for bit in (
        Protocol.NOCONNECT,
        Protocol.NOHELO,
        Protocol.NOMAIL,
        Protocol.NORCPT,
        Protocol.NOHDRS,
        Protocol.NOEOH,
        Protocol.NOBODY,
        Protocol.NODATA,
        Protocol.NOUNKNOWN,
    ):
        assert negotiated.protocol & bit


def test_unknown_filter_wants_everything() -> None:
    """A filter never contacted yet counts as wanting every step, action and reply."""
    reply = answer_mta(POSTFIX, [None, _options(Protocol.NOHDRS | Protocol.NR_BODY)])
    assert reply.actions == ALL_ACTIONS & ~Action.SETSYMLIST
    assert reply.protocol == Protocol.SKIP
    assert reply.macros == ()


def test_a_step_is_declined_only_when_no_filter_wants_it() -> None:
    """NO_x is the AND over filters; the union of actions is requested."""
    first = _options(Protocol.NOHDRS | Protocol.NOUNKNOWN, Action.ADDHDRS)
    second = _options(Protocol.NOUNKNOWN | Protocol.NOBODY, Action.CHGBODY)
    reply = answer_mta(POSTFIX, [first, second])
    assert reply.protocol & Protocol.NOUNKNOWN
    assert not reply.protocol & (Protocol.NOHDRS | Protocol.NOBODY)
    assert reply.actions == Action.ADDHDRS | Action.CHGBODY


def test_no_reply_only_when_every_filter_is_silent_on_the_step() -> None:
    """NR_x when each filter declined x or promised no reply to it; one answering filter wins."""
    first = _options(Protocol.NR_HDR | Protocol.NR_EOH)
    second = _options(Protocol.NOHDRS | Protocol.NR_EOH | Protocol.NR_CONN)
    reply = answer_mta(POSTFIX, [first, second])
    assert reply.protocol & Protocol.NR_HDR
    assert reply.protocol & Protocol.NR_EOH
    assert not reply.protocol & Protocol.NR_CONN


def test_macro_lists_are_merged_with_postfix_defaults_where_needed() -> None:
    """Union per stage; a filter without a list for a stage brings Postfix's default list."""
    first = _options(macros={MacroStage.CONNECT: (b"{client_addr}",), MacroStage.EOM: (b"i",)})
    second = _options(macros={MacroStage.CONNECT: (b"j",)})
    reply = answer_mta(POSTFIX, [first, second])
    lists = dict(reply.macros)
    assert lists[MacroStage.CONNECT] == b"{client_addr} j"
    assert lists[MacroStage.EOM] == b" ".join(POSTFIX_DEFAULT_MACROS[MacroStage.EOM])
    assert lists[MacroStage.HELO] == b" ".join(POSTFIX_DEFAULT_MACROS[MacroStage.HELO])
    assert reply.actions & Action.SETSYMLIST


def test_answer_is_narrowed_to_an_old_mta() -> None:
    """Against a version 2 offer the answer keeps only what version 2 defines."""
    old = OptNeg(2, Action(0x3F), Protocol(0x7F))
    reply = answer_mta(old, [_options(Protocol.NR_HDR, Action.CHGFROM | Action.ADDHDRS)])
    assert reply.version == 2
    assert reply.actions == Action.ADDHDRS
    assert agree(old, reply).version == 2


def test_milters_are_offered_only_what_the_bridge_can_forward() -> None:
    """The MTA's grant of actions and version; no leading-space or rejected-recipient bits."""

    granted = Negotiated(6, Action.ADDHDRS | Action.CHGBODY, Protocol.SKIP)
    offer = offer_for_upstreams(POSTFIX, granted)
    assert offer.version == 6
    assert offer.actions == Action.ADDHDRS | Action.CHGBODY | Action.SETSYMLIST
    assert not offer.protocol & (Protocol.HDR_LEADSPC | Protocol.RCPT_REJ)
    assert offer.protocol & Protocol.NR_HDR and offer.protocol & Protocol.SKIP


def test_deferred_verdicts_ask_for_no_reply_to_headers_and_body_only() -> None:
    """deferMessageVerdicts adds NR_HDR/NR_EOH/NR_BODY, never to a step nobody wants."""
    plain = agree(POSTFIX, answer_mta(POSTFIX, [_options()]))
    deferred = agree(POSTFIX, answer_mta(POSTFIX, [_options()], defer_message_verdicts=True))
    wanted = Protocol.NR_HDR | Protocol.NR_EOH | Protocol.NR_BODY
    assert not plain.protocol & wanted
    assert deferred.protocol & wanted == wanted
    assert not deferred.protocol & (Protocol.NR_CONN | Protocol.NR_MAIL | Protocol.NR_RCPT)
    no_body = agree(
        POSTFIX,
        answer_mta(POSTFIX, [_options(Protocol.NOBODY)], defer_message_verdicts=True),
    )
    assert no_body.protocol & Protocol.NOBODY and not no_body.protocol & Protocol.NR_BODY
