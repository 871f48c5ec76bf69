"""engine/apply.py is the reference for how Postfix applies edit packets: check it against Postfix.

A real libmilter filter sits directly in Postfix's smtpd_milters and sends a script of edits at
end-of-message; what smtp-sink receives must equal what apply_postfix() predicts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from milterbridge.engine.apply import MessageState, apply_postfix
from milterbridge.milter import (
    AddHeader,
    AddRcpt,
    ChangeFrom,
    ChangeHeader,
    DelRcpt,
    InsertHeader,
    ReplaceBody,
    Reply,
)
from tests.fixtures.filter_process import running_filter

from .postfix_harness import PostfixInstance, make_message, require_postfix

ORIGINAL = [
    ("From", "a@sender.test"),
    ("To", "b@rcpt.test"),
    ("Subject", "original"),
    ("X-Dup", "1"),
    ("X-Dup", "2"),
    ("X-Dup", "3"),
    ("Message-Id", "<e@sender.test>"),
    ("Date", "Sun, 22 Nov 2026 06:00:00 +0000"),
]
BODY = b"original body\r\n"

# (script ops for the pymilter filter, the same edits as codec packets)
CASES: dict[str, tuple[list[list[Any]], list[Reply]]] = {
    "inserts": (
        [
            ["insheader", 0, "X-Top", "0"],
            ["insheader", 1, "X-One", "1"],
            ["insheader", 99, "X-End", "99"],
            ["addheader", "X-Add", "a"],
        ],
        [
            InsertHeader(0, b"X-Top", b"0"),
            InsertHeader(1, b"X-One", b"1"),
            InsertHeader(99, b"X-End", b"99"),
            AddHeader(b"X-Add", b"a"),
        ],
    ),
    "changes_and_deletes": (
        [
            ["chgheader", "Subject", 1, "changed"],
            ["chgheader", "X-Dup", 2, ""],
            ["chgheader", "X-Dup", 2, "was three"],
            ["chgheader", "X-Absent", 1, "added"],
            ["chgheader", "X-Gone", 1, ""],
            ["chgheader", "X-Dup", 0, "index zero"],
        ],
        [
            ChangeHeader(1, b"Subject", b"changed"),
            ChangeHeader(2, b"X-Dup", b""),
            ChangeHeader(2, b"X-Dup", b"was three"),
            ChangeHeader(1, b"X-Absent", b"added"),
            ChangeHeader(1, b"X-Gone", b""),
            ChangeHeader(0, b"X-Dup", b"index zero"),
        ],
    ),
    "case_of_names": (
        [["chgheader", "subject", 1, "lower"], ["chgheader", "x-dup", 3, ""]],
        [ChangeHeader(1, b"subject", b"lower"), ChangeHeader(3, b"x-dup", b"")],
    ),
    "insert_then_change": (
        [["insheader", 1, "X-Dup", "new first"], ["chgheader", "X-Dup", 1, "changed new"]],
        [InsertHeader(1, b"X-Dup", b"new first"), ChangeHeader(1, b"X-Dup", b"changed new")],
    ),
    "envelope_and_body": (
        [
            ["chgfrom", "<new@sender.test>", None],
            ["addrcpt", "<c@rcpt.test>"],
            ["delrcpt", "<b@rcpt.test>"],
            ["replacebody", "new body\r\n"],
        ],
        [
            ChangeFrom(b"<new@sender.test>"),
            AddRcpt(b"<c@rcpt.test>"),
            DelRcpt(b"<b@rcpt.test>"),
            ReplaceBody(b"new body\r\n"),
        ],
    ),
}


def _bare(address: bytes) -> str:
    return address.decode().strip("<>")


@pytest.mark.parametrize("case", list(CASES))
def test_postfix_applies_edits_as_the_reference_says(tmp_path: Path, case: str) -> None:
    """The sink's headers, envelope and body equal apply_postfix's prediction."""
    require_postfix()
    ops, packets = CASES[case]
    with (
        running_filter({"eom_edits": ops}, tmp_path) as proc,
        PostfixInstance(tmp_path, milters=[proc.spec]) as postfix,
    ):
        result = postfix.send(
            "a@sender.test", ["b@rcpt.test", "d@rcpt.test"], make_message(ORIGINAL, BODY)
        )
        assert result.accepted, result
        (delivered,) = postfix.wait_delivered(1)
    state = MessageState.received(
        [(n.encode(), v.encode()) for n, v in ORIGINAL],
        BODY,
        b"<a@sender.test>",
        [b"<b@rcpt.test>", b"<d@rcpt.test>"],
    )
    expected = apply_postfix(state, packets)
    seen = [(name, value.replace("\r\n", "\n")) for name, value in delivered.headers]
    predicted = [
        ("Received", seen[i][1]) if h.hidden else (h.name.decode(), h.value.decode())
        for i, h in enumerate(expected.headers)
    ]
    assert seen == predicted
    assert delivered.sender == _bare(expected.sender)
    assert sorted(delivered.recipients) == sorted(_bare(r) for r in expected.recipients)
    assert delivered.body == expected.body
