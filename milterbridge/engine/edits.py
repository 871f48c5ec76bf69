"""The end-of-message merge: every filter's edit packets in, one edit script for the MTA out.

Input: the message as the filters saw it (an engine.apply.MessageState) and, per filter in
configured order, the packets it sent after END-OF-MESSAGE before its final reply. Output: the
packets to send the MTA before the merged final reply, and the conflicts met (design §6, protocol
notes §3.3, §8.5).

Rules:

* **Forward verbatim.** When exactly one filter sent edits, its edits go out exactly as it sent
  them, in its order: transparent by construction, Postfix's quirks included. The one change is
  that a ReplaceBody packet over CHUNK_SIZE bytes is cut into consecutive chunks (same body).
* **Not edits.** PROGRESS is the session's business, and anything else that is not an edit packet
  (a final reply) is no part of the script: both are dropped, in every mode.
* With several editing filters the script is built from models, in this order (Postfix refuses
  body chunks interleaved with other edits, so the body goes first, as milter-manager does):
  1. **Body**: the last filter (config order) that replaced the body wins; its body goes out as
     consecutive ReplaceBody chunks of at most CHUNK_SIZE bytes (one empty chunk for an empty
     body). Two filters replacing it with different bodies is a conflict (kind "body").
  2. **Headers**: engine.headers (per-filter views, identity model, conflicts of kind "header").
  3. **Sender**: the last ChangeFrom in config order wins, with its args; filters whose final
     ChangeFrom differ are a conflict (kind "sender").
  4. **Recipients** are a set, and every filter's requests apply to one shared set in config
     order (addresses are not positions, so there is no view to translate): adding a present
     address is a no-op, deleting an absent one is a no-op, deleting an added one cancels the
     add. **Delete-then-add of an original recipient cancels the deletion**: the recipient stays
     as the MTA received it, and the add (with any ESMTP args) is dropped -- emitting DELRCPT
     then ADDRCPT would make Postfix drop and redo its alias expansion, and a plain ADDRCPT alone
     would deliver twice. The script is the difference between the original and the final set:
     DelRcpt for original recipients that are gone (in original order), then the add packet
     (AddRcpt, or AddRcptPar with its args) of each new recipient (in the order added).
  5. **Quarantine**: one Quarantine packet with every reason (filter order, empty ones left
     out) joined by "; ", cut to the 100 bytes Postfix keeps.

Invariant: with several editors the script holds at most one run of ReplaceBody packets, first,
and no packet over CHUNK_SIZE.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..milter import (
    CHUNK_SIZE,
    EDIT_REPLIES,
    AddHeader,
    AddRcpt,
    AddRcptPar,
    ChangeFrom,
    ChangeHeader,
    DelRcpt,
    InsertHeader,
    Quarantine,
    ReplaceBody,
    Reply,
)
from .apply import MessageState
from .headers import Conflict, ConflictKind, merge_headers

#: The edit packets a filter may send at end-of-message.
Edit = (
    AddHeader
    | InsertHeader
    | ChangeHeader
    | AddRcpt
    | AddRcptPar
    | DelRcpt
    | ChangeFrom
    | ReplaceBody
    | Quarantine
)
EDITS: tuple[type[Edit], ...] = typing.get_args(Edit)
assert set(EDITS) == set(EDIT_REPLIES), "Edit must name exactly the codec's edit packets"

#: Postfix keeps this many bytes of a quarantine reason (milter8.c).
QUARANTINE_REASON_MAX = 100


@dataclass(frozen=True, slots=True)
class EditMerge:
    """The edit script for the MTA (to precede the final reply) and the conflicts met.

    ``editors`` are the filters that sent edits, in config order; ``verbatim`` says the script
    is the only editor's packets as it sent them.
    """

    script: tuple[Edit, ...]
    conflicts: tuple[Conflict, ...] = ()
    editors: tuple[str, ...] = ()

    @property
    def verbatim(self) -> bool:
        return len(self.editors) == 1


def edits_of(packets: Iterable[Reply]) -> list[Edit]:
    """The edit packets among what a filter sent (PROGRESS and final replies dropped)."""
    return [p for p in packets if isinstance(p, EDITS)]


def merge_edits(
    original: MessageState, requests: Sequence[tuple[str, Sequence[Reply]]]
) -> EditMerge:
    """Merge every filter's end-of-message edits into one script.

    Args:
        original: the message every filter saw (headers with the MTA's hidden Received).
        requests: (filter name, the packets it sent before its final reply), in configured order.
    """
    per_filter = [(name, edits_of(packets)) for name, packets in requests]
    editing = [(name, edits) for name, edits in per_filter if edits]
    editors = tuple(name for name, _ in editing)
    if not editing:
        return EditMerge(())
    if len(editing) == 1:
        return EditMerge(tuple(_rechunk(editing[0][1])), (), editors)
    body, body_conflicts = _merge_body(editing)
    headers = merge_headers(original.headers, editing)
    sender, sender_conflicts = _merge_sender(editing)
    script = (
        *body,
        *headers.script,
        *sender,
        *_merge_recipients(original.recipients, editing),
        *_merge_quarantine(editing),
    )
    conflicts = (*body_conflicts, *headers.conflicts, *sender_conflicts)
    return EditMerge(script, conflicts, editors)


def body_chunks(body: bytes) -> tuple[ReplaceBody, ...]:
    """A body as ReplaceBody packets of at most CHUNK_SIZE bytes (one empty packet if empty)."""
    if not body:
        return (ReplaceBody(b""),)
    return tuple(ReplaceBody(body[i : i + CHUNK_SIZE]) for i in range(0, len(body), CHUNK_SIZE))


def _rechunk(edits: Sequence[Edit]) -> list[Edit]:
    script: list[Edit] = []
    for edit in edits:
        if isinstance(edit, ReplaceBody) and len(edit.chunk) > CHUNK_SIZE:
            script.extend(body_chunks(edit.chunk))
        else:
            script.append(edit)
    return script


_PerFilter = Sequence[tuple[str, Sequence[Edit]]]


def _merge_body(editing: _PerFilter) -> tuple[tuple[ReplaceBody, ...], tuple[Conflict, ...]]:
    bodies = [
        (name, b"".join(e.chunk for e in edits if isinstance(e, ReplaceBody)))
        for name, edits in editing
        if any(isinstance(e, ReplaceBody) for e in edits)
    ]
    if not bodies:
        return (), ()
    conflicts = _conflict(ConflictKind.BODY, bodies)
    return body_chunks(bodies[-1][1]), conflicts


def _merge_sender(editing: _PerFilter) -> tuple[tuple[ChangeFrom, ...], tuple[Conflict, ...]]:
    finals = [
        (name, [e for e in edits if isinstance(e, ChangeFrom)][-1])
        for name, edits in editing
        if any(isinstance(e, ChangeFrom) for e in edits)
    ]
    if not finals:
        return (), ()
    return (finals[-1][1],), _conflict(ConflictKind.SENDER, finals)


def _conflict(kind: ConflictKind, outcomes: Sequence[tuple[str, object]]) -> tuple[Conflict, ...]:
    if len({outcome for _, outcome in outcomes}) < 2:
        return ()
    return (Conflict(kind, tuple(name for name, _ in outcomes)),)


def _merge_recipients(original: Sequence[bytes], editing: _PerFilter) -> list[Edit]:
    received = dict.fromkeys(original)
    present: dict[bytes, AddRcpt | AddRcptPar | None] = dict.fromkeys(original)
    for _, edits in editing:
        for edit in edits:
            if isinstance(edit, AddRcpt | AddRcptPar) and edit.address not in present:
                present[edit.address] = None if edit.address in received else edit
            elif isinstance(edit, DelRcpt):
                present.pop(edit.address, None)
    script: list[Edit] = [DelRcpt(r) for r in received if r not in present]
    script.extend(add for add in present.values() if add is not None)
    return script


def _merge_quarantine(editing: _PerFilter) -> list[Edit]:
    reasons = [e.reason for _, edits in editing for e in edits if isinstance(e, Quarantine)]
    if not reasons:
        return []
    joined = b"; ".join(reason for reason in reasons if reason)
    return [Quarantine(joined[:QUARANTINE_REASON_MAX])]
