"""The end-of-message merge: body, headers, sender, recipients and quarantine in one script."""

from __future__ import annotations

import pytest

from milterbridge.engine.apply import MessageState, apply_postfix
from milterbridge.engine.edits import (
    QUARANTINE_REASON_MAX,
    EditMerge,
    body_chunks,
    edits_of,
    merge_edits,
)
from milterbridge.engine.headers import Conflict, ConflictKind
from milterbridge.milter import (
    CHUNK_SIZE,
    Accept,
    AddHeader,
    AddRcpt,
    AddRcptPar,
    ChangeFrom,
    ChangeHeader,
    Continue,
    DelRcpt,
    InsertHeader,
    Progress,
    Quarantine,
    ReplaceBody,
    Reply,
)

ORIGINAL = MessageState.received(
    [(b"From", b"a@x"), (b"Subject", b"hello")],
    body=b"original body\r\n",
    sender=b"<a@x>",
    recipients=[b"<r1@y>", b"<r2@y>"],
)


def merge(*requests: list[Reply]) -> EditMerge:
    result = merge_edits(ORIGINAL, [(f"f{i}", r) for i, r in enumerate(requests, 1)])
    assert all(len(e.chunk) <= CHUNK_SIZE for e in result.script if isinstance(e, ReplaceBody))
    return result


def test_no_edits() -> None:
    assert merge([], [Progress()], []) == EditMerge(())


# --- forward verbatim ---------------------------------------------------------------------


def test_single_editor_is_forwarded_verbatim() -> None:
    """One editing filter: its packets as it sent them, in its order, without Progress."""
    packets: list[Reply] = [
        Progress(),
        AddRcpt(b"<r1@y>"),  # a duplicate, as the filter meant it
        DelRcpt(b"<nobody@y>"),
        ChangeHeader(1, b"Subject", b"x"),
        ReplaceBody(b"a"),
        ReplaceBody(b"b"),
        Progress(),
        Quarantine(b"q" * 300),
        ChangeFrom(b"<b@x>", b"RET=HDRS"),
        ChangeFrom(b"<c@x>"),
    ]
    result = merge([Progress()], packets, [])
    assert result.script == tuple(p for p in packets if not isinstance(p, Progress))
    assert result.verbatim
    assert result.editors == ("f2",)
    assert apply_postfix(ORIGINAL, result.script) == apply_postfix(ORIGINAL, packets)


def test_verbatim_cuts_oversized_body_chunks() -> None:
    """A ReplaceBody over CHUNK_SIZE (say from a hook) is cut; the body is the same."""
    body = bytes(range(256)) * 600  # 153,600 bytes
    result = merge([AddHeader(b"X", b""), ReplaceBody(body), ChangeFrom(b"<b@x>")])
    assert [type(e) for e in result.script] == [AddHeader, *[ReplaceBody] * 3, ChangeFrom]
    assert apply_postfix(ORIGINAL, result.script).body == body


def test_final_replies_are_not_edits() -> None:
    assert edits_of([Progress(), AddRcpt(b"<x>"), Continue(), Accept()]) == [AddRcpt(b"<x>")]


# --- body -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requests", "body", "conflicts"),
    [
        ([[ReplaceBody(b"one")], [ReplaceBody(b"tw"), ReplaceBody(b"o")]], b"two", ("f1", "f2")),
        ([[ReplaceBody(b"same")], [ReplaceBody(b"sa"), ReplaceBody(b"me")]], b"same", None),
        ([[ReplaceBody(b"x")], [AddHeader(b"N", b"")]], b"x", None),
        ([[ReplaceBody(b"")], [AddHeader(b"N", b"")]], b"", None),
        ([[ReplaceBody(b"a")], [ReplaceBody(b"b")], [ReplaceBody(b"c")]], b"c", ("f1", "f2", "f3")),
    ],
)
def test_body_last_wins(
    requests: list[list[Reply]], body: bytes, conflicts: tuple[str, ...] | None
) -> None:
    """The last replacement in filter order wins; different bodies are a conflict."""
    result = merge(*requests)
    assert apply_postfix(ORIGINAL, result.script).body == body
    expected = () if conflicts is None else (Conflict(ConflictKind.BODY, conflicts),)
    assert result.conflicts == expected


def test_body_goes_first_in_chunks() -> None:
    """The body is sent first, as consecutive chunks of at most CHUNK_SIZE bytes."""
    body = b"x" * (CHUNK_SIZE * 2 + 1)
    result = merge([AddHeader(b"N", b""), ReplaceBody(body)], [AddRcpt(b"<n@y>")])
    assert result.script[:3] == (
        ReplaceBody(b"x" * CHUNK_SIZE),
        ReplaceBody(b"x" * CHUNK_SIZE),
        ReplaceBody(b"x"),
    )
    assert not any(isinstance(e, ReplaceBody) for e in result.script[3:])
    assert body_chunks(b"") == (ReplaceBody(b""),)


# --- sender ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requests", "sent", "conflicts"),
    [
        (
            [[ChangeFrom(b"<b@x>")], [ChangeFrom(b"<c@x>", b"RET=FULL")]],
            ChangeFrom(b"<c@x>", b"RET=FULL"),
            ("f1", "f2"),
        ),
        ([[ChangeFrom(b"<b@x>")], [ChangeFrom(b"<b@x>")]], ChangeFrom(b"<b@x>"), None),
        ([[ChangeFrom(b"<b@x>")], [ChangeFrom(b"<b@x>", b"RET=HDRS")]], None, ("f1", "f2")),
        # within one filter the last one counts, and is no conflict
        ([[ChangeFrom(b"<z@x>"), ChangeFrom(b"<b@x>")], [ChangeFrom(b"<b@x>")]], None, None),
        ([[ChangeFrom(b"<b@x>")], [AddRcpt(b"<n@y>")]], ChangeFrom(b"<b@x>"), None),
    ],
)
def test_sender_last_wins(
    requests: list[list[Reply]], sent: ChangeFrom | None, conflicts: tuple[str, ...] | None
) -> None:
    result = merge(*requests)
    sender = [e for e in result.script if isinstance(e, ChangeFrom)]
    assert len(sender) == 1
    if sent is not None:
        assert sender == [sent]
    expected = () if conflicts is None else (Conflict(ConflictKind.SENDER, conflicts),)
    assert result.conflicts == expected


