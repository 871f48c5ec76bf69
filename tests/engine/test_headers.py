"""The header model: per-filter replay, identity operations, merge with conflicts, the script."""

from __future__ import annotations

import pytest

from milterbridge.engine.apply import HeaderField, MessageState, apply_postfix
from milterbridge.engine.headers import (
    Added,
    Changed,
    Conflict,
    ConflictKind,
    Deleted,
    HeaderId,
    HeaderMerge,
    ModelHeader,
    header_ops,
    header_script,
    merge_headers,
    replay,
)
from milterbridge.milter import AddHeader, ChangeHeader, InsertHeader, Reply

ORIGINAL = MessageState.received(
    [(b"From", b"a@x"), (b"A", b"1"), (b"B", b"2"), (b"A", b"3"), (b"Subject", b"s")]
)
# positions: 0 hidden Received, 1 From, 2 A#1, 3 B, 4 A#2, 5 Subject
RECEIVED = ORIGINAL.headers[0]
H = b"(hidden)"


def chg(index: int, name: bytes, value: bytes) -> Reply:
    return ChangeHeader(index, name, value)


def ins(index: int, name: bytes, value: bytes = b"") -> Reply:
    return InsertHeader(index, name, value)


def add(name: bytes, value: bytes = b"") -> Reply:
    return AddHeader(name, value)


def new(after: int | None, name: bytes, value: bytes) -> Added:
    """Filter "f"'s first new header, after original header ``after``."""
    return Added(after, ModelHeader(HeaderId("f", 0), HeaderField(name, value)))


def orig(position: int, name: bytes, value: bytes) -> ModelHeader:
    return ModelHeader(HeaderId(None, position), HeaderField(name, value))


def visible(fields: tuple[HeaderField, ...]) -> list[tuple[bytes, bytes]]:
    return [(f.name, f.value) if not f.hidden else (H, b"") for f in fields]


def merge(*requests: list[Reply]) -> HeaderMerge:
    result = merge_headers(ORIGINAL.headers, [(f"f{i}", r) for i, r in enumerate(requests, 1)])
    assert apply_postfix(ORIGINAL, result.script).headers == result.headers
    return result


# --- one filter's view: Postfix's semantics, exactly as engine/apply.py --------------------


@pytest.mark.parametrize(
    ("packets", "expected"),
    [
        ([chg(0, b"A", b"x")], [Changed(2, HeaderField(b"A", b"x"))]),
        ([chg(2, b"a", b"x")], [Changed(4, HeaderField(b"a", b"x"))]),
        ([chg(1, b"A", b"")], [Deleted(2)]),
        # a deletion renumbers at once: the second change hits what was A#2
        (
            [chg(1, b"A", b""), chg(1, b"A", b"y")],
            [
                Deleted(2),
                Changed(4, HeaderField(b"A", b"y")),
            ],
        ),
        # not found: with a value it appends, with an empty value nothing happens
        ([chg(3, b"A", b"z")], [new(5, b"A", b"z")]),
        ([chg(3, b"A", b"")], []),
        # the hidden Received never counts for a change ...
        ([chg(1, b"Received", b"r")], [new(5, b"Received", b"r")]),
        # ... but counts for an insert: 0 is above it, 1 below it
        ([ins(0, b"T", b"t")], [new(None, b"T", b"t")]),
        ([ins(1, b"T", b"t")], [new(0, b"T", b"t")]),
        ([ins(99, b"T", b"t")], [new(5, b"T", b"t")]),
        # the anchor is the nearest original the filter kept before the new header
        (
            [chg(1, b"B", b""), ins(3, b"T", b"t")],
            [
                Deleted(3),
                new(2, b"T", b"t"),
            ],
        ),
        # a header the filter added and changed is a new header with the final text
        ([add(b"N", b"1"), chg(1, b"N", b"2")], [new(5, b"N", b"2")]),
        ([add(b"N", b"1"), chg(1, b"N", b"")], []),
        # changing back to the original text is no change
        ([chg(1, b"B", b"x"), chg(1, b"B", b"2")], []),
    ],
)
def test_header_ops(packets: list[Reply], expected: list[object]) -> None:
    """Each filter's packets, replayed on its own view, become identity-level operations."""
    view = replay(ORIGINAL.headers, packets, "f")
    assert tuple(h.field for h in view) == apply_postfix(ORIGINAL, packets).headers
    assert list(header_ops(ORIGINAL.headers, view)) == expected


# --- several filters ----------------------------------------------------------------------


def test_single_editor_is_forwarded_verbatim() -> None:
    """With one header-editing filter the script is its packets, redundant ones included."""
    packets: list[Reply] = [
        add(b"X", b"1"),
        chg(1, b"X", b""),
        ins(0, b"T", b"t"),
    ]
    result = merge([], packets, [])
    assert result.script == tuple(packets)
    assert result.conflicts == ()


