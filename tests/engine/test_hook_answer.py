"""A hook's answer as a milter filter's answer: the reply for each action and status, the edit
packets for each modification, and the header edits proven against Postfix's semantics."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milterbridge.engine.apply import MessageState, apply_postfix
from milterbridge.engine.hook_answer import HookAnswer, answer_from_response, reply_text
from milterbridge.engine.verdicts import Stage, Verdict, verdict_of
from milterbridge.milter import (
    CHUNK_SIZE,
    AddHeader,
    AddRcpt,
    AddRcptPar,
    ChangeFrom,
    ChangeHeader,
    Continue,
    DelRcpt,
    Discard,
    InsertHeader,
    Quarantine,
    Reject,
    ReplaceBody,
    ReplyCode,
    reply_code_problem,
)
from milterbridge.upstream.hook_response import HookResponseError, decode_response

HEADERS = [
    (b"Received", b"from a by b"),
    (b"From", b"alice@example.org"),
    (b"To", b"bob@example.net"),
    (b"Subject", b"hello"),
    (b"X-Mailer", b"mutt"),
]


def answer(
    document: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
) -> HookAnswer:
    response = decode_response(msgspec.json.encode(document))
    return answer_from_response(response, HEADERS if headers is None else headers)


def reply_of(action: str, **details: Any) -> HookAnswer:
    document: dict[str, Any] = {"action": action}
    if details:
        document["response"] = details
    return answer(document)


# --- actions and replies -------------------------------------------------------------------------


def test_accept_is_continue() -> None:
    assert reply_of("accept") == HookAnswer(Continue(), (), ())


def test_discard() -> None:
    assert reply_of("discard") == HookAnswer(Discard(), (), ())


def test_quarantine_continues_with_a_reason() -> None:
    assert reply_of("quarantine") == HookAnswer(
        Continue(), (Quarantine(b"quarantined by hook"),), ()
    )
    held = reply_of("quarantine", message="looks\r\n  like   spam")
    assert held == HookAnswer(Continue(), (Quarantine(b"looks like spam"),), ())


def test_plain_reject() -> None:
    assert reply_of("reject") == HookAnswer(Reject(), (), ())


def test_reject_with_a_5xx_status() -> None:
    result = reply_of("reject", status=550, enhancedStatus="5.7.1", message="Spam detected")
    assert result == HookAnswer(ReplyCode(b"550 5.7.1 Spam detected"), (), ())
    assert verdict_of(result.reply, Stage.EOM) is Verdict.REJECT


def test_reject_with_a_4xx_status_is_a_tempfail() -> None:
    result = reply_of("reject", status=451, enhanced_status="4.7.1", message="Greylisted")
    assert result.reply == ReplyCode(b"451 4.7.1 Greylisted")
    assert verdict_of(result.reply, Stage.RCPT) is Verdict.TEMPFAIL


@pytest.mark.parametrize(
    ("details", "text"),
    [
        ({"status": 554}, b"554 Rejected"),
        ({"status": 450}, b"450 Try again later"),
        ({"status": 550, "enhancedStatus": "5.1.1"}, b"550 5.1.1 Rejected"),
        ({"status": 550, "message": "no\nsuch\r\nuser"}, b"550-no\r\n550-such\r\n550 user"),
        (
            {"status": 550, "enhancedStatus": "5.1.1", "message": "no\rsuch user\n\n"},
            b"550-5.1.1 no\r\n550 5.1.1 such user",
        ),
        ({"status": 550, "message": "spam 100%"}, b"550 spam 100%%"),
        ({"status": 550, "message": "5 strikes"}, b"550 5.0.0 5 strikes"),
        ({"status": 550, "message": "bell\x07 tab\t"}, b"550 bell  tab\t"),
        ({"status": 550, "message": "caf\u00e9"}, "550 caf\u00e9".encode()),
    ],
)
def test_reply_text(details: dict[str, Any], text: bytes) -> None:
    result = reply_of("reject", **details)
    assert result == HookAnswer(ReplyCode(text), (), ())
    assert reply_code_problem(text) is None


@pytest.mark.parametrize(
    ("details", "note"),
    [
        ({"status": 250, "message": "ok"}, "status 250 does not fit reject: plain reject sent"),
        ({"status": 354}, "status 354 does not fit reject"),
        ({"status": 600}, "status 600 does not fit reject"),
        (
            {"status": 550, "enhancedStatus": "4.7.1"},
            "enhanced status 4.7.1 does not fit status 550",
        ),
        ({"status": 451, "enhancedStatus": "5.7.1"}, "does not fit status 451"),
        ({"status": 550, "enhancedStatus": "5.7"}, "enhanced status '5.7' is malformed"),
        ({"status": 550, "enhancedStatus": "x"}, "is malformed"),
        ({"message": "go away"}, "reject with a message but no status"),
    ],
)
def test_a_reply_that_does_not_fit_falls_back_to_a_plain_reject(
    details: dict[str, Any], note: str
) -> None:
    result = reply_of("reject", **details)
    assert result.reply == Reject()
    assert len(result.notes) == 1
    assert note in result.notes[0]


@pytest.mark.parametrize("action", ["accept", "discard", "reject", "quarantine"])
def test_disconnect_is_a_421_with_any_action(action: str) -> None:
    result = reply_of(action, disconnect=True)
    assert result.reply == ReplyCode(b"421 4.7.0 closing connection")
    assert verdict_of(result.reply, Stage.MAIL) is Verdict.TEMPFAIL


def test_disconnect_keeps_the_hooks_words_where_they_fit() -> None:
    result = reply_of("reject", status=550, enhancedStatus="4.3.2", message="bye", disconnect=True)
    assert result.reply == ReplyCode(b"421 4.3.2 bye")
    result = reply_of("reject", status=550, enhancedStatus="5.7.1", message="bye", disconnect=True)
    assert result.reply == ReplyCode(b"421 4.7.0 bye")
    assert len(result.notes) == 1


@pytest.mark.parametrize("action", ["accept", "discard", "quarantine"])
def test_a_status_is_ignored_unless_rejecting(action: str) -> None:
    result = reply_of(action, status=550, enhancedStatus="5.7.1", message="x", disconnect=False)
    assert result.reply == (Discard() if action == "discard" else Continue())
    assert result.notes == ()


@settings(max_examples=300, deadline=None)
@given(
    status=st.integers(400, 599),
    enhanced=st.none() | st.from_regex(r"\A[45]\.[0-9]{1,3}\.[0-9]{1,3}\Z"),
    message=st.none() | st.text(max_size=80),
)
def test_every_reply_sent_is_valid_and_of_its_status_class(
    status: int, enhanced: str | None, message: str | None
) -> None:
    text, problem = reply_text(status, enhanced, message.replace("\0", "") if message else message)
    fits = enhanced is None or enhanced[0] == str(status)[0]
    assert (problem is None) == fits
    if problem is None:
        assert reply_code_problem(text) is None
        assert text.startswith(str(status).encode())


# --- envelope and body ---------------------------------------------------------------------------


def edits_of(*modifications: dict[str, Any]) -> tuple[Any, ...]:
    return answer({"action": "accept", "modifications": list(modifications)}).edits


def test_change_from() -> None:
    assert edits_of({"type": "changeFrom", "value": "bounce@example.org"}) == (
        ChangeFrom(b"<bounce@example.org>"),
    )
    parameters = {"size": 1000, "body": "8BITMIME", "smtputf8": True, "ret": False, "envid": None}
    assert edits_of({"type": "changeFrom", "value": "<>", "parameters": parameters}) == (
        ChangeFrom(b"<>", b"SIZE=1000 BODY=8BITMIME SMTPUTF8"),
    )
    assert edits_of({"type": "changeFrom", "value": ""}) == (ChangeFrom(b"<>"),)


def test_the_last_change_from_counts() -> None:
    assert edits_of(
        {"type": "changeFrom", "value": "a@x"}, {"type": "changeFrom", "value": "b@x"}
    ) == (ChangeFrom(b"<b@x>"),)


@pytest.mark.parametrize("kind", ["addRcpt", "addRecipient"])
def test_add_recipient(kind: str) -> None:
    assert edits_of({"type": kind, "value": "new@example.net"}) == (AddRcpt(b"<new@example.net>"),)
    assert edits_of({"type": kind, "value": "<n@x>", "parameters": {"notify": "NEVER"}}) == (
        AddRcptPar(b"<n@x>", b"NOTIFY=NEVER"),
    )
    assert edits_of({"type": kind, "value": "n@x", "parameters": {}}) == (AddRcpt(b"<n@x>"),)


@pytest.mark.parametrize("kind", ["deleteRcpt", "deleteRecipient"])
def test_delete_recipient(kind: str) -> None:
    assert edits_of({"type": kind, "value": "bob@example.net"}) == (DelRcpt(b"<bob@example.net>"),)


def test_recipient_edits_keep_their_order() -> None:
    assert edits_of(
        {"type": "deleteRcpt", "value": "a@x"},
        {"type": "addRcpt", "value": "b@x"},
        {"type": "deleteRecipient", "value": "b@x"},
    ) == (DelRcpt(b"<a@x>"), AddRcpt(b"<b@x>"), DelRcpt(b"<b@x>"))


def test_replace_contents_in_chunks_before_every_other_edit() -> None:
    body = "\u20ac" * CHUNK_SIZE  # 3 bytes each
    edits = edits_of(
        {"type": "addRcpt", "value": "a@x"},
        {"type": "addHeader", "name": "X-A", "value": "1"},
        {"type": "replaceContents", "value": "first"},
        {"type": "replaceContents", "value": body},
    )
    chunks = [e for e in edits if isinstance(e, ReplaceBody)]
    assert edits[: len(chunks)] == tuple(chunks)
    assert len(chunks) == 3
    assert all(len(c.chunk) <= CHUNK_SIZE for c in chunks)
    assert b"".join(c.chunk for c in chunks) == body.encode()
    assert edits[len(chunks) :] == (AddHeader(b"X-A", b"1"), AddRcpt(b"<a@x>"))


def test_an_empty_body_replacement() -> None:
    assert edits_of({"type": "replaceContents", "value": ""}) == (ReplaceBody(b""),)


def test_quarantine_comes_with_the_other_edits() -> None:
    result = answer(
        {
            "action": "quarantine",
            "response": {"message": "suspicious"},
            "modifications": [{"type": "addHeader", "name": "X-Q", "value": "yes"}],
        }
    )
    assert result.edits == (AddHeader(b"X-Q", b"yes"), Quarantine(b"suspicious"))


# --- headers -------------------------------------------------------------------------------------


def visible_after(
    edits: tuple[Any, ...], headers: list[tuple[bytes, bytes]] = HEADERS
) -> list[tuple[bytes, bytes]]:
    return apply_postfix(MessageState.received(headers), edits).visible_headers()


def test_add_header() -> None:
    edits = edits_of({"type": "addHeader", "name": "X-Spam", "value": "No"})
    assert edits == (AddHeader(b"X-Spam", b"No"),)


def test_insert_header_counts_the_hidden_received() -> None:
    edits = edits_of({"type": "insertHeader", "index": 0, "name": "X-Top", "value": "1"})
    assert edits == (InsertHeader(1, b"X-Top", b"1"),)
    assert visible_after(edits)[0] == (b"X-Top", b"1")


def test_insert_header_at_the_end_appends() -> None:
    edits = edits_of({"type": "insertHeader", "index": len(HEADERS), "name": "X-End", "value": "1"})
    assert visible_after(edits) == [*HEADERS, (b"X-End", b"1")]


def test_change_header_becomes_the_per_name_index() -> None:
    headers = [(b"X-A", b"1"), (b"Subject", b"s"), (b"x-a", b"2"), (b"X-A", b"3")]
    change = {"type": "changeHeader", "index": 3, "name": "X-A", "value": "three"}
    edits = answer({"action": "accept", "modifications": [change]}, headers).edits
    assert edits == (ChangeHeader(3, b"X-A", b"three"),)
    assert visible_after(edits, headers)[3] == (b"X-A", b"three")


def test_change_header_needs_the_name_at_the_index() -> None:
    with pytest.raises(
        HookResponseError,
        match=r"modifications\[0\]: changeHeader index 1 is header 'From', not 'Subject'",
    ):
        edits_of({"type": "changeHeader", "index": 1, "name": "Subject", "value": "x"})


def test_names_match_ignoring_case() -> None:
    edits = edits_of({"type": "changeHeader", "index": 3, "name": "subject", "value": "[ok] hello"})
    assert visible_after(edits)[3] == (b"subject", b"[ok] hello")


def test_delete_header() -> None:
    edits = edits_of({"type": "deleteHeader", "index": 4, "name": "X-Mailer"})
    assert edits == (ChangeHeader(1, b"X-Mailer", b""),)
    assert visible_after(edits) == HEADERS[:4]


def test_a_change_to_an_empty_value_is_not_a_deletion() -> None:
    edits = edits_of({"type": "changeHeader", "index": 3, "name": "Subject", "value": ""})
    after = visible_after(edits)
    assert after == [*HEADERS[:3], (b"Subject", b""), HEADERS[4]]


@pytest.mark.parametrize(
    "modification",
    [
        {"type": "changeHeader", "index": 5, "name": "X", "value": "1"},
        {"type": "deleteHeader", "index": 99, "name": "X"},
        {"type": "insertHeader", "index": 6, "name": "X", "value": "1"},
    ],
)
def test_an_index_out_of_range_is_an_error(modification: dict[str, Any]) -> None:
    with pytest.raises(HookResponseError, match="index"):
        edits_of(modification)


def test_each_modification_sees_the_list_as_changed_before_it() -> None:
    """The reference example's header edits, against a list where they all fit."""
    headers = [(b"From", b"a"), (b"X-Mailer", b"m"), (b"To", b"b"), (b"Subject", b"s")]
    result = answer(
        {
            "action": "accept",
            "modifications": [
                {"type": "addHeader", "name": "X-Spam-Status", "value": "No"},
                {"type": "insertHeader", "index": 1, "name": "X-Filtered-By", "value": "v1.1"},
                {"type": "changeHeader", "index": 4, "name": "Subject", "value": "new"},
                {"type": "deleteHeader", "index": 2, "name": "X-Mailer"},
            ],
        },
        headers,
    )
    assert visible_after(result.edits, headers) == [
        (b"From", b"a"),
        (b"X-Filtered-By", b"v1.1"),
        (b"To", b"b"),
        (b"Subject", b"new"),
        (b"X-Spam-Status", b"No"),
    ]


