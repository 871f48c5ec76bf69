"""Merging one stage's final replies from several filters into the one reply the MTA gets.

Pure: replies in, one reply out. The session decides who was asked; this module decides what the
answers add up to (design §5, protocol notes §5.4, §8.3, §8.4).

Rules:

1. Every reply has a verdict. Precedence, highest first:
   shutdown > discard > reject > tempfail > continue > skip > accept.
   A ReplyCode counts as reject (5xx) or tempfail (4xx, 421 included) by its first digit; an
   invalid one whose first byte is not ``5`` counts as tempfail (nothing is lost by a retry).
   Two replies the MTA would ignore count as continue: DISCARD at CONNECT/HELO (Postfix logs and
   ignores it, and forwarding it would lose another filter's reject) and SKIP anywhere but BODY.
2. The winning verdict is what the MTA gets, as a plain reply, except:
   * reject/tempfail: the first filter in configured order whose *valid* ReplyCode
     (``reply_code_problem(text) is None``) has the winning class gets its text forwarded;
     otherwise the plain Reject()/Tempfail() goes out (libmilter's own rule, §3.2).
   * shutdown goes out as Shutdown(): Postfix answers 421 4.7.0 and disconnects at any stage,
     which is exactly what the filter asked for. (Sendmail refuses SMFIR_SHUTDOWN on the wire; a
     session talking to Sendmail must send ReplyCode(b"421 4.7.0 ...") instead.)
   * accept: ACCEPT ends the MTA's conversation with the bridge -- for the message, or at
     CONNECT/HELO for the connection -- so the bridge answers Accept only when every filter that
     answered accepted and no other filter is still active (``others_active``). Otherwise an
     ACCEPT only marks that filter done and the MTA gets Continue. At UNKNOWN the bridge never
     answers Accept (what it would end is not defined), and at EOM Accept and Continue are the same.
   * skip: the bridge answers Skip only at BODY, only when the MTA allows it (``skip_allowed``),
     and only when every filter that answered said Skip or is done, and no silent filter still
     takes body chunks (``others_want_body``). When that holds and the answer would otherwise be
     a blocked Accept, Skip goes out too: nobody needs more body.
3. Scope. A filter's own reply ends its part: SHUTDOWN (connection); ACCEPT, REJECT or TEMPFAIL at
   CONNECT/HELO (connection); ACCEPT, REJECT, TEMPFAIL or DISCARD at MAIL, DATA, HEADER, EOH, BODY,
   and ACCEPT or DISCARD at RCPT (message). This mirrors milter.state, which the upstream side
   enforces. At RCPT a reject/tempfail refuses only that recipient: ``recipient_only`` says so and
   the filters stay in the message. END-OF-MESSAGE ends the message for everyone, so nothing is
   marked there.

Invariant: the reply is always legal at the stage (Skip only at BODY, never Accept at UNKNOWN), and
a forwarded ReplyCode is always valid and of the winning class.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import assert_never

from ..milter import (
    Accept,
    Body,
    Command,
    Connect,
    Continue,
    Data,
    Discard,
    EndOfHeaders,
    EndOfMessage,
    Header,
    Helo,
    Mail,
    Rcpt,
    Reject,
    ReplyCode,
    Shutdown,
    Skip,
    Tempfail,
    Unknown,
    reply_code_problem,
)


class Stage(enum.Enum):
    """The MTA command a reply answers."""

    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    HEADER = "header"
    EOH = "eoh"
    BODY = "body"
    EOM = "eom"
    UNKNOWN = "unknown"

    @classmethod
    def of(cls, command: type[Command]) -> Stage:
        """The stage of an answered command; KeyError for one that is never answered."""
        return _STAGE_OF[command]


_STAGE_OF: dict[type[Command], Stage] = {
    Connect: Stage.CONNECT,
    Helo: Stage.HELO,
    Mail: Stage.MAIL,
    Rcpt: Stage.RCPT,
    Data: Stage.DATA,
    Header: Stage.HEADER,
    EndOfHeaders: Stage.EOH,
    Body: Stage.BODY,
    EndOfMessage: Stage.EOM,
    Unknown: Stage.UNKNOWN,
}


class Verdict(enum.Enum):
    """What a reply means, for precedence, logs and the ``verdict`` metric label."""

    ACCEPT = "accept"
    SKIP = "skip"
    CONTINUE = "continue"
    TEMPFAIL = "tempfail"
    REJECT = "reject"
    DISCARD = "discard"
    SHUTDOWN = "shutdown"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {verdict: rank for rank, verdict in enumerate(Verdict)}

#: The final replies a filter can give at a stage (what ``merge_stage`` takes).
StageReply = Continue | Accept | Reject | Tempfail | Discard | ReplyCode | Shutdown | Skip
STAGE_REPLIES: tuple[type[StageReply], ...] = (
    Continue,
    Accept,
    Reject,
    Tempfail,
    Discard,
    ReplyCode,
    Shutdown,
    Skip,
)


class Scope(enum.Enum):
    MESSAGE = "message"
    CONNECTION = "connection"


_ENVELOPE_START = frozenset({Stage.CONNECT, Stage.HELO})
_MESSAGE_STAGES = frozenset({Stage.MAIL, Stage.DATA, Stage.HEADER, Stage.EOH, Stage.BODY})
_REFUSALS = frozenset({Verdict.TEMPFAIL, Verdict.REJECT, Verdict.DISCARD, Verdict.SHUTDOWN})


def verdict_of(reply: StageReply, stage: Stage) -> Verdict:
    """What one filter's reply means at ``stage`` (rule 1)."""
    match reply:
        case Continue():
            return Verdict.CONTINUE
        case Accept():
            return Verdict.ACCEPT
        case Reject():
            return Verdict.REJECT
        case Tempfail():
            return Verdict.TEMPFAIL
        case Discard():
            return Verdict.CONTINUE if stage in _ENVELOPE_START else Verdict.DISCARD
        case ReplyCode(text=text):
            return Verdict.REJECT if text[:1] == b"5" else Verdict.TEMPFAIL
        case Shutdown():
            return Verdict.SHUTDOWN
        case Skip():
            return Verdict.SKIP if stage is Stage.BODY else Verdict.CONTINUE
        case _:
            assert_never(reply)


