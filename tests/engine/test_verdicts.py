"""Merging one stage's replies from several filters into the one reply the MTA gets."""

from __future__ import annotations

import itertools

import pytest

from milterbridge.engine.verdicts import (
    Scope,
    Stage,
    StageReply,
    Verdict,
    ends_part,
    merge_stage,
    verdict_of,
)
from milterbridge.milter import (
    Accept,
    Body,
    Continue,
    Discard,
    Rcpt,
    Reject,
    ReplyCode,
    Shutdown,
    Skip,
    Tempfail,
)

R550 = ReplyCode(b"550 5.7.1 spam")
R554 = ReplyCode(b"554 5.7.0 virus")
R451 = ReplyCode(b"451 4.7.1 greylisted")
R421 = ReplyCode(b"421 4.7.0 go away")
BAD_5XX = ReplyCode(b"550 4.7.1 class mismatch")


def named(*replies: StageReply) -> list[tuple[str, StageReply]]:
    return [(f"f{i}", reply) for i, reply in enumerate(replies, 1)]


#: One reply per verdict, highest precedence first.
BY_PRECEDENCE: list[tuple[StageReply, StageReply]] = [
    (Shutdown(), Shutdown()),
    (Discard(), Discard()),
    (Reject(), Reject()),
    (Tempfail(), Tempfail()),
    (Continue(), Continue()),
    (Accept(), Continue()),  # a lone accept among continues only marks that filter done
]


@pytest.mark.parametrize(("high", "low"), list(itertools.combinations(range(6), 2)))
@pytest.mark.parametrize("high_first", [True, False])
def test_precedence(high: int, low: int, high_first: bool) -> None:
    """shutdown > discard > reject > tempfail > continue > accept, whatever the filter order."""
    winner, sent = BY_PRECEDENCE[high]
    loser, _ = BY_PRECEDENCE[low]
    replies = (winner, loser) if high_first else (loser, winner)
    assert merge_stage(Stage.MAIL, named(*replies)).reply == sent


@pytest.mark.parametrize(
    ("replies", "reply", "verdict", "decided_by"),
    [
        ((), Continue(), Verdict.CONTINUE, None),
        ((Continue(), Continue()), Continue(), Verdict.CONTINUE, None),
        ((Accept(), Accept()), Accept(), Verdict.ACCEPT, None),
        ((Continue(), Reject()), Reject(), Verdict.REJECT, "f2"),
        ((Tempfail(), Reject(), Reject()), Reject(), Verdict.REJECT, "f2"),
        ((Discard(), Shutdown()), Shutdown(), Verdict.SHUTDOWN, "f2"),
        # a custom reply counts by its class, and goes out when its class wins ...
        ((Tempfail(), R550), R550, Verdict.REJECT, "f2"),
        ((Reject(), R550), R550, Verdict.REJECT, "f2"),
        ((R451, Continue()), R451, Verdict.TEMPFAIL, "f1"),
        # ... the first in configured order among several of the winning class ...
        ((R550, R554), R550, Verdict.REJECT, "f1"),
        ((R554, Reject(), R550), R554, Verdict.REJECT, "f1"),
        # ... and never when another class won: then the plain reply
        ((R451, Reject()), Reject(), Verdict.REJECT, "f2"),
        ((R550, Discard()), Discard(), Verdict.DISCARD, "f2"),
        # 421 is tempfail class: it loses to a reject, and wins as a tempfail with its text
        ((R421, Reject()), Reject(), Verdict.REJECT, "f2"),
        ((Tempfail(), R421), R421, Verdict.TEMPFAIL, "f2"),
        # an invalid reply code is never forwarded; it still counts by its first digit
        ((BAD_5XX,), Reject(), Verdict.REJECT, "f1"),
        ((BAD_5XX, R550), R550, Verdict.REJECT, "f2"),
        ((ReplyCode(b"4xx nonsense"),), Tempfail(), Verdict.TEMPFAIL, "f1"),
        ((ReplyCode(b"nonsense"),), Tempfail(), Verdict.TEMPFAIL, "f1"),
    ],
)
def test_merged_reply(
    replies: tuple[StageReply, ...], reply: StageReply, verdict: Verdict, decided_by: str | None
) -> None:
    """The reply sent, its verdict and the filter it is logged against."""
    result = merge_stage(Stage.DATA, named(*replies))
    assert (result.reply, result.verdict, result.decided_by) == (reply, verdict, decided_by)


def test_invalid_reply_codes_are_reported() -> None:
    """Filters whose text was dropped as invalid are named, for a log line."""
    result = merge_stage(Stage.MAIL, named(BAD_5XX, R550, Reject()))
    assert result.invalid_reply_codes == {"f1"}


def test_shutdown_is_sent_as_shutdown() -> None:
    """SHUTDOWN goes to Postfix as SMFIR_SHUTDOWN (421 + disconnect), at any stage."""
    for stage in Stage:
        result = merge_stage(stage, named(Continue(), Shutdown()))
        assert result.reply == Shutdown()
        assert result.done_for_connection == {"f2"}


