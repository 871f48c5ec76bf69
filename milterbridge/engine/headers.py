"""The header model: headers with stable identities, several filters' requests merged into one.

Theory of operation (design §6, protocol notes §6.6, §6.6b, §8.5). Every filter of a pass saw the
same original header list. Its index-based requests only make sense against that view, so:

1. **Replay** each filter's AddHeader/InsertHeader/ChangeHeader packets, in the order it sent them,
   on its own copy of the original list, every entry tagged with an identity (HeaderId): original
   headers by their list position, new ones by (filter, n). The replay follows engine/apply.py
   exactly: the hidden Received (position 0) counts for InsertHeader and never for ChangeHeader;
   ChangeHeader's index is 1-based per name (case-insensitive), 0 acts as 1, a deletion renumbers
   at once, a missing header with a value is appended, with an empty value nothing happens.
2. **Derive identity-level operations** from the filter's final view (header_ops): Changed(original
   position, new field), Deleted(original position), Added(after, field). ``after`` is the anchor:
   the original position of the nearest original header that precedes the new one in the filter's
   final view (None: above everything). Original headers never move relative to each other, so
   this names a *gap* in the original order; a new header stays in its gap even when another
   filter deletes its anchor -- it then follows the nearest earlier original that survives.
3. **Merge** in configured filter order: for each original header the last filter that changed or
   deleted it wins; when two filters did so with different outcomes that is a CONFLICT (kind
   "header", the header name, every filter that touched it). Agreeing edits (both delete, both
   set the same text) are no conflict. New headers are never in conflict: within one gap they
   come in filter order, each filter's in its own order, and a gap's new headers precede the
   original header that closes the gap.
4. **Emit** one script that turns the original list into the model under Postfix's semantics:
   changes (ChangeHeader, per-name index on the current list), then deletions per name from the
   highest index down, then inserts in ascending final position (InsertHeader, the index counts
   the hidden Received), then the new headers after the last original header as AddHeader.

Forward verbatim: when exactly one filter sent header packets, the script is its packets as it
sent them (Postfix's quirks included); the model is still computed, and is what they produce.

Invariant (checked by property tests): apply_postfix(original, script) yields the model's fields.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import assert_never

from ..milter import AddHeader, ChangeHeader, InsertHeader, Reply
from .apply import HeaderField

#: The header edit packets.
HeaderEdit = AddHeader | InsertHeader | ChangeHeader
HEADER_EDITS: tuple[type[HeaderEdit], ...] = (AddHeader, InsertHeader, ChangeHeader)


class ConflictKind(enum.Enum):
    """What two filters fought over (the ``kind`` label of merge_conflicts_total)."""

    HEADER = "header"
    BODY = "body"
    SENDER = "sender"


@dataclass(frozen=True, slots=True)
class Conflict:
    """Two or more filters edited the same thing differently; the last in ``filters`` won."""

    kind: ConflictKind
    filters: tuple[str, ...]
    subject: bytes = b""  # the header name, for kind HEADER


@dataclass(frozen=True, slots=True)
class HeaderId:
    """A header's identity: ``owner`` None and its position in the original list, or the
    ``number``-th header (from 0) that filter ``owner`` created."""

    owner: str | None
    number: int


@dataclass(frozen=True, slots=True)
class ModelHeader:
    id: HeaderId
    field: HeaderField


@dataclass(frozen=True, slots=True)
class Changed:
    """Original header ``target`` now reads ``field`` (same name, maybe other case)."""

    target: int
    field: HeaderField


@dataclass(frozen=True, slots=True)
class Deleted:
    """Original header ``target`` is gone."""

    target: int


@dataclass(frozen=True, slots=True)
class Added:
    """A new header, placed after original header ``after`` (None: at the very top)."""

    after: int | None
    header: ModelHeader


HeaderOp = Changed | Deleted | Added


def tag_original(original: Sequence[HeaderField]) -> list[ModelHeader]:
    return [ModelHeader(HeaderId(None, position), f) for position, f in enumerate(original)]


def replay(
    original: Sequence[HeaderField], packets: Iterable[Reply], owner: str = ""
) -> tuple[ModelHeader, ...]:
    """The identity-tagged header list after one filter's packets, as Postfix applies them.

    Packets other than header edits are ignored. New headers get HeaderId(owner, n).
    """
    view = tag_original(original)
    created = 0
    for packet in packets:
        if _replay_one(view, packet, HeaderId(owner, created)):
            created += 1
    return tuple(view)


def _replay_one(view: list[ModelHeader], packet: Reply, new: HeaderId) -> bool:
    """Apply one packet to ``view``; True when it created the header ``new``."""
    match packet:
        case AddHeader(name=name, value=value):
            view.append(ModelHeader(new, HeaderField(name, value)))
        case InsertHeader(index=index, name=name, value=value):
            view.insert(min(index, len(view)), ModelHeader(new, HeaderField(name, value)))
        case ChangeHeader(index=index, name=name, value=value):
            return _change(view, index, HeaderField(name, value), new)
        case _:
            return False
    return True


def _change(view: list[ModelHeader], index: int, field: HeaderField, new: HeaderId) -> bool:
    position = occurrence(view, field.name, index)
    if position is None:
        if field.value:  # a change of a header that is not there adds it at the end
            view.append(ModelHeader(new, field))
        return bool(field.value)
    if field.value:
        view[position] = ModelHeader(view[position].id, field)
    else:
        del view[position]
    return False


def occurrence(headers: Sequence[ModelHeader], name: bytes, index: int) -> int | None:
    """List position of the index-th (1-based, 0 acts as 1) visible header called ``name``."""
    wanted = name.lower()
    count = 0
    for position, header in enumerate(headers):
        if not header.field.hidden and header.field.name.lower() == wanted:
            count += 1
            if count == max(index, 1):
                return position
    return None


def header_ops(
    original: Sequence[HeaderField], view: Sequence[ModelHeader]
) -> tuple[HeaderOp, ...]:
    """Identity-level operations that turn ``original`` into a filter's final ``view``."""
    survivors = {h.id.number: h.field for h in view if h.id.owner is None}
    ops: list[HeaderOp] = []
    for position, original_field in enumerate(original):
        now = survivors.get(position)
        if now is None:
            ops.append(Deleted(position))
        elif now != original_field:
            ops.append(Changed(position, now))
    anchor: int | None = None
    for header in view:
        if header.id.owner is None:
            anchor = header.id.number
        else:
            ops.append(Added(anchor, header))
    return tuple(ops)