# --- recipients -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requests", "script", "recipients"),
    [
        # adding a recipient that is already there is a no-op
        ([[AddRcpt(b"<r1@y>")], [AddRcpt(b"<n@y>")]], [AddRcpt(b"<n@y>")], [1, 2, "n"]),
        # add then delete cancels, across filters too
        (
            [[AddRcpt(b"<n@y>")], [DelRcpt(b"<n@y>"), AddRcpt(b"<m@y>")]],
            [AddRcpt(b"<m@y>")],
            [1, 2, "m"],
        ),
        # delete then add cancels the deletion: the recipient stays as received
        ([[DelRcpt(b"<r1@y>")], [AddRcptPar(b"<r1@y>", b"NOTIFY=NEVER")]], [], [1, 2]),
        (
            [[DelRcpt(b"<r1@y>"), AddRcpt(b"<r1@y>")], [AddRcpt(b"<n@y>")]],
            [AddRcpt(b"<n@y>")],
            [1, 2, "n"],
        ),
        # deletions of recipients that are not there do nothing
        ([[DelRcpt(b"<no@y>")], [DelRcpt(b"<r2@y>")]], [DelRcpt(b"<r2@y>")], [1]),
        # ADDRCPT_PAR keeps its args; the first add of an address wins
        (
            [[AddRcptPar(b"<n@y>", b"NOTIFY=NEVER")], [AddRcpt(b"<n@y>")]],
            [AddRcptPar(b"<n@y>", b"NOTIFY=NEVER")],
            [1, 2, "n"],
        ),
        # deletions first, in the order received; then additions, in the order added
        (
            [[AddRcpt(b"<n@y>"), DelRcpt(b"<r2@y>")], [DelRcpt(b"<r1@y>"), AddRcpt(b"<m@y>")]],
            [DelRcpt(b"<r1@y>"), DelRcpt(b"<r2@y>"), AddRcpt(b"<n@y>"), AddRcpt(b"<m@y>")],
            ["n", "m"],
        ),
    ],
)
def test_recipients_are_a_set(
    requests: list[list[Reply]], script: list[Reply], recipients: list[int | str]
) -> None:
    result = merge(*requests)
    assert list(result.script) == script
    expected = [
        ORIGINAL.recipients[r - 1] if isinstance(r, int) else f"<{r}@y>".encode()
        for r in recipients
    ]
    assert list(apply_postfix(ORIGINAL, result.script).recipients) == expected
    assert result.conflicts == ()


# --- quarantine -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requests", "reason"),
    [
        ([[Quarantine(b"spam")], [Quarantine(b"virus")]], b"spam; virus"),
        ([[Quarantine(b"a"), Quarantine(b"b")], [AddRcpt(b"<n@y>")]], b"a; b"),
        ([[Quarantine(b"")], [Quarantine(b"virus")]], b"virus"),
        ([[Quarantine(b"")], [Quarantine(b"")]], b""),
        ([[Quarantine(b"x" * 80)], [Quarantine(b"y" * 80)]], b"x" * 80 + b"; " + b"y" * 18),
    ],
)
def test_quarantine_reasons_joined(requests: list[list[Reply]], reason: bytes) -> None:
    """One Quarantine packet with every reason, cut to the 100 bytes Postfix keeps."""
    result = merge(*requests)
    quarantines = [e for e in result.script if isinstance(e, Quarantine)]
    assert quarantines == [Quarantine(reason)]
    assert len(reason) <= QUARANTINE_REASON_MAX


# --- everything at once ---------------------------------------------------------------------


def test_script_order_and_result() -> None:
    """Body, headers, sender, recipients, quarantine; conflicts from every part."""
    result = merge(
        [ReplaceBody(b"one"), ChangeHeader(1, b"Subject", b"A"), Quarantine(b"spam"), Progress()],
        [AddRcpt(b"<n@y>"), ChangeFrom(b"<b@x>"), ReplaceBody(b"two")],
        [InsertHeader(1, b"X-Top", b"1"), ChangeHeader(1, b"Subject", b"B"), DelRcpt(b"<r1@y>")],
    )
    assert result.script == (
        ReplaceBody(b"two"),
        ChangeHeader(1, b"Subject", b"B"),
        InsertHeader(1, b"X-Top", b"1"),
        ChangeFrom(b"<b@x>"),
        DelRcpt(b"<r1@y>"),
        AddRcpt(b"<n@y>"),
        Quarantine(b"spam"),
    )
    assert result.conflicts == (
        Conflict(ConflictKind.BODY, ("f1", "f2")),
        Conflict(ConflictKind.HEADER, ("f1", "f3"), b"Subject"),
    )
    assert result.editors == ("f1", "f2", "f3")
    assert not result.verbatim
    after = apply_postfix(ORIGINAL, result.script)
    assert after.visible_headers() == [(b"X-Top", b"1"), (b"From", b"a@x"), (b"Subject", b"B")]
    assert (after.body, after.sender, after.recipients) == (b"two", b"<b@x>", (b"<r2@y>", b"<n@y>"))
    assert after.quarantine == (b"spam",)