def ends_part(verdict: Verdict, stage: Stage) -> Scope | None:
    """What a filter's own reply ends for that filter (rule 3), or None."""
    if verdict is Verdict.SHUTDOWN:
        return Scope.CONNECTION
    if stage in _ENVELOPE_START:
        ends = {Verdict.ACCEPT, Verdict.REJECT, Verdict.TEMPFAIL}
        return Scope.CONNECTION if verdict in ends else None
    if stage in _MESSAGE_STAGES:
        return Scope.MESSAGE if verdict in (_REFUSALS | {Verdict.ACCEPT}) else None
    if stage is Stage.RCPT:
        return Scope.MESSAGE if verdict in (Verdict.ACCEPT, Verdict.DISCARD) else None
    return None


@dataclass(frozen=True, slots=True)
class StageResult:
    """The merged answer to one MTA command.

    Attributes:
        reply: what to send to the MTA.
        verdict: the verdict ``reply`` carries (CONTINUE when an accept or skip was held back).
        decided_by: the filter whose reply went out for a refusal (the one whose ReplyCode text
            was used, else the first with the winning verdict); None for continue/skip/accept.
        done_for_message: filters whose own reply ended their part in this message.
        done_for_connection: filters whose own reply ended their part in the connection.
        no_more_body: filters to send no further body chunks (answered Skip, or done).
        recipient_only: at RCPT, the reply refuses this recipient only; filters stay active.
        invalid_reply_codes: filters whose ReplyCode text was not forwarded because it is invalid.
    """

    reply: StageReply
    verdict: Verdict
    decided_by: str | None = None
    done_for_message: frozenset[str] = frozenset()
    done_for_connection: frozenset[str] = frozenset()
    no_more_body: frozenset[str] = frozenset()
    recipient_only: bool = False
    invalid_reply_codes: frozenset[str] = frozenset()