@pytest.mark.parametrize(
    ("stage", "replies", "others_active", "reply"),
    [
        (Stage.MAIL, (Accept(), Accept()), False, Accept()),
        (Stage.MAIL, (Accept(), Accept()), True, Continue()),
        (Stage.MAIL, (Accept(), Continue()), False, Continue()),
        (Stage.CONNECT, (Accept(),), False, Accept()),
        (Stage.CONNECT, (Accept(),), True, Continue()),
        (Stage.RCPT, (Accept(), Accept()), False, Accept()),
        (Stage.UNKNOWN, (Accept(),), False, Continue()),
        (Stage.EOM, (Accept(), Accept()), True, Accept()),
        (Stage.EOM, (Accept(), Continue()), False, Continue()),
    ],
)
def test_accept_only_when_every_filter_accepted(
    stage: Stage, replies: tuple[StageReply, ...], others_active: bool, reply: StageReply
) -> None:
    """Accept ends the MTA's conversation with the bridge, so it needs every filter's accept."""
    assert merge_stage(stage, named(*replies), others_active=others_active).reply == reply


@pytest.mark.parametrize(
    ("stage", "replies", "message", "connection"),
    [
        (Stage.CONNECT, (Accept(), Continue()), set(), {"f1"}),
        (Stage.HELO, (Tempfail(), R550), set(), {"f1", "f2"}),
        (Stage.CONNECT, (Discard(),), set(), set()),
        (Stage.MAIL, (Accept(), Reject(), Continue()), {"f1", "f2"}, set()),
        (Stage.DATA, (Discard(), R451), {"f1", "f2"}, set()),
        (Stage.HEADER, (Tempfail(), Shutdown()), {"f1"}, {"f2"}),
        (Stage.RCPT, (Accept(), Reject(), Tempfail()), {"f1"}, set()),
        (Stage.RCPT, (Discard(),), {"f1"}, set()),
        (Stage.EOM, (Accept(), Reject()), set(), set()),
        (Stage.UNKNOWN, (Accept(), Reject()), set(), set()),
    ],
)
def test_which_filters_are_done(
    stage: Stage, replies: tuple[StageReply, ...], message: set[str], connection: set[str]
) -> None:
    """A filter's own reply ends its part, by scope, as milter.state tracks it."""
    result = merge_stage(stage, named(*replies))
    assert result.done_for_message == message
    assert result.done_for_connection == connection


@pytest.mark.parametrize(
    ("replies", "reply", "recipient_only"),
    [
        ((Continue(), Reject()), Reject(), True),
        ((R451, Continue()), R451, True),
        ((Discard(), Reject()), Discard(), False),
        ((Continue(),), Continue(), False),
    ],
)
def test_rcpt_refusal_is_for_that_recipient(
    replies: tuple[StageReply, ...], reply: StageReply, recipient_only: bool
) -> None:
    """At RCPT a reject/tempfail refuses one recipient; a discard drops the whole message."""
    result = merge_stage(Stage.RCPT, named(*replies))
    assert (result.reply, result.recipient_only) == (reply, recipient_only)
    assert not merge_stage(Stage.MAIL, named(Reject())).recipient_only


@pytest.mark.parametrize(
    ("replies", "kwargs", "reply", "no_more_body"),
    [
        ((Skip(), Skip()), {}, Skip(), {"f1", "f2"}),
        ((Skip(), Continue()), {}, Continue(), {"f1"}),
        ((Skip(), Accept()), {}, Skip(), {"f1", "f2"}),
        ((Skip(), Accept()), {"others_active": True}, Skip(), {"f1", "f2"}),
        ((Skip(),), {"others_want_body": True}, Continue(), {"f1"}),
        ((Skip(),), {"skip_allowed": False}, Continue(), {"f1"}),
        ((Accept(),), {"others_active": True}, Skip(), {"f1"}),
        ((Accept(),), {"others_active": True, "others_want_body": True}, Continue(), {"f1"}),
        ((Accept(),), {}, Accept(), {"f1"}),
        ((Skip(), Reject()), {}, Reject(), {"f1", "f2"}),
    ],
)
def test_skip_at_body(
    replies: tuple[StageReply, ...],
    kwargs: dict[str, bool],
    reply: StageReply,
    no_more_body: set[str],
) -> None:
    """The MTA is asked to skip only when no filter needs more body; the caller learns which
    filters to send no more chunks."""
    result = merge_stage(Stage.BODY, named(*replies), **kwargs)
    assert result.reply == reply
    assert result.no_more_body == no_more_body


def test_skip_outside_body_is_continue() -> None:
    """SKIP anywhere but BODY counts as continue (the codec refuses it there anyway)."""
    assert verdict_of(Skip(), Stage.HEADER) is Verdict.CONTINUE
    result = merge_stage(Stage.HEADER, named(Skip(), Skip()))
    assert (result.reply, result.no_more_body) == (Continue(), frozenset())


def test_discard_at_connect_does_not_hide_a_reject() -> None:
    """Postfix ignores DISCARD at CONNECT/HELO, so a reject from another filter must win."""
    for stage in (Stage.CONNECT, Stage.HELO):
        assert merge_stage(stage, named(Discard(), Reject())).reply == Reject()
        assert merge_stage(stage, named(Discard())).reply == Continue()


def test_stage_of_command() -> None:
    assert Stage.of(Rcpt) is Stage.RCPT
    assert Stage.of(Body) is Stage.BODY


def test_ends_part_table() -> None:
    assert ends_part(Verdict.REJECT, Stage.CONNECT) is Scope.CONNECTION
    assert ends_part(Verdict.REJECT, Stage.RCPT) is None
    assert ends_part(Verdict.CONTINUE, Stage.MAIL) is None
