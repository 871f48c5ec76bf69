"""An HTTP hook's answer, turned into a milter filter's answer: one final reply and edit packets.

The session merges hooks and milters with one set of rules (engine/verdicts.py, engine/edits.py),
so a hook's decoded response (upstream/hook_response.py) is expressed here exactly as a milter
would have said it. This module reads the response through the small interfaces below
(``HookResponseLike``, and each modification calling back into an ``EditBuilder``) instead of
importing the decoder's classes, so the engine stays free of the I/O packages the upstream side
pulls in.

**Action** (design §5):

* ``accept`` -> Continue(). A hook's accept means "fine with this stage"; unlike a milter's
  ACCEPT it does not end the hook's part in the message, so a hook listing ``rcpt`` and ``data``
  still gets its ``data`` call.
* ``discard`` -> Discard().
* ``quarantine`` -> Continue() and a Quarantine edit whose reason is ``response.message`` (line
  breaks and runs of white space flattened to one space) or "quarantined by hook". The message
  then goes on, and Postfix parks it in its hold queue at end-of-message.
* ``reject`` -> Reject(), or with ``response.status``:
  a 5xx status is a ReplyCode that rejects; a 4xx status is a ReplyCode that tempfails (the
  hooks protocol has no tempfail action: a 4xx status is how a hook asks for one). The text is
  ``<status> <enhancedStatus> <message>``; a message with line breaks becomes a multi-line reply
  (every line carries the code and the enhanced status), ``%`` is doubled (the milter reply
  escape), other control characters become spaces. Without a message the text is "Rejected"
  or "Try again later"; without an enhanced status the text carries none, unless a line starts
  with a digit, where the MTA would read one: then ``<class>.0.0`` is put in. Any other status, an
  enhanced status of another class or malformed, or text ``reply_code_problem`` still refuses
  falls back to the plain Reject() with a note. A status with accept, discard or quarantine is
  ignored.
* ``response.disconnect: true``, with any action, is ``421 <enhancedStatus or 4.7.0> <message or
  "closing connection">``: Postfix and Sendmail drop the SMTP session after a 421.

**Modifications**, in the order given:

* ``changeFrom`` -> ChangeFrom, ``addRcpt``/``addRecipient`` -> AddRcpt (AddRcptPar when there are
  parameters), ``deleteRcpt``/``deleteRecipient`` -> DelRcpt. Addresses go out in angle
  brackets (as the MTA spells them); parameters as ``KEYWORD=value`` joined by spaces, keywords
  upper-cased, ``true`` as the keyword alone, ``false``/null left out. Of several changeFrom the
  last one counts.
* ``replaceContents`` -> ReplaceBody chunks of at most CHUNK_SIZE bytes (UTF-8); the last one
  counts. The body goes first in the script: Postfix refuses body chunks after other edits.
* Header edits work on positions in ``message.headers`` as the hook received it (0-based), each
  one seeing the list as changed by those before it in the same response: ``insertHeader`` at
  ``i`` puts the new header before position ``i`` (``i`` equal to the length appends);
  ``changeHeader`` and ``deleteHeader`` need ``i`` to point at a header whose name equals
  ``name`` (ignoring case) and are a HookResponseError otherwise, as is an index past the end.
  A change to an empty value is kept (milter's CHGHEADER with an empty value would delete, so
  such a header is deleted and re-inserted). The final list is turned into header packets by
  engine/headers.py's ``header_script`` under Postfix's semantics: CHGHEADER indices count
  occurrences of the name, INSHEADER positions count Postfix's hidden Received at the top.
  Invariant (property-tested): ``apply_postfix`` of the edits to the headers the hook received
  gives the hook's intended list.

Edits are produced whatever the action; with a refusal the MTA never applies them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from ..milter import (
    AddRcpt,
    AddRcptPar,
    ChangeFrom,
    Continue,
    DelRcpt,
    Discard,
    Quarantine,
    Reject,
    ReplyCode,
    reply_code_problem,
)
from .apply import HIDDEN_RECEIVED, HeaderField
from .edits import Edit, body_chunks
from .headers import HeaderId, ModelHeader, header_script, tag_original
from .verdicts import StageReply

#: A parameter value as a hook gives it (see ``esmtp_args``).
ParameterValue = str | int | bool | None

DEFAULT_QUARANTINE_REASON: Final = "quarantined by hook"
DISCONNECT_ENHANCED: Final = "4.7.0"
DISCONNECT_MESSAGE: Final = "closing connection"
_DEFAULT_TEXT: Final = {"4": "Try again later", "5": "Rejected"}
_ENHANCED: Final = re.compile(r"([245])\.[0-9]{1,3}\.[0-9]{1,3}")
_CONTROL: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_LINE_BREAK: Final = re.compile(r"\r\n|\r|\n")
#: The owner of the headers a hook creates, in the header model's identities.
_HOOK: Final = "hook"


class HookResponseError(ValueError):
    """A hook answer the bridge cannot act on; the text fits one log line."""


class HookReplyLike(Protocol):
    """What is read of a response's ``response`` object."""

    @property
    def status(self) -> int | None: ...
    @property
    def enhanced_status(self) -> str | None: ...
    @property
    def message(self) -> str | None: ...
    @property
    def disconnect(self) -> bool | None: ...


