"""Applying end-of-message edits to a message the way Postfix does.

This is the reference semantics: what Postfix 3.7 (Debian 12) was measured to do with each edit
packet (protocol notes §6.6 and §6.6b). The merge engine uses it to build the view a later pass
sees and to check its own scripts; ``milterbridge send`` uses it to show what a message becomes.

The header list holds the headers as filters see them (name, value without the one leading space
Postfix strips), plus Postfix's own Received header, which filters never see: it sits at list
position 0 as a hidden entry, counts for SMFIR_INSHEADER and never for SMFIR_CHGHEADER.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from ..milter import (
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


@dataclass(frozen=True, slots=True)
class HeaderField:
    """One header; ``hidden`` marks the MTA's own Received header that filters never see."""

    name: bytes
    value: bytes
    hidden: bool = False


#: Postfix's Received header as the model holds it (its text is the MTA's business).
HIDDEN_RECEIVED = HeaderField(b"Received", b"", hidden=True)


@dataclass(frozen=True, slots=True)
class MessageState:
    """A message as the MTA holds it while filters edit it."""

    headers: tuple[HeaderField, ...]
    body: bytes = b""
    sender: bytes = b"<>"
    sender_args: bytes | None = None
    recipients: tuple[bytes, ...] = ()
    quarantine: tuple[bytes, ...] = ()

    @classmethod
    def received(
        cls,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes = b"",
        sender: bytes = b"<>",
        recipients: Iterable[bytes] = (),
        *,
        hidden_received: bool = True,
    ) -> MessageState:
        """The state before any filter: the MTA's hidden Received on top of what filters see."""
        fields = tuple(HeaderField(name, value) for name, value in headers)
        if hidden_received:
            fields = (HIDDEN_RECEIVED, *fields)
        return cls(fields, body, sender, None, tuple(recipients))

    def visible_headers(self) -> list[tuple[bytes, bytes]]:
        """The header list a filter would be shown."""
        return [(h.name, h.value) for h in self.headers if not h.hidden]


def _occurrence(headers: list[HeaderField], name: bytes, index: int) -> int | None:
    """List position of the index-th (1-based; 0 acts as 1) visible header called ``name``."""
    wanted = name.lower()
    count = 0
    for position, header in enumerate(headers):
        if not header.hidden and header.name.lower() == wanted:
            count += 1
            if count == max(index, 1):
                return position
    return None


@dataclass(slots=True)
class _Editing:
    headers: list[HeaderField]
    body: bytearray | None = None
    recipients: list[bytes] = field(default_factory=list)


def apply_postfix(state: MessageState, edits: Iterable[Reply]) -> MessageState:
    """The message after Postfix applied one filter's edit packets, in order.

    Non-edit packets (PROGRESS, the final reply) are ignored.
    """
    work = _Editing(list(state.headers), None, list(state.recipients))
    sender, sender_args = state.sender, state.sender_args
    quarantine = list(state.quarantine)
    for edit in edits:
        match edit:
            case AddHeader(name=name, value=value):
                work.headers.append(HeaderField(name, value))
            case InsertHeader(index=index, name=name, value=value):
                work.headers.insert(min(index, len(work.headers)), HeaderField(name, value))
            case ChangeHeader(index=index, name=name, value=value):
                _change(work.headers, index, name, value)
            case ChangeFrom(address=address, args=args):
                sender, sender_args = address, args
            case AddRcpt(address=address) | AddRcptPar(address=address):
                work.recipients.append(address)
            case DelRcpt(address=address):
                work.recipients = [r for r in work.recipients if r != address]
            case ReplaceBody(chunk=chunk):
                if work.body is None:
                    work.body = bytearray()
                work.body += chunk
            case Quarantine(reason=reason):
                quarantine.append(reason)
            case _:
                pass
    return replace(
        state,
        headers=tuple(work.headers),
        body=state.body if work.body is None else bytes(work.body),
        sender=sender,
        sender_args=sender_args,
        recipients=tuple(work.recipients),
        quarantine=tuple(quarantine),
    )


def _change(headers: list[HeaderField], index: int, name: bytes, value: bytes) -> None:
    position = _occurrence(headers, name, index)
    if position is None:
        if value:  # a change of a header that is not there adds it at the end
            headers.append(HeaderField(name, value))
        return
    if value:
        headers[position] = HeaderField(name, value)
    else:
        del headers[position]