@pytest.mark.parametrize(
    ("requests", "conflicts"),
    [
        # the same header changed differently: conflict, the later filter wins
        ([[chg(1, b"Subject", b"one")], [chg(1, b"Subject", b"two")]], [("Subject", ("f1", "f2"))]),
        # change against delete, either way round
        ([[chg(1, b"B", b"")], [chg(1, b"B", b"x")]], [("B", ("f1", "f2"))]),
        ([[chg(1, b"B", b"x")], [chg(1, b"B", b"")]], [("B", ("f1", "f2"))]),
        # agreeing edits are no conflict
        ([[chg(1, b"B", b"")], [chg(1, b"B", b"")]], []),
        ([[chg(1, b"B", b"x")], [chg(1, b"B", b"x")]], []),
        # different headers of one name are different identities
        ([[chg(1, b"A", b"x")], [chg(2, b"A", b"y")]], []),
        # new headers never conflict
        ([[add(b"B", b"x")], [add(b"B", b"x")]], []),
        # three filters: every one that touched the header is named
        (
            [[chg(1, b"A", b"")], [], [chg(1, b"A", b"")], [chg(1, b"A", b"z")]],
            [("A", ("f1", "f3", "f4"))],
        ),
    ],
)
def test_conflicts(
    requests: list[list[Reply]], conflicts: list[tuple[str, tuple[str, ...]]]
) -> None:
    result = merge(*requests)
    assert result.conflicts == tuple(
        Conflict(ConflictKind.HEADER, filters, name.encode()) for name, filters in conflicts
    )


@pytest.mark.parametrize(
    ("requests", "headers"),
    [
        (
            [[chg(1, b"Subject", b"one")], [chg(1, b"Subject", b"two")]],
            [H, b"From", b"A", b"B", b"A", b"Subject: two"],
        ),
        ([[chg(1, b"B", b"x")], [chg(1, b"B", b"")]], [H, b"From", b"A", b"A", b"Subject"]),
        # f2 deletes A#1 and then changes "A#1", which is the original A#2, in its own view
        (
            [[chg(2, b"A", b"x")], [chg(1, b"A", b""), chg(1, b"A", b"y")]],
            [H, b"From", b"B", b"A: y", b"Subject"],
        ),
        # inserts keep their place relative to the headers each filter saw
        (
            [[ins(3, b"X1")], [ins(3, b"X2"), ins(0, b"T")]],
            [b"T", H, b"From", b"A", b"X1", b"X2", b"B", b"A", b"Subject"],
        ),
        # the anchor (A#1) deleted by another filter: the new header stays in its gap
        ([[ins(3, b"X")], [chg(1, b"A", b"")]], [H, b"From", b"X", b"B", b"A", b"Subject"]),
        # appends come in filter order
        (
            [[add(b"Z1")], [add(b"Z2")], [chg(9, b"Z3", b"v")]],
            [H, b"From", b"A", b"B", b"A", b"Subject", b"Z1", b"Z2", b"Z3: v"],
        ),
        # a filter's append after a header another filter deleted
        ([[chg(1, b"Subject", b"")], [add(b"Z")]], [H, b"From", b"A", b"B", b"A", b"Z"]),
    ],
)
def test_merged_model(requests: list[list[Reply]], headers: list[bytes]) -> None:
    """The merged header list: original headers by name, new or changed ones with their value."""
    assert [_label(field) for field in merge(*requests).headers] == headers


def _label(field: HeaderField) -> bytes:
    if field.hidden:
        return H
    if (field.name, field.value) in ORIGINAL.visible_headers() or not field.value:
        return field.name
    return field.name + b": " + field.value


def test_script_order_and_indices() -> None:
    """Changes first, then deletions per name from the highest index down, then inserts at
    ascending positions counted on the list as it stands, then appends."""
    result = merge(
        [chg(1, b"A", b""), ins(1, b"T1", b"v"), add(b"Z", b"z")],
        [chg(2, b"A", b""), chg(1, b"Subject", b"new")],
        [ins(5, b"T2", b"w")],  # above Subject, below A#2 (which f2 deletes)
    )
    assert result.script == (
        chg(1, b"Subject", b"new"),
        chg(2, b"A", b""),
        chg(1, b"A", b""),
        ins(1, b"T1", b"v"),
        ins(4, b"T2", b"w"),
        add(b"Z", b"z"),
    )
    assert visible(result.headers) == [
        (H, b""),
        (b"T1", b"v"),
        (b"From", b"a@x"),
        (b"B", b"2"),
        (b"T2", b"w"),
        (b"Subject", b"new"),
        (b"Z", b"z"),
    ]


def test_change_keeps_the_filters_spelling() -> None:
    """Postfix writes the name as the filter spelled it; the script does the same."""
    result = merge([chg(1, b"subject", b"x")], [add(b"N")])
    assert result.script[0] == chg(1, b"subject", b"x")
    assert (b"subject", b"x") in visible(result.headers)


def test_no_hidden_received() -> None:
    """Without the MTA's hidden header, index 0 is simply the top."""
    original = MessageState.received([(b"A", b"1")], hidden_received=False)
    requests: list[tuple[str, list[Reply]]] = [
        ("f1", [ins(0, b"T")]),
        ("f2", [ins(1, b"U")]),
    ]
    result = merge_headers(original.headers, requests)
    assert visible(result.headers) == [(b"T", b""), (b"A", b"1"), (b"U", b"")]
    assert apply_postfix(original, result.script).headers == result.headers


@pytest.mark.parametrize(
    "model",
    [
        # original headers reordered
        [orig(1, b"From", b"a@x"), orig(0, b"Received", b"")],
        # the hidden header deleted
        [orig(1, b"From", b"a@x")],
        # renamed
        [orig(0, b"Received", b""), orig(1, b"To", b"a@x")],
        # emptied
        [orig(0, b"Received", b""), orig(1, b"From", b"")],
    ],
)
def test_unreachable_models_are_refused(model: list[ModelHeader]) -> None:
    original = MessageState.received([(b"From", b"a@x")])
    with pytest.raises(ValueError):
        header_script(original.headers, model)
