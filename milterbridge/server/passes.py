"""Passes: filters of pass n+1 see the message as the filters of passes <= n left it (design §6).

The first pass gets the message live from the MTA, as every filter did before passes existed. At
end-of-message, once that pass has answered and its edits are merged, the next pass gets the
message again -- from the bridge's copy (the headers it kept, the body in its spool) with the
earlier passes' header and body edits applied -- and so on. This is how a DKIM signer in pass 2
signs what the scanners and the disclaimer of pass 1 produced.

Why sending the passes' scripts one after the other is exact: each pass's edits are merged
against the view that pass saw, and that view is, by construction, what the MTA holds once it
has applied the earlier scripts (engine.apply replays Postfix's semantics). So the MTA applying
script 1 then script 2 reaches what pass 2 asked for -- the chain Postfix would run, without its
latency for the filters within a pass. Two exceptions, handled here: the body (Postfix wants one
consecutive run of REPLBODY packets, so only the last pass's replacement is sent, first), and
quarantine, which ends the message like a refusal: later passes are not called.

Envelope edits of earlier passes are not replayed as RCPT/MAIL commands to later passes: their
milters saw the envelope live, as the MTA sent it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import BinaryIO

from ..engine.apply import MessageState, apply_postfix
from ..milter import (
    CHUNK_SIZE,
    Continue,
    EndOfHeaders,
    EndOfMessage,
    Header,
    Macro,
    Quarantine,
    ReplaceBody,
    Reply,
    Skip,
)
from ..upstream import UpstreamMilter


@dataclass(frozen=True, slots=True)
class MessageView:
    """The message as the filters of one pass see it.

    ``state.body`` is unused: the body is ``body`` when an earlier pass replaced it, else the
    MTA's own body in the session's spool (None here), which is never loaded into memory.
    """

    state: MessageState
    body: bytes | None = None

    def headers(self) -> list[tuple[bytes, bytes]]:
        return self.state.visible_headers()


@dataclass(frozen=True, slots=True)
class PassScript:
    """The edits to send the MTA so far: the body run apart, everything else in order."""

    body: tuple[Reply, ...] = ()
    others: tuple[Reply, ...] = ()

    @property
    def packets(self) -> list[Reply]:
        """Postfix takes the body as one consecutive run: it goes first."""
        return [*self.body, *self.others]

    @property
    def quarantined(self) -> bool:
        return any(isinstance(edit, Quarantine) for edit in self.others)


def advance(
    view: MessageView, script: PassScript, edits: Sequence[Reply]
) -> tuple[MessageView, PassScript]:
    """Add one pass's merged edits: the view the next pass sees, and the script so far."""
    body_run = tuple(edit for edit in edits if isinstance(edit, ReplaceBody))
    others = tuple(edit for edit in edits if not isinstance(edit, ReplaceBody))
    state = apply_postfix(view.state, others)
    body = view.body
    if body_run:
        body = b"".join(edit.chunk for edit in body_run if isinstance(edit, ReplaceBody))
    new_script = PassScript(body_run or script.body, script.others + others)
    return MessageView(replace(state, body=b""), body), new_script


def body_chunks(view: MessageView, spool: BinaryIO, size: int) -> Iterator[bytes]:
    """The view's body in chunks the MTA would send (at most CHUNK_SIZE bytes each).

    Reads the spool by offset, without an await between seek and read, so that several
    milters of one pass may be fed from it at once.
    """
    if view.body is not None:
        for start in range(0, len(view.body), CHUNK_SIZE):
            yield view.body[start : start + CHUNK_SIZE]
        return
    for offset in range(0, size, CHUNK_SIZE):
        spool.seek(offset)
        yield spool.read(CHUNK_SIZE)


async def replay_message(
    client: UpstreamMilter,
    headers: Sequence[tuple[bytes, bytes]],
    chunks: Iterator[bytes],
    eoh_macro: Macro | None,
    eom_macro: Macro | None,
) -> list[Reply]:
    """Feed one later-pass milter the message as the MTA would, and return its final replies.

    A refusal (or accept) before end-of-message is its answer for the message, as it would be
    from Postfix's point of view; SKIP stops the body early.
    """
    for name, value in headers:
        replies = await client.command(None, Header(name, value))
        if _ends(replies):
            return replies
    replies = await client.command(eoh_macro, EndOfHeaders())
    if _ends(replies):
        return replies
    for chunk in chunks:
        if client.skipping_body:
            break
        replies = await client.body(None, chunk)
        if replies and isinstance(replies[-1], Skip):
            break
        if _ends(replies):
            return replies
    return await client.command(eom_macro, EndOfMessage())


def _ends(replies: list[Reply]) -> bool:
    """A final reply other than CONTINUE/SKIP ends the milter's part in the message."""
    return bool(replies) and not isinstance(replies[-1], Continue | Skip)