@dataclass(frozen=True, slots=True)
class HeaderMerge:
    """The merged header model, the script that produces it, and the conflicts met."""

    model: tuple[ModelHeader, ...]
    script: tuple[HeaderEdit, ...]
    conflicts: tuple[Conflict, ...] = ()

    @property
    def headers(self) -> tuple[HeaderField, ...]:
        return tuple(h.field for h in self.model)


def merge_headers(
    original: Sequence[HeaderField], requests: Sequence[tuple[str, Sequence[Reply]]]
) -> HeaderMerge:
    """Merge the header requests of several filters that all saw ``original``.

    Args:
        original: the header list the filters were shown, with the MTA's hidden Received.
        requests: (filter name, the packets it sent), in configured filter order; packets that
            are not header edits are ignored.
    """
    original = tuple(original)
    edits = [
        (name, [p for p in packets if isinstance(p, HEADER_EDITS)]) for name, packets in requests
    ]
    editing = [(name, packets) for name, packets in edits if packets]
    per_filter = [(name, header_ops(original, replay(original, p, name))) for name, p in editing]
    model, conflicts = _merge_ops(original, per_filter)
    if len(editing) == 1:
        return HeaderMerge(model, tuple(editing[0][1]), conflicts)
    return HeaderMerge(model, header_script(original, model), conflicts)


_Outcome = HeaderField | None  # None: deleted


_Touches = dict[int, list[tuple[str, _Outcome]]]


