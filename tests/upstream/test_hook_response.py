"""Decoding a hook's answer: the reference's shape, both spellings seen in the wild, unknown
keys ignored, everything malformed refused with a short message."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from milterbridge.engine.hook_answer import HookResponseError as EngineError
from milterbridge.upstream.hook_response import (
    AddHeader,
    AddRcpt,
    AddRecipient,
    ChangeFrom,
    ChangeHeader,
    DeleteHeader,
    DeleteRcpt,
    DeleteRecipient,
    HookResponse,
    HookResponseError,
    InsertHeader,
    ReplaceContents,
    ReplyDetails,
    decode_response,
)

REFERENCE_EXAMPLE = {
    "action": "accept",
    "response": {
        "status": 250,
        "enhancedStatus": "2.0.0",
        "message": "Message accepted",
        "disconnect": False,
    },
    "modifications": [
        {"type": "changeFrom", "value": "john@example.com", "parameters": {"size": 54321}},
        {"type": "addRecipient", "value": "jane@foobar.com", "parameters": None},
        {"type": "deleteRecipient", "value": "bill@foobar.com"},
        {"type": "replaceContents", "value": "This is the new body\r\n"},
        {"type": "addHeader", "name": "X-Spam-Status", "value": "No"},
        {
            "type": "insertHeader",
            "index": 1,
            "name": "X-Filtered-By",
            "value": "Custom Filter v1.1",
        },
        {"type": "changeHeader", "index": 4, "name": "Subject", "value": "This is the new subject"},
        {"type": "deleteHeader", "index": 1, "name": "X-Mailer"},
    ],
}


def _decode(document: Any) -> HookResponse:
    return decode_response(msgspec.json.encode(document))


def test_the_reference_example() -> None:
    response = _decode(REFERENCE_EXAMPLE)
    assert response.action == "accept"
    assert response.response == ReplyDetails(
        status=250, enhanced_status_camel="2.0.0", message="Message accepted", disconnect=False
    )
    assert response.edits == [
        ChangeFrom(value="john@example.com", parameters={"size": 54321}),
        AddRecipient(value="jane@foobar.com", parameters=None),
        DeleteRecipient(value="bill@foobar.com"),
        ReplaceContents(value="This is the new body\r\n"),
        AddHeader(name="X-Spam-Status", value="No"),
        InsertHeader(index=1, name="X-Filtered-By", value="Custom Filter v1.1"),
        ChangeHeader(index=4, name="Subject", value="This is the new subject"),
        DeleteHeader(index=1, name="X-Mailer"),
    ]


@pytest.mark.parametrize("action", ["accept", "discard", "reject", "quarantine"])
def test_actions(action: str) -> None:
    response = _decode({"action": action})
    assert response.action == action
    assert response.response is None
    assert response.edits == []


def test_both_spellings_of_the_recipient_modifications() -> None:
    response = _decode(
        {
            "action": "accept",
            "modifications": [
                {"type": "addRcpt", "value": "a@x"},
                {"type": "addRecipient", "value": "b@x", "parameters": {"notify": "NEVER"}},
                {"type": "deleteRcpt", "value": "c@x"},
                {"type": "deleteRecipient", "value": "d@x"},
            ],
        }
    )
    kinds = [type(m) for m in response.edits]
    assert kinds == [AddRcpt, AddRecipient, DeleteRcpt, DeleteRecipient]
    assert isinstance(response.edits[1], AddRcpt)  # one meaning, two names
    assert isinstance(response.edits[3], DeleteRcpt)


@pytest.mark.parametrize("key", ["enhancedStatus", "enhanced_status"])
def test_both_spellings_of_the_enhanced_status(key: str) -> None:
    response = _decode({"action": "reject", "response": {"status": 550, key: "5.7.1"}})
    assert response.response is not None
    assert response.response.enhanced_status == "5.7.1"


def test_unknown_keys_are_ignored_and_nulls_are_absent_values() -> None:
    response = _decode(
        {
            "action": "reject",
            "future": {"x": 1},
            "response": {"status": 550, "message": None, "disconnect": None, "color": "red"},
            "modifications": [{"type": "addHeader", "name": "X-A", "value": "1", "extra": 2}],
        }
    )
    assert response.response == ReplyDetails(status=550)
    assert response.edits == [AddHeader(name="X-A", value="1")]
    assert _decode({"action": "accept", "response": None, "modifications": None}).edits == []


def test_the_tag_need_not_come_first() -> None:
    response = _decode({"action": "accept", "modifications": [{"value": "a@x", "type": "addRcpt"}]})
    assert response.edits == [AddRcpt(value="a@x")]


def test_parameter_values_may_be_text_numbers_or_flags() -> None:
    parameters: dict[str, str | int | bool | None] = {
        "size": 1,
        "body": "8BITMIME",
        "smtputf8": True,
        "ret": False,
        "envid": None,
    }
    response = _decode(
        {
            "action": "accept",
            "modifications": [{"type": "changeFrom", "value": "", "parameters": parameters}],
        }
    )
    assert response.edits == [ChangeFrom(value="", parameters=parameters)]


BAD: list[tuple[Any, str]] = [
    ({}, "missing required field `action`"),
    ({"action": "tempfail"}, "`$.action`"),
    ({"action": "ACCEPT"}, "`$.action`"),
    ([], "Expected `object`"),
    ({"action": "accept", "response": {"status": "550"}}, "`$.response.status`"),
    ({"action": "accept", "response": {"disconnect": "yes"}}, "`$.response.disconnect`"),
    ({"action": "reject", "response": {"message": "a\x00b"}}, "NUL"),
    ({"action": "accept", "modifications": {}}, "`$.modifications`"),
    ({"action": "accept", "modifications": [{"type": "addBcc", "value": "x"}]}, "type"),
    ({"action": "accept", "modifications": [{"value": "x"}]}, "missing required field `type`"),
    ({"action": "accept", "modifications": [{"type": "addRcpt"}]}, "`value`"),
    ({"action": "accept", "modifications": [{"type": "addRcpt", "value": 5}]}, "value"),
    ({"action": "accept", "modifications": [{"type": "addRcpt", "value": "a\r\n@x"}]}, "control"),
    (
        {
            "action": "accept",
            "modifications": [{"type": "addRcpt", "value": "a@x", "parameters": {"no te": "x"}}],
        },
        "ESMTP keyword",
    ),
    (
        {
            "action": "accept",
            "modifications": [{"type": "addRcpt", "value": "a@x", "parameters": {"x": "a b"}}],
        },
        "space",
    ),
    (
        {
            "action": "accept",
            "modifications": [{"type": "addRcpt", "value": "a@x", "parameters": {"x": [1]}}],
        },
        "parameters",
    ),
    ({"action": "accept", "modifications": [{"type": "replaceContents", "value": None}]}, "value"),
    (
        {"action": "accept", "modifications": [{"type": "addHeader", "name": "X:A", "value": "1"}]},
        "field name",
    ),
    (
        {"action": "accept", "modifications": [{"type": "addHeader", "name": "X A", "value": "1"}]},
        "field name",
    ),
    (
        {
            "action": "accept",
            "modifications": [{"type": "addHeader", "name": "X\r\n", "value": "1"}],
        },
        "field name",
    ),
    (
        {"action": "accept", "modifications": [{"type": "addHeader", "name": "", "value": "1"}]},
        "field name",
    ),
    (
        {
            "action": "accept",
            "modifications": [{"type": "addHeader", "name": "X-A", "value": "1\r\n2"}],
        },
        "CR",
    ),
    (
        {
            "action": "accept",
            "modifications": [{"type": "addHeader", "name": "X-A", "value": "1\n\t2"}],
        },
        "LF",
    ),
    (
        {
            "action": "accept",
            "modifications": [{"type": "addHeader", "name": "X-A", "value": "\x00"}],
        },
        "NUL",
    ),
    (
        {
            "action": "accept",
            "modifications": [{"type": "insertHeader", "index": -1, "name": "X", "value": "1"}],
        },
        ">= 0",
    ),
    (
        {
            "action": "accept",
            "modifications": [{"type": "changeHeader", "index": "1", "name": "X", "value": "1"}],
        },
        "index",
    ),
    (
        {
            "action": "accept",
            "modifications": [{"type": "deleteHeader", "index": 1.5, "name": "X"}],
        },
        "index",
    ),
    ({"action": "accept", "modifications": [{"type": "deleteHeader", "index": 0}]}, "`name`"),
]


@pytest.mark.parametrize(("document", "fragment"), BAD)
def test_malformed_answers_are_refused(document: Any, fragment: str) -> None:
    with pytest.raises(HookResponseError) as caught:
        _decode(document)
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    "data", [b"", b"not json", b'{"action": "accept"', b"\xff\xfe", b'{"action":"accept"} x']
)
def test_what_is_not_json_is_refused(data: bytes) -> None:
    with pytest.raises(HookResponseError, match="not JSON"):
        decode_response(data)


@pytest.mark.parametrize(
    "document",
    [
        {"action": "x" * 5000},
        {"action": "accept", "modifications": [{"type": "y" * 5000}]},
        {
            "action": "accept",
            "modifications": [{"type": "addHeader", "name": "X:" + "z" * 5000, "value": ""}],
        },
        {
            "action": "accept",
            "modifications": [{"type": "addHeader", "name": "X", "value": "\r" + "w" * 5000}],
        },
    ],
)
def test_errors_never_quote_much(document: Any) -> None:
    with pytest.raises(HookResponseError) as caught:
        _decode(document)
    text = str(caught.value)
    assert len(text) < 300
    assert "\n" not in text


def test_one_error_class() -> None:
    assert HookResponseError is EngineError
    assert issubclass(HookResponseError, ValueError)


def test_a_string_that_is_not_utf8_is_an_invalid_response() -> None:
    """Found by fuzzing: msgspec raises UnicodeDecodeError there, not DecodeError."""
    with pytest.raises(HookResponseError, match="not UTF-8"):
        decode_response(b'{"action":"quar\xee\xee"}')