def test_header_edits_at_an_envelope_stage_see_no_headers() -> None:
    result = answer(
        {
            "action": "accept",
            "modifications": [
                {"type": "addHeader", "name": "X-Rcpt", "value": "checked"},
                {"type": "insertHeader", "index": 0, "name": "X-Top", "value": "1"},
            ],
        },
        [],
    )
    assert visible_after(result.edits, HEADERS) == [
        *HEADERS,
        (b"X-Top", b"1"),
        (b"X-Rcpt", b"checked"),
    ]
    with pytest.raises(HookResponseError):
        answer(
            {
                "action": "accept",
                "modifications": [{"type": "deleteHeader", "index": 0, "name": "X"}],
            },
            [],
        )


NAMES = ["A", "a", "B", "Subject", "Received"]
VALUES = ["1", "2", "x y", ""]


@st.composite
def scenarios(
    draw: st.DrawFn,
) -> tuple[list[tuple[bytes, bytes]], list[dict[str, Any]], list[tuple[bytes, bytes]]]:
    """Original headers, a sequence of valid header modifications, and the list they intend."""
    headers = [
        (draw(st.sampled_from(NAMES)).encode(), draw(st.sampled_from(VALUES)).encode())
        for _ in range(draw(st.integers(0, 5)))
    ]
    intended = list(headers)
    modifications: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, 6))):
        kinds = ["addHeader", "insertHeader"] + (
            ["changeHeader", "deleteHeader"] if intended else []
        )
        kind = draw(st.sampled_from(kinds))
        value = draw(st.sampled_from(VALUES))
        if kind == "addHeader":
            name = draw(st.sampled_from(NAMES))
            modifications.append({"type": kind, "name": name, "value": value})
            intended.append((name.encode(), value.encode()))
        elif kind == "insertHeader":
            name = draw(st.sampled_from(NAMES))
            index = draw(st.integers(0, len(intended)))
            modifications.append({"type": kind, "index": index, "name": name, "value": value})
            intended.insert(index, (name.encode(), value.encode()))
        else:
            index = draw(st.integers(0, len(intended) - 1))
            current = intended[index][0].decode()
            name = draw(st.sampled_from([current, current.lower(), current.upper()]))
            if kind == "changeHeader":
                modifications.append({"type": kind, "index": index, "name": name, "value": value})
                intended[index] = (name.encode(), value.encode())
            else:
                modifications.append({"type": kind, "index": index, "name": name})
                del intended[index]
    return headers, modifications, intended


@settings(max_examples=500, deadline=None)
@given(scenarios())
def test_header_edits_give_the_intended_list_under_postfix_semantics(
    scenario: tuple[list[tuple[bytes, bytes]], list[dict[str, Any]], list[tuple[bytes, bytes]]],
) -> None:
    headers, modifications, intended = scenario
    result = answer({"action": "accept", "modifications": modifications}, headers)
    assert visible_after(result.edits, headers) == intended
