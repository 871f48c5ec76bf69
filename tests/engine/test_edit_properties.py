"""Property tests: the merged header script does what the model says, under Postfix's semantics.

Random original header lists over a small name alphabet (so names collide, and one of them is
the hidden Received's name), random header requests from one to three filters.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from milterbridge.engine.apply import MessageState, apply_postfix
from milterbridge.engine.edits import merge_edits
from milterbridge.engine.headers import (
    Changed,
    Deleted,
    HeaderId,
    header_ops,
    header_script,
    merge_headers,
    replay,
)
from milterbridge.milter import AddHeader, ChangeHeader, InsertHeader, Reply

NAMES = st.sampled_from([b"A", b"a", b"B", b"Subject", b"Received"])
VALUES = st.sampled_from([b"1", b"2", b"x y"])
SETTINGS = settings(max_examples=150, deadline=None)

Requests = list[tuple[str, list[Reply]]]


@st.composite
def originals(draw: st.DrawFn) -> MessageState:
    headers = draw(st.lists(st.tuples(NAMES, VALUES | st.just(b"")), max_size=5))
    return MessageState.received(headers, hidden_received=draw(st.booleans()))


def header_requests(size: int) -> st.SearchStrategy[list[Reply]]:
    packet: st.SearchStrategy[Reply] = st.one_of(
        st.builds(AddHeader, NAMES, VALUES),
        st.builds(InsertHeader, st.integers(0, size + 2), NAMES, VALUES),
        st.builds(ChangeHeader, st.integers(0, 4), NAMES, VALUES | st.just(b"")),
    )
    return st.lists(packet, max_size=5)


@st.composite
def scenarios(draw: st.DrawFn, max_filters: int = 3) -> tuple[MessageState, Requests]:
    original = draw(originals())
    count = draw(st.integers(1, max_filters))
    requests: Requests = [
        (f"f{i}", draw(header_requests(len(original.headers)))) for i in range(count)
    ]
    return original, requests


@SETTINGS
@given(scenarios())
def test_script_yields_the_merged_model(scenario: tuple[MessageState, Requests]) -> None:
    """(a) Postfix applying the emitted script gets exactly the merged model's header list, both
    for the script merge_headers returns and for the diff script of the same model."""
    original, requests = scenario
    merged = merge_headers(original.headers, requests)
    assert apply_postfix(original, merged.script).headers == merged.headers
    diff = header_script(original.headers, merged.model)
    assert apply_postfix(original, diff).headers == merged.headers


@SETTINGS
@given(scenarios(max_filters=1))
def test_single_editor_is_forwarded_verbatim(scenario: tuple[MessageState, Requests]) -> None:
    """(b) With one editing filter the script is its packets, and the model is what they do."""
    original, [(name, packets)] = scenario
    direct = apply_postfix(original, packets)
    result = merge_edits(original, [("quiet", []), (name, packets)])
    assert result.script == tuple(packets)
    assert apply_postfix(original, result.script) == direct
    assert merge_headers(original.headers, [(name, packets)]).headers == direct.headers
    assert tuple(h.field for h in replay(original.headers, packets, name)) == direct.headers


def _touched(original: MessageState, packets: Sequence[Reply]) -> set[int]:
    ops = header_ops(original.headers, replay(original.headers, packets))
    return {op.target for op in ops if isinstance(op, Changed | Deleted)}


def _disjoint(original: MessageState, requests: Requests) -> bool:
    seen: set[int] = set()
    for _, packets in requests:
        touched = _touched(original, packets)
        if touched & seen:
            return False
        seen |= touched
    return True


@SETTINGS
@given(scenarios())
def test_disjoint_filters_each_get_their_effect(scenario: tuple[MessageState, Requests]) -> None:
    """(c) When no two filters change or delete the same original header there is no conflict,
    and for every filter F the merged model, restricted to F's new headers and the original
    headers present in both F's view and the model, is F's view restricted the same way, with
    F's values; an original header nobody touched is unchanged."""
    original, requests = scenario
    if not _disjoint(original, requests):
        return
    merged = merge_headers(original.headers, requests)
    assert merged.conflicts == ()
    model = {h.id: h.field for h in merged.model}
    for name, packets in requests:
        view = replay(original.headers, packets, name)
        in_view = {h.id for h in view}
        shared = {i for i in in_view if i.owner == name or (i.owner is None and i in model)}
        assert [h.id for h in view if h.id in shared] == [
            h.id for h in merged.model if h.id in shared
        ]
        own = {HeaderId(None, t) for t in _touched(original, packets)} | {
            i for i in in_view if i.owner == name
        }
        assert {h.id: h.field for h in view if h.id in own} == {
            i: field for i, field in model.items() if i in own
        }
    touched_by_any = set().union(*(_touched(original, p) for _, p in requests))
    for position, field in enumerate(original.headers):
        if position not in touched_by_any:
            assert model[HeaderId(None, position)] == field
