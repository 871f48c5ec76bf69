"""``deferMessageVerdicts``: the MTA streams headers and body unanswered; refusals come at EOM."""

from __future__ import annotations

import trio
import trio.testing
from structlog.testing import capture_logs

from milterbridge.milter import (
    AddHeader,
    Command,
    Continue,
    EndOfMessage,
    Header,
    Message,
    OptNegReply,
    Protocol,
    Reject,
    Reply,
)
from tests.fake_upstream import fake_upstream

from .test_session_faults import _filter
from .test_session_hooks import RecordingHooks, play
from .test_session_merge import scripted


async def _play(port: int) -> tuple[OptNegReply, list[tuple[Command, Reply]]]:
    """One message from our codec as Postfix to a deferring session with one milter."""
    return await play(
        [], RecordingHooks(), milters=[_filter("one", port, True)], defer_message_verdicts=True
    )


def _refuse_subject(message: Message) -> list[Reply]:
    if isinstance(message, Header) and message.name == b"Subject":
        return [Reject()]
    return [Continue()]


async def test_the_mta_is_asked_not_to_wait_for_headers_and_body(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def add_at_eom(message: Message) -> list[Reply]:
        if isinstance(message, EndOfMessage):
            return [AddHeader(b"X-Seen", b"1"), Continue()]
        return [Continue()]

    async with fake_upstream(scripted(add_at_eom)) as upstream:
        negotiated, answers = await _play(upstream.port)
    wanted = Protocol.NR_HDR | Protocol.NR_EOH | Protocol.NR_BODY
    assert negotiated.protocol & wanted == wanted
    answered = [type(command).__name__ for command, _ in answers]
    assert answered == ["Connect", "Helo", "Mail", "Rcpt", "Data", "EndOfMessage", "EndOfMessage"]
    assert [reply for command, reply in answers if isinstance(command, EndOfMessage)] == [
        AddHeader(b"X-Seen", b"1"),
        Continue(),
    ]


async def test_a_refusal_of_a_header_is_the_answer_at_end_of_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[str] = []
    async with fake_upstream(scripted(_refuse_subject, seen=seen)) as upstream:
        with capture_logs() as logs:
            _, answers = await _play(upstream.port)
    assert [(type(c).__name__, r) for c, r in answers][-1] == ("EndOfMessage", Reject())
    assert not any(isinstance(c, Header) for c, _ in answers)  # nothing answered before EOM
    # The filter that refused is sent nothing more of the message.
    assert "Body" not in seen and "EndOfMessage" not in seen
    (end,) = [line for line in logs if line["event"] == "message_end"]
    assert end["verdict"] == "reject"