class ModificationLike(Protocol):
    """One modification: it tells the builder what it asks for."""

    def apply_to(self, builder: EditBuilder) -> None: ...


class HookResponseLike(Protocol):
    """What is read of a decoded response."""

    @property
    def action(self) -> str: ...
    @property
    def response(self) -> HookReplyLike | None: ...
    @property
    def edits(self) -> Sequence[ModificationLike]: ...


@dataclass(frozen=True, slots=True)
class HookAnswer:
    """One hook call's outcome in the milter model the session merges.

    Attributes:
        reply: the final reply for the stage.
        edits: edit packets, to be applied with Postfix's semantics at end-of-message.
        notes: fallbacks worth a log line (the hook asked for something that could not be sent
            as asked).
    """

    reply: StageReply
    edits: tuple[Edit, ...]
    notes: tuple[str, ...]


def answer_from_response(
    response: HookResponseLike, headers: Sequence[tuple[bytes, bytes]]
) -> HookAnswer:
    """The milter reply and edits for a hook's decoded response.

    Args:
        response: the decoded response.
        headers: the headers the hook was sent (``message.headers``; empty before ``data``).

    Raises:
        HookResponseError: a header modification's index is out of range or points at a header
            of another name.
    """
    notes: list[str] = []
    builder = EditBuilder(headers)
    for number, modification in enumerate(response.edits):
        try:
            modification.apply_to(builder)
        except HookResponseError as exc:
            raise HookResponseError(f"modifications[{number}]: {exc}") from None
    details = response.response
    reply: StageReply
    if details is not None and details.disconnect:
        reply = _disconnect(details, notes)
    elif response.action == "discard":
        reply = Discard()
    elif response.action == "reject":
        reply = _reject(details, notes)
    else:
        reply = Continue()
    if response.action == "quarantine":
        message = details.message if details is not None else None
        builder.quarantine(_one_line(message or "") or DEFAULT_QUARANTINE_REASON)
    return HookAnswer(reply, builder.edits(), tuple(notes))


# --- the reply ----------------------------------------------------------------------------------


def _reject(details: HookReplyLike | None, notes: list[str]) -> StageReply:
    if details is None or details.status is None:
        if details is not None and details.message:
            notes.append("reject with a message but no status: plain reject sent")
        return Reject()
    status = details.status
    if not 400 <= status <= 599:
        notes.append(f"status {status} does not fit reject: plain reject sent")
        return Reject()
    text, problem = reply_text(status, details.enhanced_status, details.message)
    if problem is not None:
        notes.append(f"{problem}: plain reject sent")
        return Reject()
    return ReplyCode(text)


def _disconnect(details: HookReplyLike, notes: list[str]) -> StageReply:
    message = details.message or DISCONNECT_MESSAGE
    tries = (
        (details.enhanced_status or DISCONNECT_ENHANCED, message),
        (DISCONNECT_ENHANCED, message),
        (DISCONNECT_ENHANCED, DISCONNECT_MESSAGE),
    )
    for number, (enhanced, text) in enumerate(tries):
        reply, problem = reply_text(421, enhanced, text)
        if problem is None:
            return ReplyCode(reply)
        if number == 0:
            notes.append(f"{problem}: disconnect sent with 421 {DISCONNECT_ENHANCED}")
    raise AssertionError("the default 421 reply is valid")


def reply_text(status: int, enhanced: str | None, message: str | None) -> tuple[bytes, str | None]:
    """SMFIR_REPLYCODE text for a hook's status, and why it cannot be used (None: it can)."""
    code = str(status)
    if enhanced is not None:
        match = _ENHANCED.fullmatch(enhanced)
        if match is None:
            return b"", f"enhanced status {enhanced[:20]!r} is malformed"
        if match.group(1) != code[0]:
            return b"", f"enhanced status {enhanced} does not fit status {status}"
    lines = [
        _CONTROL.sub(" ", line).replace("%", "%%") for line in _LINE_BREAK.split(message or "")
    ]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        lines = [_DEFAULT_TEXT.get(code[0], "")]
    if enhanced is None and any(line[:1].isdigit() for line in lines):
        enhanced = f"{code[0]}.0.0"
    out = []
    for number, line in enumerate(lines, 1):
        separator = " " if number == len(lines) else "-"
        out.append(code + separator + " ".join(part for part in (enhanced, line) if part))
    text = "\r\n".join(out).encode()
    problem = reply_code_problem(text)
    return text, None if problem is None else f"reply text refused: {problem}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- the edits ----------------------------------------------------------------------------------