def merge_stage(
    stage: Stage,
    replies: Sequence[tuple[str, StageReply]],
    *,
    others_active: bool = False,
    others_want_body: bool = False,
    skip_allowed: bool = True,
) -> StageResult:
    """Merge the final replies of the filters asked at ``stage`` into the MTA's one reply.

    Args:
        stage: the command answered.
        replies: (filter name, final reply), in configured filter order.
        others_active: some filter still in the message (or, at CONNECT/HELO, the connection)
            gave no reply here: it does not take this stage, it is no-reply for it, it answered
            Skip earlier, or it may still join. An Accept to the MTA would end its part too.
        others_want_body: at BODY, some filter that gave no reply still takes body chunks (it
            negotiated no-reply for BODY), so the MTA must not be asked to skip.
        skip_allowed: the MTA offered SMFIP_SKIP and BODY is not no-reply towards the MTA.

    Returns:
        The reply, its verdict, who decided, and which filters are now done with what.
    """
    judged = [(name, reply, verdict_of(reply, stage)) for name, reply in replies]
    top = max((v for _, _, v in judged), key=_RANK.__getitem__, default=Verdict.CONTINUE)
    reply, verdict, decided_by = _answer(stage, judged, top, others_active, others_want_body)
    if verdict is Verdict.SKIP and not skip_allowed:
        reply, verdict = Continue(), Verdict.CONTINUE
    ended = {name: ends_part(v, stage) for name, _, v in judged}
    message = frozenset(n for n, scope in ended.items() if scope is Scope.MESSAGE)
    connection = frozenset(n for n, scope in ended.items() if scope is Scope.CONNECTION)
    skipped = frozenset(n for n, _, v in judged if v is Verdict.SKIP)
    return StageResult(
        reply=reply,
        verdict=verdict,
        decided_by=decided_by,
        done_for_message=message,
        done_for_connection=connection,
        no_more_body=skipped | message | connection,
        recipient_only=stage is Stage.RCPT and verdict in (Verdict.REJECT, Verdict.TEMPFAIL),
        invalid_reply_codes=frozenset(
            name
            for name, reply, _ in judged
            if isinstance(reply, ReplyCode) and reply_code_problem(reply.text) is not None
        ),
    )


_Judged = Sequence[tuple[str, StageReply, Verdict]]


def _answer(
    stage: Stage, judged: _Judged, top: Verdict, others_active: bool, others_want_body: bool
) -> tuple[StageReply, Verdict, str | None]:
    """The reply for the winning verdict ``top`` (rule 2)."""
    may_skip = stage is Stage.BODY and not others_want_body
    match top:
        case Verdict.SHUTDOWN | Verdict.DISCARD | Verdict.REJECT | Verdict.TEMPFAIL:
            reply, decided_by = _refusal(judged, top)
            return reply, top, decided_by
        case Verdict.CONTINUE:
            return Continue(), Verdict.CONTINUE, None
        case Verdict.SKIP:
            return (Skip(), top, None) if may_skip else (Continue(), Verdict.CONTINUE, None)
        case Verdict.ACCEPT:
            if stage is Stage.EOM or (not others_active and stage is not Stage.UNKNOWN):
                return Accept(), top, None
            return (
                (Skip(), Verdict.SKIP, None) if may_skip else (Continue(), Verdict.CONTINUE, None)
            )
        case _:
            assert_never(top)


def _refusal(judged: _Judged, verdict: Verdict) -> tuple[StageReply, str]:
    """The reply for a refusal, and the filter it comes from."""
    candidates = [(name, reply) for name, reply, v in judged if v is verdict]
    if verdict in (Verdict.REJECT, Verdict.TEMPFAIL):
        for name, reply in candidates:
            if isinstance(reply, ReplyCode) and reply_code_problem(reply.text) is None:
                return reply, name
    plain: dict[Verdict, StageReply] = {
        Verdict.SHUTDOWN: Shutdown(),
        Verdict.DISCARD: Discard(),
        Verdict.REJECT: Reject(),
        Verdict.TEMPFAIL: Tempfail(),
    }
    return plain[verdict], candidates[0][0]
