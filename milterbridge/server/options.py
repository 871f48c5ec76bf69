"""What the bridge answers to the MTA's OPTNEG, computed from the filters' cached options.

The MTA negotiates before any filter has joined the session (design §4.1), so the answer comes
from what each milter negotiated the last time we connected to it (``None``: not known yet, which
counts as wanting every step, every action and every reply). The rules follow the protocol notes
§8.1, as milter-manager merges its children's options:

* version: the MTA's, at most 6;
* actions: the union of the filters' actions (edits from any filter must be forwardable);
* a step is declined (SMFIP_NO*) only when no filter wants it -- a filter that joins late still
  needs the earlier steps replayed, so "wants" is about its options, not its ``stages``;
* no-reply (SMFIP_NR_*) for a step only when every filter either declined it or promised no
  reply to it: otherwise the bridge must answer, even if only with a CONTINUE of its own;
* SKIP when the MTA offers it (the bridge decides itself when to skip);
* macro lists: per stage, the union of the filters' lists plus Postfix's default list whenever
  some filter did not send a list for that stage (a list we send replaces the MTA's defaults);
  no lists at all when no filter sent any.

HTTP hooks take part through :func:`hook_options`: to the MTA a hook looks like a milter that
wants every envelope step (its request carries the whole envelope whatever its stages), the
headers and body only when it lists ``data``, answers only at its listed stages, and may edit
anything. When hooks are configured, the macro lists also ask for :data:`BRIDGE_MACROS`, the
macros the hook request is built from (design §9).

HDR_LEADSPC and RCPT_REJ are never requested: the bridge would have to translate header spacing
and refused recipients per upstream, and does not yet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..config import HookFilter
from ..milter import (
    ALL_ACTIONS,
    Action,
    Body,
    Command,
    Connect,
    Data,
    EndOfHeaders,
    Header,
    Helo,
    MacroStage,
    Mail,
    Negotiated,
    OptNeg,
    OptNegReply,
    Protocol,
    Rcpt,
    Unknown,
    answer_offer,
)
from ..milter.negotiation import STEP_FLAGS
from .filters import HOOK_STAGES_AT

#: The steps a filter can decline or promise not to answer.
STEPS: tuple[type[Command], ...] = (
    Connect,
    Helo,
    Mail,
    Rcpt,
    Data,
    Header,
    EndOfHeaders,
    Body,
    Unknown,
)

#: Postfix's default macro lists (milter_*_macros, Postfix 3.7; protocol notes §6.1).
POSTFIX_DEFAULT_MACROS: dict[MacroStage, tuple[bytes, ...]] = {
    MacroStage.CONNECT: (b"j", b"{daemon_name}", b"{daemon_addr}", b"v", b"_"),
    MacroStage.HELO: (
        b"{tls_version}",
        b"{cipher}",
        b"{cipher_bits}",
        b"{cert_subject}",
        b"{cert_issuer}",
    ),
    MacroStage.ENVFROM: (
        b"i",
        b"{auth_type}",
        b"{auth_authen}",
        b"{auth_author}",
        b"{mail_addr}",
        b"{mail_host}",
        b"{mail_mailer}",
    ),
    MacroStage.ENVRCPT: (b"i", b"{rcpt_addr}", b"{rcpt_host}", b"{rcpt_mailer}"),
    MacroStage.DATA: (b"i",),
    MacroStage.EOH: (b"i",),
    MacroStage.EOM: (b"i",),
}


#: Macros the bridge itself needs, per stage, for the hook request and ``enable`` (design §9).
BRIDGE_MACROS: dict[MacroStage, tuple[bytes, ...]] = {
    MacroStage.CONNECT: (
        b"j",
        b"{daemon_name}",
        b"{daemon_addr}",
        b"{daemon_port}",
        b"{client_ptr}",
    ),
    MacroStage.HELO: (
        b"{tls_version}",
        b"{cipher}",
        b"{cipher_bits}",
        b"{cert_subject}",
        b"{cert_issuer}",
    ),
    MacroStage.ENVFROM: (b"i", b"{auth_type}", b"{auth_authen}"),
    MacroStage.ENVRCPT: (b"i",),
    MacroStage.EOM: (b"i",),
}


def hook_options(hook: HookFilter) -> Negotiated:
    """What a hook asks of the MTA, in the terms the milters' cached options use."""
    protocol = Protocol.NODATA | Protocol.NOUNKNOWN | Protocol.NOEOH
    if "data" in hook.stages:
        protocol |= Protocol.NR_HDR | Protocol.NR_BODY
    else:
        protocol |= Protocol.NOHDRS | Protocol.NOBODY
    for step, stages in HOOK_STAGES_AT.items():
        if not any(stage in hook.stages for stage in stages):
            protocol |= STEP_FLAGS[step][1]
    return Negotiated(6, ALL_ACTIONS, protocol)


