"""The conversation state machine: which packet may come next, for both roles at once.

Rule 1: everything that decides whether a packet is legal lives here, in tables where it can.
Rule 2: this module does not know which role we play. It tracks one conversation -- the MTA's
commands and the filter's replies -- and raises LocalProtocolError for a packet that breaks it;
the Connection decides whose fault that is.

Theory of operation. The milter protocol is strictly request/response: the MTA sends commands
(each optionally preceded by SMFIC_MACRO) and, unless the command is never answered (ABORT,
MACRO, QUIT, QUIT_NC) or the filter negotiated no-reply for it, waits for replies until one is
final. So the machine has two halves:

* ``awaiting``: the command the MTA waits on (None when it is the MTA's turn). While awaiting,
  only replies are legal; otherwise only commands.
* ``position``: libmilter's state (OPTS 0, CONN 1, HELO 2, MAIL 3, RCPT 4, DATA 5, HDRS 6,
  EOHS 7, BODY 8; after end-of-message or ABORT it is HELO again). A step may follow a position
  only as libmilter's transition table allows (NEXT_STEPS), where a step the filter disabled
  (NO_*) may be jumped over; a disabled step, or one the negotiated version lacks, must not be
  sent at all.

Sending a command libmilter would drop makes the MTA hang until its timeout (protocol notes
§5.2), so the replies that end the filter's interest are tracked too: ACCEPT/REJECT/TEMPFAIL at
CONNECT or HELO, and SHUTDOWN anywhere, end it for the connection (then only ABORT, QUIT and
QUIT_NC may follow); ACCEPT, REJECT, TEMPFAIL or DISCARD at MAIL, DATA, HEADER, EOH or BODY, and
ACCEPT or DISCARD at RCPT, end it for the message (then only ABORT, MAIL, HELO, UNKNOWN, QUIT,
QUIT_NC). SKIP after BODY forbids further BODY. Edits are legal only while awaiting
END-OF-MESSAGE, only with their action flag negotiated, and REPLBODY packets must be consecutive
(Postfix refuses a second run of them).
"""

from __future__ import annotations

import enum

from .constants import Action, MacroStage
from .errors import ErrorKind, LocalProtocolError
from .messages import (
    EDIT_REPLIES,
    Abort,
    Accept,
    Body,
    Command,
    Connect,
    ConnFail,
    Continue,
    Data,
    Discard,
    EndOfHeaders,
    EndOfMessage,
    Header,
    Helo,
    Macro,
    Mail,
    OptNeg,
    OptNegReply,
    Progress,
    Quit,
    QuitNoClose,
    Rcpt,
    Reject,
    ReplaceBody,
    Reply,
    ReplyCode,
    Shutdown,
    Skip,
    Tempfail,
    Unknown,
)
from .negotiation import Negotiated, agree, check_offer
from .replycode import reply_code_problem


class Phase(enum.Enum):
    AWAIT_OPTNEG = "awaiting OPTNEG"
    NEGOTIATING = "negotiating"
    OPEN = "open"
    CLOSED = "closed"


#: Position each step moves the conversation to (libmilter's states CONN ... BODY; 0 = OPTS).
POSITION: dict[type[Command], int] = {
    Connect: 1,
    Helo: 2,
    Mail: 3,
    Rcpt: 4,
    Data: 5,
    Header: 6,
    EndOfHeaders: 7,
    Body: 8,
    EndOfMessage: 2,  # ENDM accepts what HELO accepts
}
_BETWEEN_MESSAGES = 2

#: libmilter's transition table (engine.c, protocol notes §5.2): the steps that may follow each
#: position when no step is disabled. A disabled step may be jumped over: what may follow it may
#: follow its predecessor too.
NEXT_STEPS: dict[int, frozenset[type[Command]]] = {
    0: frozenset({Connect}),
    1: frozenset({Helo, Mail}),
    2: frozenset({Helo, Mail}),
    3: frozenset({Rcpt}),
    4: frozenset({Rcpt, Data, Header, EndOfHeaders, Body, EndOfMessage}),
    5: frozenset({Header, EndOfHeaders}),
    6: frozenset({Header, EndOfHeaders}),
    7: frozenset({Body, EndOfMessage}),
    8: frozenset({Body, EndOfMessage}),
}
#: Positions at which libmilter accepts SMFIC_UNKNOWN (not inside DATA).
UNKNOWN_POSITIONS = frozenset({0, 1, 2, 3, 4})


