"""The configured milters as one MTA session sees them: when each joins, and what it missed.

A milter joins a session at the first of its ``stages`` the session reaches (design §8); with
the default ``["data"]`` it is contacted only for sessions that reach DATA. When it joins after
CONNECT the bridge opens its connection then and replays what it missed -- connect, helo, mail
and the recipients accepted so far, each with the macros the MTA sent for it -- before the
current command. Once joined, a milter stays connected for the rest of the MTA connection and
gets every later event.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..config import HookFilter, MilterFilter
from ..milter import Command, Connect, Data, Helo, Macro, Mail, Negotiated, Rcpt, Reply
from ..upstream import UpstreamEndpoint, UpstreamMilter

#: The MTA command at which each configured stage is reached.
STAGE_COMMAND: dict[str, type[Command]] = {
    "connect": Connect,
    "ehlo": Helo,
    "auth": Mail,
    "mail": Mail,
    "rcpt": Rcpt,
    "data": Data,
}
_ORDER: dict[type[Command], int] = {Connect: 0, Helo: 1, Mail: 2, Rcpt: 3, Data: 4}

Step = tuple[Macro | None, Command]


def endpoint_of(config: MilterFilter) -> UpstreamEndpoint:
    """What the upstream client needs from a ``[[milter]]`` table."""
    return UpstreamEndpoint(
        name=config.name,
        hostname=config.hostname or "localhost",
        port=config.port,
        unix_path=config.unix_path,
        use_tls=config.use_tls,
        allow_invalid_certs=config.allow_invalid_certs,
        max_response_size=int(config.max_response_size),
        protocol_version=2 if config.protocol_version == "v2" else 6,
        flags_action=config.flags_action,
        flags_protocol=config.flags_protocol,
        timeout_connect=float(config.timeout_connect),
        timeout_command=float(config.timeout_command),
        timeout_data=float(config.timeout_data),
    )


def joins_at(
    config: MilterFilter,
    command: type[Command],
    authenticated: bool,
    variables: Mapping[str, str | list[str]],
) -> bool:
    """Whether a milter that has not joined yet joins at this envelope command.

    It joins at the first of its stages reached at which its ``enable`` holds, with the
    variables known at that point; a stage the session has passed without it (because the MTA
    was not asked for that step) is caught up at the next command. The ``auth`` stage counts only
    for an authenticated client.
    """
    if command not in _ORDER:
        return False
    for stage in config.stages:
        if stage == "auth" and not authenticated:
            continue
        if _ORDER[STAGE_COMMAND[stage]] <= _ORDER[command]:
            return config.enable.evaluate(variables)
    return False


def listed_at(config: MilterFilter, command: type[Command], authenticated: bool) -> bool:
    """Whether this command is one of the milter's listed stages (``auth``: authenticated MAIL)."""
    return any(
        STAGE_COMMAND[stage] is command and (stage != "auth" or authenticated)
        for stage in config.stages
    )


@dataclass
class History:
    """The envelope commands so far, with their macros, for replay to late joiners."""

    connect: Step | None = None
    helo: Step | None = None
    mail: Step | None = None
    recipients: list[Step] = field(default_factory=list)

    def before(self, command: type[Command]) -> list[Step]:
        """What a milter joining at ``command`` must be told first, in session order."""
        steps: list[Step] = []
        position = _ORDER.get(command, len(_ORDER))
        if self.connect is not None and position > _ORDER[Connect]:
            steps.append(self.connect)
        if self.helo is not None and position > _ORDER[Helo]:
            steps.append(self.helo)
        if self.mail is not None and position > _ORDER[Mail]:
            steps.append(self.mail)
            steps.extend(self.recipients)
        return steps

    def new_message(self) -> None:
        self.mail = None
        self.recipients.clear()


@dataclass
class FilterSlot:
    """One configured milter within one MTA connection."""

    config: MilterFilter
    endpoint: UpstreamEndpoint
    client: UpstreamMilter | None = None
    #: When ``client`` was connected (trio's clock), for the circuit breaker.
    connected_at: float | None = None
    #: Left the session after an error with tempFailOnError = false.
    gone: bool = False
    #: The answer it gives at every later stage of the connection (an error with
    #: tempFailOnError = true, or a refused replay of CONNECT/HELO).
    sticky: Reply | None = None
    #: The same, for the current message only (a refused replay of MAIL).
    sticky_message: Reply | None = None
    #: Recipients it refused while being replayed: deleted at end-of-message.
    refused_recipients: list[bytes] = field(default_factory=list)
    #: Its ``enable`` turned false at a later listed stage: out of this message.
    left_message: bool = False

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def observing(self) -> bool:
        """In observe mode: it gets every event, its answers never reach the MTA."""
        return self.config.mode == "observe"

    @property
    def joined(self) -> bool:
        return self.client is not None

    def live(self) -> UpstreamMilter | None:
        """The client, when this milter is still to be asked at the next command."""
        client = self.client
        if client is None or client.closed or client.done_for_connection:
            return None
        return client

    def reset_message(self) -> None:
        self.sticky_message = None
        self.refused_recipients.clear()
        self.left_message = False


def build_slots(filters: Sequence[MilterFilter]) -> list[FilterSlot]:
    return [FilterSlot(config, endpoint_of(config)) for config in filters]


#: The envelope command at which each hook stage is called (``data`` is called at
#: end-of-message, with the whole message, and is not listed here).
HOOK_STAGES_AT: dict[type[Command], tuple[str, ...]] = {
    Connect: ("connect",),
    Helo: ("ehlo",),
    Mail: ("auth", "mail"),
    Rcpt: ("rcpt",),
}


@dataclass
class HookSlot:
    """One configured HTTP hook within one MTA connection.

    A hook has no connection to join: it is called at each listed stage where its ``enable``
    holds (design §8), and every call stands alone. Edits it returns before end-of-message wait
    in ``pending`` (milter edits are only legal there, design §6).
    """

    config: HookFilter
    #: Left the session after an error with tempFailOnError = false.
    gone: bool = False
    #: Tempfail for every later stage of the connection, after an error with tempFailOnError.
    sticky: Reply | None = None
    #: Edits returned so far for the current message, in the order the hook sent them.
    pending: list[Reply] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def observing(self) -> bool:
        """In observe mode: it gets every event, its answers never reach the MTA."""
        return self.config.mode == "observe"

    @property
    def usable(self) -> bool:
        return not self.gone and self.sticky is None

    def stages_at(self, command: type[Command], authenticated: bool) -> list[str]:
        """The listed hook stages reached at this command, in order (``auth`` before ``mail``),
        if the hook is still usable; whether ``enable`` holds is the caller's to ask."""
        if not self.usable:
            return []
        return [
            stage
            for stage in HOOK_STAGES_AT.get(command, ())
            if stage in self.config.stages and (stage != "auth" or authenticated)
        ]

    @property
    def wants_message(self) -> bool:
        """Whether it may be called with the whole message at end-of-message."""
        return self.usable and "data" in self.config.stages

    def reset_message(self) -> None:
        self.pending.clear()


def build_hook_slots(hooks: Sequence[HookFilter]) -> list[HookSlot]:
    return [HookSlot(config) for config in hooks]


OptionsCache = dict[str, Negotiated]