def _wants(options: Negotiated | None, step: type[Command]) -> bool:
    return options is None or options.sends(step)


def _silent(options: Negotiated | None, step: type[Command]) -> bool:
    return options is not None and (not options.sends(step) or options.no_reply(step))


def bridge_protocol(filters: Sequence[Negotiated | None]) -> Protocol:
    """The protocol bits the bridge asks of the MTA (before narrowing to its offer)."""
    bits = Protocol.SKIP
    for step in STEPS:
        no_flag, nr_flag = STEP_FLAGS[step]
        if not any(_wants(f, step) for f in filters):
            bits |= no_flag
        elif all(_silent(f, step) for f in filters):
            bits |= nr_flag
    return bits


def bridge_actions(filters: Sequence[Negotiated | None]) -> Action:
    actions = Action.NONE
    for options in filters:
        actions |= ALL_ACTIONS if options is None else options.actions
    return actions & ~Action.SETSYMLIST


def bridge_macros(
    filters: Sequence[Negotiated | None],
    extra: Mapping[MacroStage, Sequence[bytes]] | None = None,
) -> dict[MacroStage, bytes]:
    """Per-stage macro lists to request, or {} to leave the MTA's defaults alone.

    ``extra`` are macros the bridge needs itself; asking for them replaces the MTA's default
    lists, so the defaults are asked for too.
    """
    extra = extra or {}
    if not extra and not any(options is not None and options.macros for options in filters):
        return {}
    lists: dict[MacroStage, bytes] = {}
    for stage in MacroStage:
        names: dict[bytes, None] = {}
        for options in filters:
            wanted = options.macros.get(stage) if options is not None else None
            for name in POSTFIX_DEFAULT_MACROS[stage] if wanted is None else wanted:
                names[name] = None
        for name in extra.get(stage, ()):
            names[name] = None
        if names:
            lists[stage] = b" ".join(names)
    return lists


#: Protocol capabilities the bridge never requests from the MTA, so it must not offer them on.
NOT_FORWARDED = Protocol.HDR_LEADSPC | Protocol.RCPT_REJ


def offer_for_upstreams(offer: OptNeg, negotiated: Negotiated) -> OptNeg:
    """What the milters of this session are offered: what the bridge can forward.

    Only the actions the MTA granted the bridge (an edit the MTA did not grant cannot be
    forwarded), the version agreed with the MTA, and the MTA's protocol offer without the
    capabilities the bridge does not translate (header leading space, rejected recipients).
    SETSYMLIST stays when the MTA offered it: it only shapes what a milter is sent.
    """
    actions = negotiated.actions | (offer.actions & Action.SETSYMLIST)
    protocol = Protocol(int(offer.protocol) & ~int(NOT_FORWARDED))
    return OptNeg(negotiated.version, actions, protocol)


#: The steps ``deferMessageVerdicts`` asks the MTA not to wait at.
DEFERRED_STEPS = (Header, EndOfHeaders, Body)


def answer_mta(
    offer: OptNeg,
    filters: Sequence[Negotiated | None],
    hooks: Sequence[HookFilter] = (),
    *,
    defer_message_verdicts: bool = False,
) -> OptNegReply:
    """The bridge's OPTNEG answer to the MTA, from every milter's cached options and the hooks.

    With ``defer_message_verdicts`` the MTA is asked for no reply to headers, end-of-headers and
    body chunks (SMFIP_NR_*): it streams them without waiting, and a filter's refusal of one of
    them reaches the MTA as the answer to end-of-message.
    """
    every = [*filters, *(hook_options(hook) for hook in hooks)]
    protocol = bridge_protocol(every)
    if defer_message_verdicts:
        for step in DEFERRED_STEPS:
            no_flag, nr_flag = STEP_FLAGS[step]
            if not protocol & no_flag:
                protocol |= nr_flag
    return answer_offer(
        offer,
        actions=bridge_actions(every),
        protocol=protocol,
        macros=bridge_macros(every, BRIDGE_MACROS if hooks else None),
    )