def reachable_steps(negotiated: Negotiated) -> dict[int, frozenset[type[Command]]]:
    """NEXT_STEPS with the steps this filter disabled jumped over."""
    result: dict[int, frozenset[type[Command]]] = {}
    for position in NEXT_STEPS:
        seen: set[type[Command]] = set()
        pending = list(NEXT_STEPS[position])
        while pending:
            step = pending.pop()
            if step in seen:
                continue
            seen.add(step)
            if not negotiated.sends(step) and step is not EndOfMessage:
                pending.extend(NEXT_STEPS[POSITION[step]])
        result[position] = frozenset(seen)
    return result


#: Commands the MTA never expects an answer to.
UNANSWERED: frozenset[type[Command]] = frozenset({Macro, Abort, Quit, QuitNoClose})

#: Letter of the command a macro packet belongs to -> the macro list stage the filter set for it.
MACRO_STAGE: dict[bytes, MacroStage] = {
    b"C": MacroStage.CONNECT,
    b"H": MacroStage.HELO,
    b"M": MacroStage.ENVFROM,
    b"R": MacroStage.ENVRCPT,
    b"T": MacroStage.DATA,
    b"N": MacroStage.EOH,
    b"L": MacroStage.EOH,  # Postfix uses the EOH list for every header
    b"E": MacroStage.EOM,
    b"B": MacroStage.EOM,  # ... and the EOM list for every body chunk
}

#: Final replies that end the filter's part, by scope, per command answered.
_ENDS_CONNECTION: dict[type[Command], frozenset[type[Reply]]] = {
    Connect: frozenset({Accept, Reject, Tempfail, ReplyCode}),
    Helo: frozenset({Accept, Reject, Tempfail, ReplyCode}),
}
_ENDS_MESSAGE_ANY = frozenset({Accept, Reject, Tempfail, ReplyCode, Discard})
_ENDS_MESSAGE: dict[type[Command], frozenset[type[Reply]]] = {
    Mail: _ENDS_MESSAGE_ANY,
    Rcpt: frozenset({Accept, Discard}),
    Data: _ENDS_MESSAGE_ANY,
    Header: _ENDS_MESSAGE_ANY,
    EndOfHeaders: _ENDS_MESSAGE_ANY,
    Body: _ENDS_MESSAGE_ANY,
    Unknown: frozenset(),
}
_BASIC_FINALS = frozenset({Continue, Accept, Reject, Tempfail, Discard, ReplyCode, Shutdown})
_AFTER_CONNECTION_DONE = frozenset({Abort, Quit, QuitNoClose, Macro})
_AFTER_MESSAGE_DONE = frozenset({Abort, Mail, Helo, Unknown, Quit, QuitNoClose, Macro})


def _unexpected(message: str) -> LocalProtocolError:
    return LocalProtocolError(message, ErrorKind.UNEXPECTED)


