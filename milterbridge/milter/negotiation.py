"""Option negotiation (SMFIC_OPTNEG) for both roles.

The MTA offers (version, actions, protocol); the filter answers with what it will use, plus
optional macro lists. What each side checks follows protocol notes §4.5, strictest of the three
implementations (pitfall 10: code tested only against Postfix breaks on Sendmail):

* version: 2 <= filter's <= MTA's (Postfix: higher is fatal; Sendmail/libmilter: below 2 fatal);
* actions: the filter's are a subset of the offer (all three check);
* protocol: the filter's bits are a subset of the offer (Sendmail and libmilter check; Postfix
  does not), and bits the chosen version does not define are ignored, as Postfix masks them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .constants import (
    ALL_PROTOCOL,
    MAX_VERSION,
    MIN_VERSION,
    Action,
    MacroStage,
    Protocol,
)
from .errors import ErrorKind, LocalProtocolError
from .messages import (
    Body,
    Command,
    Connect,
    Data,
    EndOfHeaders,
    Header,
    Helo,
    Mail,
    OptNeg,
    OptNegReply,
    QuitNoClose,
    Rcpt,
    Unknown,
)

#: The step each event belongs to: its NO_* flag (suppress it) and NR_* flag (no reply).
STEP_FLAGS: dict[type[Command], tuple[Protocol, Protocol]] = {
    Connect: (Protocol.NOCONNECT, Protocol.NR_CONN),
    Helo: (Protocol.NOHELO, Protocol.NR_HELO),
    Mail: (Protocol.NOMAIL, Protocol.NR_MAIL),
    Rcpt: (Protocol.NORCPT, Protocol.NR_RCPT),
    Data: (Protocol.NODATA, Protocol.NR_DATA),
    Header: (Protocol.NOHDRS, Protocol.NR_HDR),
    EndOfHeaders: (Protocol.NOEOH, Protocol.NR_EOH),
    Body: (Protocol.NOBODY, Protocol.NR_BODY),
    Unknown: (Protocol.NOUNKNOWN, Protocol.NR_UNKN),
}

#: Lowest protocol version in which an MTA sends the event (Postfix's per-version masks).
MIN_VERSION_FOR: dict[type[Command], int] = {Unknown: 3, Data: 4, QuitNoClose: 6}

#: Protocol bits each version defines (Postfix's MILTER8_V*_PROTO_MASK; NR_HDR exists in v2 as
#: Postfix's "no_header_reply").
_VERSION_PROTOCOL_MASK = {
    2: Protocol(0xFF),
    3: Protocol(0x1FF),
    4: Protocol(0x3FF),
    5: Protocol(0x3FF),
    6: ALL_PROTOCOL | Protocol.MDS_256K | Protocol.MDS_1M,
}

#: What libmilter assumes when an MTA offers 0 (SMFI_V1_ACTS / SMFI_V1_PROT).
_ZERO_ACTIONS = Action(0x0F)
_ZERO_PROTOCOL = Protocol(0x3F)


def effective_offer(offer: OptNeg) -> OptNeg:
    """The offer as libmilter reads it: 0 actions/protocol mean the version 1 sets."""
    return OptNeg(
        offer.version,
        offer.actions or _ZERO_ACTIONS,
        offer.protocol or _ZERO_PROTOCOL,
    )


def check_offer(offer: OptNeg) -> None:
    """What a filter refuses in an MTA's offer (libmilter aborts below version 2)."""
    if offer.version < MIN_VERSION:
        raise LocalProtocolError(
            f"MTA offers protocol version {offer.version}, below {MIN_VERSION}",
            ErrorKind.NEGOTIATION,
        )


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The options both sides agreed on; answers every "may I / must I" question after OPTNEG."""

    version: int
    actions: Action
    protocol: Protocol
    macros: dict[MacroStage, tuple[bytes, ...]] = field(default_factory=dict)
    #: The answers of ``sends`` and ``no_reply``, worked out once: both are asked for every
    #: packet, and the flag arithmetic on enums was a visible share of the profile.
    _unsent: frozenset[type[Command]] = field(init=False, repr=False, compare=False)
    _unanswered: frozenset[type[Command]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        known = STEP_FLAGS.keys() | MIN_VERSION_FOR.keys()
        unsent = {
            command
            for command in known
            if self.version < MIN_VERSION_FOR.get(command, MIN_VERSION)
            or (command in STEP_FLAGS and self.protocol & STEP_FLAGS[command][0])
        }
        unanswered = {command for command, flags in STEP_FLAGS.items() if self.protocol & flags[1]}
        object.__setattr__(self, "_unsent", frozenset(unsent))
        object.__setattr__(self, "_unanswered", frozenset(unanswered))

    def sends(self, command: type[Command]) -> bool:
        """Whether the MTA sends this event at all (not disabled by NO_*, defined in version)."""
        if command in self._unsent:
            return False
        return command in STEP_FLAGS or self.version >= MIN_VERSION_FOR.get(command, MIN_VERSION)

    def no_reply(self, command: type[Command]) -> bool:
        """Whether the filter promised not to answer this event (NR_*)."""
        return command in self._unanswered

    @property
    def skip(self) -> bool:
        return bool(self.protocol & Protocol.SKIP)

    @property
    def leading_space(self) -> bool:
        return bool(self.protocol & Protocol.HDR_LEADSPC)

    @property
    def max_data_size(self) -> int:
        """Largest payload the peer promised to accept (SMFIP_MDS_*; else libmilter's 64 KiB)."""
        if self.protocol & Protocol.MDS_1M:
            return 1048575
        if self.protocol & Protocol.MDS_256K:
            return 262143
        return 65535


def agree(offer: OptNeg, reply: OptNegReply) -> Negotiated:
    """Validate the filter's answer against the MTA's offer, as the strictest MTA would.

    Raises:
        LocalProtocolError: NEGOTIATION, naming the first rule the answer breaks.
    """
    offer = effective_offer(offer)
    if not MIN_VERSION <= reply.version <= min(offer.version, MAX_VERSION):
        raise LocalProtocolError(
            f"filter chose protocol version {reply.version}; offered {offer.version}",
            ErrorKind.NEGOTIATION,
        )
    # int arithmetic: IntFlag's ~ only keeps the bits the enum defines.
    extra_actions = int(reply.actions) & ~int(offer.actions)
    if extra_actions:
        raise LocalProtocolError(
            f"filter requests actions {extra_actions:#x} the MTA did not offer",
            ErrorKind.NEGOTIATION,
        )
    extra_protocol = int(reply.protocol) & ~int(offer.protocol)
    if extra_protocol:
        raise LocalProtocolError(
            f"filter requests protocol bits {extra_protocol:#x} the MTA did not offer",
            ErrorKind.NEGOTIATION,
        )
    macros: dict[MacroStage, tuple[bytes, ...]] = {}
    for stage, names in reply.macros:
        if stage in macros:
            raise LocalProtocolError(
                f"filter sent two macro lists for stage {stage.name}", ErrorKind.NEGOTIATION
            )
        # Sendmail also accepts commas between names (milter_set_macros).
        macros[stage] = tuple(names.replace(b",", b" ").split())
    mask = _VERSION_PROTOCOL_MASK[min(reply.version, MAX_VERSION)]
    return Negotiated(reply.version, reply.actions, reply.protocol & mask, macros)


def answer_offer(
    offer: OptNeg,
    *,
    actions: Action,
    protocol: Protocol,
    macros: dict[MacroStage, bytes] | None = None,
    version: int = MAX_VERSION,
) -> OptNegReply:
    """Build a filter's answer: what we want, narrowed to what the MTA offers.

    Like libmilter, an NR_* or NO_* bit the MTA cannot honour is dropped rather than failing the
    session; the caller reads the Negotiated result to learn which events it must answer.
    """
    check_offer(offer)
    offer = effective_offer(offer)
    chosen_version = min(version, offer.version, MAX_VERSION)
    lists = tuple(sorted((macros or {}).items()))
    chosen_actions = actions & offer.actions
    if lists and chosen_version >= 6 and offer.actions & Action.SETSYMLIST:
        chosen_actions |= Action.SETSYMLIST
    else:
        lists = ()
    return OptNegReply(
        chosen_version,
        chosen_actions,
        protocol & offer.protocol & _VERSION_PROTOCOL_MASK[chosen_version],
        lists,
    )