def _merge_ops(
    original: tuple[HeaderField, ...], per_filter: Sequence[tuple[str, Sequence[HeaderOp]]]
) -> tuple[tuple[ModelHeader, ...], tuple[Conflict, ...]]:
    touched, gaps = _collect(len(original), per_filter)
    model: list[ModelHeader] = list(gaps[0])
    for position, field in enumerate(original):
        outcome = touched[position][-1][1] if position in touched else field
        if outcome is not None:
            model.append(ModelHeader(HeaderId(None, position), outcome))
        model.extend(gaps[position + 1])
    conflicts = tuple(
        Conflict(ConflictKind.HEADER, tuple(name for name, _ in touches), original[target].name)
        for target, touches in sorted(touched.items())
        if len({outcome for _, outcome in touches}) > 1
    )
    return tuple(model), conflicts


def _collect(
    size: int, per_filter: Sequence[tuple[str, Sequence[HeaderOp]]]
) -> tuple[_Touches, list[list[ModelHeader]]]:
    """Who touched which original header, and the new headers per gap (gap g precedes original
    header g; gap ``size`` is the end), each in filter order."""
    touched: _Touches = {}
    gaps: list[list[ModelHeader]] = [[] for _ in range(size + 1)]
    for name, ops in per_filter:
        for op in ops:
            match op:
                case Changed(target=target, field=field):
                    touched.setdefault(target, []).append((name, field))
                case Deleted(target=target):
                    touched.setdefault(target, []).append((name, None))
                case Added(after=after, header=header):
                    gaps[0 if after is None else after + 1].append(header)
                case _:
                    assert_never(op)
    return touched, gaps


def header_script(
    original: Sequence[HeaderField], model: Sequence[ModelHeader]
) -> tuple[HeaderEdit, ...]:
    """The packets that turn ``original`` into ``model`` under Postfix's semantics (rule 4).

    Raises:
        ValueError: the model is not reachable with header packets (original headers reordered,
            the hidden header touched, a change to another name or to an empty value).
    """
    current = tag_original(original)
    script: list[HeaderEdit] = []
    script += _changes(original, model, current)
    script += _deletions(model, current)
    last_original = max((i for i, h in enumerate(model) if h.id.owner is None), default=-1)
    for position, header in enumerate(model):
        if header.id.owner is None:
            continue
        name, value = header.field.name, header.field.value
        if position > last_original:
            script.append(AddHeader(name, value))
        else:
            script.append(InsertHeader(position, name, value))
    return tuple(script)


def _changes(
    original: Sequence[HeaderField], model: Sequence[ModelHeader], current: list[ModelHeader]
) -> list[HeaderEdit]:
    kept = [h.id.number for h in model if h.id.owner is None]
    if kept != sorted(set(kept)) or any(not 0 <= n < len(original) for n in kept):
        raise ValueError("the model reorders or invents original headers")
    script: list[HeaderEdit] = []
    for header in model:
        position, field = header.id.number, header.field
        if header.id.owner is not None or field == original[position]:
            continue
        was = original[position]
        if was.hidden or field.hidden or field.name.lower() != was.name.lower() or not field.value:
            raise ValueError(f"header {position} cannot be changed to {field!r}")
        index = _name_index(current, position)
        script.append(ChangeHeader(index, field.name, field.value))
        current[position] = header
    return script


def _deletions(model: Sequence[ModelHeader], current: list[ModelHeader]) -> list[HeaderEdit]:
    kept = {h.id.number for h in model if h.id.owner is None}
    gone = [h for h in current if h.id.number not in kept]
    if any(h.field.hidden for h in gone):
        raise ValueError("the hidden header cannot be deleted")
    by_name: dict[bytes, list[ModelHeader]] = {}
    for header in gone:
        by_name.setdefault(header.field.name.lower(), []).append(header)
    script: list[HeaderEdit] = []
    for headers in by_name.values():
        for header in reversed(headers):
            index = _name_index(current, header.id.number)
            script.append(ChangeHeader(index, header.field.name, b""))
    current[:] = [h for h in current if h.id.number in kept]
    return script


def _name_index(current: Sequence[ModelHeader], number: int) -> int:
    """The 1-based per-name index of original header ``number`` in ``current``."""
    position = next(i for i, h in enumerate(current) if h.id == HeaderId(None, number))
    wanted = current[position].field.name.lower()
    return sum(
        1 for h in current[: position + 1] if not h.field.hidden and h.field.name.lower() == wanted
    )