def bracketed(address: str) -> bytes:
    """An envelope address as the MTA spells it: in angle brackets."""
    address = address.strip()
    if not (address.startswith("<") and address.endswith(">")):
        address = f"<{address}>"
    return address.encode()


def esmtp_args(parameters: Mapping[str, ParameterValue] | None) -> bytes | None:
    """ESMTP arguments for a milter packet, or None when there are none."""
    words: list[str] = []
    for key, value in (parameters or {}).items():
        if value is True:
            words.append(key.upper())
        elif value is not None and value is not False:
            words.append(f"{key.upper()}={value}")
    return " ".join(words).encode() if words else None


class EditBuilder:
    """Collects a response's modifications; ``edits()`` gives the packets.

    The header list is kept as engine/headers.py's identity model (original headers keep their
    identity, new ones are the hook's), with Postfix's hidden Received at position 0, so the
    script comes from ``header_script``: the same code that merges several milters' edits.
    """

    def __init__(self, headers: Sequence[tuple[bytes, bytes]]) -> None:
        self._original = (HIDDEN_RECEIVED, *(HeaderField(n, v) for n, v in headers))
        self._model = tag_original(self._original)
        self._created = 0
        self._headers_edited = False
        self._body: bytes | None = None
        self._sender: ChangeFrom | None = None
        self._recipients: list[Edit] = []
        self._quarantine: list[Quarantine] = []

    def edits(self) -> tuple[Edit, ...]:
        script: list[Edit] = []
        if self._body is not None:
            script.extend(body_chunks(self._body))
        if self._headers_edited:
            script.extend(header_script(self._original, self._model))
        if self._sender is not None:
            script.append(self._sender)
        script.extend(self._recipients)
        script.extend(self._quarantine)
        return tuple(script)

    # envelope and body

    def change_from(self, address: str, parameters: Mapping[str, ParameterValue] | None) -> None:
        self._sender = ChangeFrom(bracketed(address), esmtp_args(parameters))

    def add_rcpt(self, address: str, parameters: Mapping[str, ParameterValue] | None) -> None:
        args = esmtp_args(parameters)
        packet = (
            AddRcpt(bracketed(address)) if args is None else AddRcptPar(bracketed(address), args)
        )
        self._recipients.append(packet)

    def delete_rcpt(self, address: str) -> None:
        self._recipients.append(DelRcpt(bracketed(address)))

    def replace_contents(self, body: str) -> None:
        self._body = body.encode()

    def quarantine(self, reason: str) -> None:
        self._quarantine.append(Quarantine(reason.encode()))

    # headers: ``index`` is a position in the visible list, i.e. model position index + 1

    def add_header(self, name: str, value: str) -> None:
        self._model.append(self._new(name, value))
        self._headers_edited = True

    def insert_header(self, index: int, name: str, value: str) -> None:
        if index > len(self._model) - 1:
            raise HookResponseError(
                f"insertHeader index {index} is past the end ({len(self._model) - 1} headers)"
            )
        self._model.insert(index + 1, self._new(name, value))
        self._headers_edited = True

    def change_header(self, index: int, name: str, value: str) -> None:
        target = self._target("changeHeader", index, name)
        field = HeaderField(name.encode(), value.encode())
        if not value and target.id.owner is None:
            # CHGHEADER with an empty value deletes: the emptied header must be a new one.
            self._model[index + 1] = self._new(name, value)
        else:
            self._model[index + 1] = ModelHeader(target.id, field)
        self._headers_edited = True

    def delete_header(self, index: int, name: str) -> None:
        self._target("deleteHeader", index, name)
        del self._model[index + 1]
        self._headers_edited = True

    def _target(self, what: str, index: int, name: str) -> ModelHeader:
        count = len(self._model) - 1
        if index >= count:
            raise HookResponseError(f"{what} index {index} is out of range ({count} headers)")
        target = self._model[index + 1]
        if target.field.name.lower() != name.encode().lower():
            found = target.field.name.decode("utf-8", errors="replace")[:60]
            raise HookResponseError(f"{what} index {index} is header {found!r}, not {name[:60]!r}")
        return target

    def _new(self, name: str, value: str) -> ModelHeader:
        header = ModelHeader(
            HeaderId(_HOOK, self._created), HeaderField(name.encode(), value.encode())
        )
        self._created += 1
        return header


__all__ = [
    "DEFAULT_QUARANTINE_REASON",
    "EditBuilder",
    "HookAnswer",
    "HookReplyLike",
    "HookResponseError",
    "HookResponseLike",
    "ModificationLike",
    "ParameterValue",
    "answer_from_response",
    "bracketed",
    "esmtp_args",
    "reply_text",
]