class Conversation:
    """One milter conversation's state; ``command()`` and ``reply()`` validate and advance it."""

    def __init__(self) -> None:
        self.phase = Phase.AWAIT_OPTNEG
        self.offer: OptNeg | None = None
        self.negotiated: Negotiated | None = None
        #: The command the MTA waits on for a final reply, None when it is the MTA's turn.
        self.awaiting: type[Command] | None = None
        self.position = 0
        self.connection_done = False
        self.message_done = False
        self.skipping_body = False
        self._body_edits_closed = False
        self._body_edit_run = False
        self._reachable: dict[int, frozenset[type[Command]]] = {}

    def describe(self) -> str:
        """The state in words, for error messages."""
        if self.awaiting is not None:
            return f"awaiting the reply to {self.awaiting.__name__}"
        return f"{self.phase.value}, position {self.position}"

    # --- MTA -> filter ----------------------------------------------------------------

    def command(self, command: Command) -> None:
        kind = type(command)
        if self.phase is Phase.CLOSED:
            raise _unexpected(f"{kind.__name__} after the session ended")
        if self.awaiting is not None:
            raise _unexpected(f"{kind.__name__} while {self.describe()}")
        if self.phase is Phase.AWAIT_OPTNEG:
            if isinstance(command, OptNeg):
                check_offer(command)
                self.offer = command
                self.phase = Phase.NEGOTIATING
                self.awaiting = OptNeg
                return
            if kind is Quit:
                self.phase = Phase.CLOSED
                return
            raise _unexpected(f"{kind.__name__} before OPTNEG")
        if kind is OptNeg:
            raise _unexpected("a second OPTNEG on one connection")
        negotiated = self.negotiated
        assert negotiated is not None
        self._check_scope(kind)
        if not negotiated.sends(kind):
            raise _unexpected(f"{kind.__name__}, which the negotiated options exclude")
        self._advance(kind)
        if kind not in UNANSWERED and not negotiated.no_reply(kind):
            self.awaiting = kind
        else:
            self._after_final(kind, Continue)

    def _check_scope(self, kind: type[Command]) -> None:
        if self.connection_done and kind not in _AFTER_CONNECTION_DONE:
            raise _unexpected(f"{kind.__name__} after the filter ended its part in the connection")
        if self.message_done and kind not in _AFTER_MESSAGE_DONE:
            raise _unexpected(f"{kind.__name__} after the filter ended its part in the message")
        if kind is Body and self.skipping_body:
            raise _unexpected("Body after the filter asked to skip the rest of the body")

    def _advance(self, kind: type[Command]) -> None:
        if kind is Macro:
            return
        if kind is Unknown:
            if self.position not in UNKNOWN_POSITIONS:
                raise _unexpected(f"Unknown inside the message data ({self.describe()})")
            return
        if kind is Abort:
            self.position = min(self.position, _BETWEEN_MESSAGES)
            self._reset_message()
            return
        if kind is Quit:
            self.phase = Phase.CLOSED
            return
        if kind is QuitNoClose:
            self.position = 0
            self.connection_done = False
            self._reset_message()
            return
        self._advance_step(kind)

    def _advance_step(self, kind: type[Command]) -> None:
        if kind not in self._reachable[self.position]:
            raise _unexpected(f"{kind.__name__} out of order ({self.describe()})")
        if kind is Mail:
            self._reset_message()
        self.position = POSITION[kind]

    def _reset_message(self) -> None:
        self.message_done = False
        self.skipping_body = False
        self._body_edits_closed = False
        self._body_edit_run = False

    # --- filter -> MTA ----------------------------------------------------------------

    def reply(self, reply: Reply) -> None:
        kind = type(reply)
        awaiting = self.awaiting
        if awaiting is None:
            raise _unexpected(f"{kind.__name__} when no reply is expected ({self.describe()})")
        if awaiting is OptNeg:
            self._negotiate(reply)
            return
        if kind is Progress:
            return
        if kind in EDIT_REPLIES:
            self._edit(reply)
            return
        if kind is ReplyCode:
            assert isinstance(reply, ReplyCode)
            problem = reply_code_problem(reply.text)
            if problem is not None:
                raise LocalProtocolError(f"REPLYCODE {problem}", ErrorKind.MALFORMED)
        elif kind is Skip:
            assert self.negotiated is not None
            if awaiting is not Body or not self.negotiated.skip:
                raise _unexpected("Skip is legal only in reply to Body with SMFIP_SKIP")
        elif kind is ConnFail:
            raise _unexpected("CONN_FAIL is accepted by no MTA")
        elif kind not in _BASIC_FINALS:
            raise _unexpected(f"{kind.__name__} in reply to {awaiting.__name__}")
        self.awaiting = None
        self._after_final(awaiting, kind)

    def _negotiate(self, reply: Reply) -> None:
        if not isinstance(reply, OptNegReply):
            raise _unexpected(f"{type(reply).__name__} in reply to OptNeg")
        assert self.offer is not None
        self.negotiated = agree(self.offer, reply)
        self._reachable = reachable_steps(self.negotiated)
        self.awaiting = None
        self.phase = Phase.OPEN

    def _edit(self, reply: Reply) -> None:
        kind = type(reply)
        if self.awaiting is not EndOfMessage:
            raise _unexpected(f"{kind.__name__} outside end-of-message")
        assert self.negotiated is not None
        needed = EDIT_REPLIES[kind]
        if not self.negotiated.actions & needed:
            raise _unexpected(f"{kind.__name__} without the negotiated action {needed!r}")
        if kind is ReplaceBody:
            if self._body_edits_closed:
                raise _unexpected("ReplaceBody after other edits ended the body replacement")
            self._body_edit_run = True
        elif self._body_edit_run:
            self._body_edits_closed = True

    def _after_final(self, command: type[Command], reply: type[Reply]) -> None:
        if reply is Shutdown or reply in _ENDS_CONNECTION.get(command, ()):
            self.connection_done = True
        elif command is EndOfMessage:
            self._reset_message()
        elif reply in _ENDS_MESSAGE.get(command, ()) and self.position > _BETWEEN_MESSAGES:
            self.message_done = True
        elif reply is Skip:
            self.skipping_body = True

    # --- helpers for callers ----------------------------------------------------------

    @property
    def can_edit(self) -> Action:
        """Actions usable right now (nothing outside end-of-message)."""
        if self.awaiting is not EndOfMessage or self.negotiated is None:
            return Action.NONE
        return self.negotiated.actions
