"""One frozen value type per milter packet, with its exact encoding.

Each class names the packet after what it means (``Helo``, ``ChangeHeader``) and keeps libmilter's
constant in its docstring. ``payload()`` encodes the bytes after the command letter;
``from_payload()`` decodes them and raises LocalProtocolError(MALFORMED) on anything that does
not follow the encoding (the Connection turns that into a RemoteProtocolError). Strings are bytes
throughout: addresses, macro values and header values may be 8-bit, and the protocol never
declares a charset (protocol notes §1.4).

Encodings: ``str`` = bytes + one NUL; integers are big-endian; body chunks are raw.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from .constants import Action, Family, MacroStage, Protocol
from .errors import ErrorKind, LocalProtocolError

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_OPTNEG = struct.Struct(">III")
_FRAME_HEAD = struct.Struct(">Ic")


def _malformed(cls: type, problem: str) -> LocalProtocolError:
    return LocalProtocolError(f"malformed {cls.__name__} packet: {problem}", ErrorKind.MALFORMED)


def _cstr(value: bytes, field: str) -> bytes:
    """Encode one NUL-terminated string, refusing an embedded NUL that would shift every field."""
    if b"\0" in value:
        raise LocalProtocolError(f"{field} contains a NUL byte")
    return value + b"\0"


def _strings(cls: type, payload: bytes) -> list[bytes]:
    """Split a payload made only of NUL-terminated strings."""
    if not payload.endswith(b"\0"):
        raise _malformed(cls, "string not NUL-terminated")
    return payload[:-1].split(b"\0")


def _exact_strings(cls: type, payload: bytes, count: int) -> list[bytes]:
    parts = _strings(cls, payload)
    if len(parts) != count:
        raise _malformed(cls, f"expected {count} string(s), got {len(parts)}")
    return parts


def _no_payload(cls: type, payload: bytes) -> None:
    # Postfix treats trailing bytes on a payload-less reply as a protocol error (milter8.c).
    if payload:
        raise _malformed(cls, f"unexpected {len(payload)}-byte payload")


def _optional_args(cls: type, payload: bytes) -> tuple[bytes, bytes | None]:
    """``str first [, str args]`` as in SMFIR_CHGFROM and SMFIR_ADDRCPT_PAR."""
    parts = _strings(cls, payload)
    if len(parts) == 1:
        return parts[0], None
    if len(parts) == 2:
        return parts[0], parts[1]
    raise _malformed(cls, f"expected 1 or 2 strings, got {len(parts)}")


def _index_name_value(cls: type, payload: bytes) -> tuple[int, bytes, bytes]:
    if len(payload) < 4:
        raise _malformed(cls, "shorter than its 4-byte index")
    (index,) = _U32.unpack_from(payload)
    name, value = _exact_strings(cls, payload[4:], 2)
    return index, name, value


class Message:
    """A packet. ``code`` is its command letter; subclasses are frozen dataclasses."""

    __slots__ = ()
    code: ClassVar[bytes]

    def payload(self) -> bytes:
        return b""

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        _no_payload(cls, payload)
        return cls()

    def frame(self) -> bytes:
        """The packet as it goes on the wire: length word, command letter, payload."""
        body = self.payload()
        return _FRAME_HEAD.pack(len(body) + 1, self.code) + body


class Command(Message):
    """A packet the MTA sends to the filter (SMFIC_*)."""

    __slots__ = ()


class Reply(Message):
    """A packet the filter sends to the MTA (SMFIR_*)."""

    __slots__ = ()


# --- MTA -> filter -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OptNeg(Command):
    """SMFIC_OPTNEG: the MTA's offer: highest version, permitted actions, protocol abilities."""

    code: ClassVar[bytes] = b"O"
    version: int
    actions: Action
    protocol: Protocol

    def payload(self) -> bytes:
        return _OPTNEG.pack(self.version, self.actions, self.protocol)

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        if len(payload) != 12:
            raise _malformed(cls, f"payload is {len(payload)} bytes, not 12")
        version, actions, protocol = _OPTNEG.unpack(payload)
        return cls(version, Action(actions), Protocol(protocol))


@dataclass(frozen=True, slots=True)
class Macro(Command):
    """SMFIC_MACRO: name/value pairs for the command letter that follows; never answered.

    The pairs keep the MTA's order and spelling (``j``, ``{daemon_name}``); an empty list is legal
    (Postfix sends one for every event whose macro list resolves to nothing).
    """

    code: ClassVar[bytes] = b"D"
    command: bytes
    macros: tuple[tuple[bytes, bytes], ...] = ()

    def payload(self) -> bytes:
        if len(self.command) != 1:
            raise LocalProtocolError("a macro packet names exactly one command letter")
        return self.command + b"".join(
            _cstr(name, "macro name") + _cstr(value, "macro value") for name, value in self.macros
        )

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        if not payload:
            raise _malformed(cls, "missing command letter")
        if len(payload) == 1:
            return cls(payload)
        parts = _strings(cls, payload[1:])
        if len(parts) % 2:
            raise _malformed(cls, "a macro name without a value")
        return cls(payload[:1], tuple(zip(parts[::2], parts[1::2], strict=True)))


@dataclass(frozen=True, slots=True)
class Connect(Command):
    """SMFIC_CONNECT: client host name, address family, and (unless UNKNOWN) port and address.

    Postfix sends the bare IPv6 text; Sendmail prefixes it with ``IPv6:``. Both are kept as sent.
    """

    code: ClassVar[bytes] = b"C"
    hostname: bytes
    family: Family = Family.UNKNOWN
    port: int = 0
    address: bytes = b""

    def payload(self) -> bytes:
        head = _cstr(self.hostname, "hostname") + self.family.value
        if self.family is Family.UNKNOWN:
            return head
        if not 0 <= self.port <= 0xFFFF:
            raise LocalProtocolError(f"port {self.port} does not fit 16 bits")
        return head + _U16.pack(self.port) + _cstr(self.address, "address")

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        end = payload.find(b"\0")
        if end < 0 or end + 2 > len(payload):
            raise _malformed(cls, "missing hostname or family")
        hostname = payload[:end]
        try:
            family = Family(payload[end + 1 : end + 2])
        except ValueError:
            raise _malformed(cls, f"unknown family {payload[end + 1 : end + 2]!r}") from None
        rest = payload[end + 2 :]
        if family is Family.UNKNOWN:
            if rest:
                raise _malformed(cls, "trailing bytes after family U")
            return cls(hostname, family)
        if len(rest) < 3:
            raise _malformed(cls, "missing port or address")
        (port,) = _U16.unpack_from(rest)
        (address,) = _exact_strings(cls, rest[2:], 1)
        return cls(hostname, family, port, address)


@dataclass(frozen=True, slots=True)
class Helo(Command):
    """SMFIC_HELO: the HELO/EHLO argument; may repeat in a connection (after STARTTLS)."""

    code: ClassVar[bytes] = b"H"
    name: bytes

    def payload(self) -> bytes:
        return _cstr(self.name, "helo name")

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        return cls(*_exact_strings(cls, payload, 1))


@dataclass(frozen=True, slots=True)
class _AddressCommand(Command):
    """MAIL and RCPT: the address as the client sent it (with ``<>``), then ESMTP arguments,
    each its own string (unlike CHGFROM/ADDRCPT_PAR, which pack them in one)."""

    address: bytes
    args: tuple[bytes, ...] = ()

    def payload(self) -> bytes:
        return _cstr(self.address, "address") + b"".join(
            _cstr(a, "ESMTP argument") for a in self.args
        )

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        address, *args = _strings(cls, payload)
        return cls(address, tuple(args))


@dataclass(frozen=True, slots=True)
class Mail(_AddressCommand):
    """SMFIC_MAIL: the envelope sender and its ESMTP arguments."""

    code: ClassVar[bytes] = b"M"


@dataclass(frozen=True, slots=True)
class Rcpt(_AddressCommand):
    """SMFIC_RCPT: one envelope recipient and its ESMTP arguments."""

    code: ClassVar[bytes] = b"R"


@dataclass(frozen=True, slots=True)
class Data(Command):
    """SMFIC_DATA (protocol >= 4): the client sent DATA (or the first BDAT)."""

    code: ClassVar[bytes] = b"T"


@dataclass(frozen=True, slots=True)
class Header(Command):
    """SMFIC_HEADER: one header; folded lines joined by LF, one leading space removed unless
    SMFIP_HDR_LEADSPC was negotiated."""

    code: ClassVar[bytes] = b"L"
    name: bytes
    value: bytes

    def payload(self) -> bytes:
        return _cstr(self.name, "header name") + _cstr(self.value, "header value")

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        return cls(*_exact_strings(cls, payload, 2))


@dataclass(frozen=True, slots=True)
class EndOfHeaders(Command):
    """SMFIC_EOH: the last header has been sent."""

    code: ClassVar[bytes] = b"N"


@dataclass(frozen=True, slots=True)
class Body(Command):
    """SMFIC_BODY: one chunk of CRLF-terminated body lines (at most CHUNK_SIZE bytes)."""

    code: ClassVar[bytes] = b"B"
    chunk: bytes

    def payload(self) -> bytes:
        return self.chunk

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        return cls(payload)


@dataclass(frozen=True, slots=True)
class EndOfMessage(Command):
    """SMFIC_BODYEOB: end of the message. Postfix and Sendmail send it empty; libmilter accepts
    a last body chunk inside it, so we do too."""

    code: ClassVar[bytes] = b"E"
    chunk: bytes = b""

    def payload(self) -> bytes:
        return self.chunk

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        return cls(payload)


@dataclass(frozen=True, slots=True)
class Abort(Command):
    """SMFIC_ABORT: forget the current message (never answered)."""

    code: ClassVar[bytes] = b"A"


@dataclass(frozen=True, slots=True)
class Unknown(Command):
    """SMFIC_UNKNOWN (protocol >= 3): an SMTP command the MTA did not recognise."""

    code: ClassVar[bytes] = b"U"
    line: bytes

    def payload(self) -> bytes:
        return _cstr(self.line, "command line")

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        return cls(*_exact_strings(cls, payload, 1))


@dataclass(frozen=True, slots=True)
class Quit(Command):
    """SMFIC_QUIT: the session is over; the filter closes (never answered)."""

    code: ClassVar[bytes] = b"Q"


@dataclass(frozen=True, slots=True)
class QuitNoClose(Command):
    """SMFIC_QUIT_NC (protocol 6): this session is over, a new CONNECT follows on the socket."""

    code: ClassVar[bytes] = b"K"


# --- filter -> MTA -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OptNegReply(Reply):
    """The filter's OPTNEG answer: chosen version, actions and protocol bits, and optionally a
    macro name list per stage (space-separated names; needs SMFIF_SETSYMLIST)."""

    code: ClassVar[bytes] = b"O"
    version: int
    actions: Action
    protocol: Protocol
    macros: tuple[tuple[MacroStage, bytes], ...] = ()

    def payload(self) -> bytes:
        lists = b"".join(
            _U32.pack(stage) + _cstr(names, "macro list") for stage, names in self.macros
        )
        return _OPTNEG.pack(self.version, self.actions, self.protocol) + lists

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        if len(payload) < 12:
            raise _malformed(cls, f"payload is {len(payload)} bytes, fewer than 12")
        version, actions, protocol = _OPTNEG.unpack_from(payload)
        macros: list[tuple[MacroStage, bytes]] = []
        pos = 12
        while pos < len(payload):
            end = payload.find(b"\0", pos + 4)
            if len(payload) - pos < 5 or end < 0:
                raise _malformed(cls, "truncated macro list")
            (stage,) = _U32.unpack_from(payload, pos)
            try:
                macros.append((MacroStage(stage), payload[pos + 4 : end]))
            except ValueError:
                raise _malformed(cls, f"unknown macro stage {stage}") from None
            pos = end + 1
        return cls(version, Action(actions), Protocol(protocol), tuple(macros))


@dataclass(frozen=True, slots=True)
class Continue(Reply):
    """SMFIR_CONTINUE: go on (at end-of-message: accept)."""

    code: ClassVar[bytes] = b"c"


@dataclass(frozen=True, slots=True)
class Accept(Reply):
    """SMFIR_ACCEPT: the filter is done: for the connection at CONNECT/HELO, else the message."""

    code: ClassVar[bytes] = b"a"


@dataclass(frozen=True, slots=True)
class Reject(Reply):
    """SMFIR_REJECT: refuse (the connection, the command, a recipient, or the message)."""

    code: ClassVar[bytes] = b"r"


@dataclass(frozen=True, slots=True)
class Tempfail(Reply):
    """SMFIR_TEMPFAIL: refuse for now (4xx)."""

    code: ClassVar[bytes] = b"t"


@dataclass(frozen=True, slots=True)
class Discard(Reply):
    """SMFIR_DISCARD: accept the message and silently drop it."""

    code: ClassVar[bytes] = b"d"


@dataclass(frozen=True, slots=True)
class ReplyCode(Reply):
    """SMFIR_REPLYCODE: a custom 4xx/5xx SMTP reply (lines joined by CRLF); see replycode.py."""

    code: ClassVar[bytes] = b"y"
    text: bytes

    def payload(self) -> bytes:
        return _cstr(self.text, "reply text")

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        return cls(*_exact_strings(cls, payload, 1))


@dataclass(frozen=True, slots=True)
class Skip(Reply):
    """SMFIR_SKIP (protocol 6, SMFIP_SKIP): send no more body chunks, go to end-of-message."""

    code: ClassVar[bytes] = b"s"


@dataclass(frozen=True, slots=True)
class Progress(Reply):
    """SMFIR_PROGRESS: still working; restarts the MTA's read timer. Not final."""

    code: ClassVar[bytes] = b"p"


@dataclass(frozen=True, slots=True)
class Shutdown(Reply):
    """SMFIR_SHUTDOWN: Postfix answers 421 and disconnects; Sendmail refuses it on the wire."""

    code: ClassVar[bytes] = b"4"


@dataclass(frozen=True, slots=True)
class ConnFail(Reply):
    """SMFIR_CONN_FAIL: defined by mfdef.h, accepted by neither MTA; decoded so we can name it."""

    code: ClassVar[bytes] = b"f"


@dataclass(frozen=True, slots=True)
class AddHeader(Reply):
    """SMFIR_ADDHEADER: append a header (needs SMFIF_ADDHDRS)."""

    code: ClassVar[bytes] = b"h"
    name: bytes
    value: bytes

    def payload(self) -> bytes:
        return _cstr(self.name, "header name") + _cstr(self.value, "header value")

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        return cls(*_exact_strings(cls, payload, 2))


@dataclass(frozen=True, slots=True)
class _IndexedHeader(Reply):
    index: int
    name: bytes
    value: bytes

    def payload(self) -> bytes:
        if not 0 <= self.index <= 0xFFFFFFFF:
            raise LocalProtocolError(f"header index {self.index} does not fit 32 bits")
        return _U32.pack(self.index) + _cstr(self.name, "header name") + _cstr(self.value, "value")

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        return cls(*_index_name_value(cls, payload))


@dataclass(frozen=True, slots=True)
class InsertHeader(_IndexedHeader):
    """SMFIR_INSHEADER: insert at a position in the whole header list, 0 = top (SMFIF_ADDHDRS).
    Postfix counts its own hidden Received header at position 0."""

    code: ClassVar[bytes] = b"i"


@dataclass(frozen=True, slots=True)
class ChangeHeader(_IndexedHeader):
    """SMFIR_CHGHEADER: change the index-th (1-based, per name) header; empty value deletes it
    (SMFIF_CHGHDRS)."""

    code: ClassVar[bytes] = b"m"


@dataclass(frozen=True, slots=True)
class AddRcpt(Reply):
    """SMFIR_ADDRCPT: add an envelope recipient (SMFIF_ADDRCPT)."""

    code: ClassVar[bytes] = b"+"
    address: bytes

    def payload(self) -> bytes:
        return _cstr(self.address, "address")

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        return cls(*_exact_strings(cls, payload, 1))


@dataclass(frozen=True, slots=True)
class DelRcpt(Reply):
    """SMFIR_DELRCPT: remove an envelope recipient, spelled as the MTA sent it (SMFIF_DELRCPT)."""

    code: ClassVar[bytes] = b"-"
    address: bytes

    def payload(self) -> bytes:
        return _cstr(self.address, "address")

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        return cls(*_exact_strings(cls, payload, 1))


@dataclass(frozen=True, slots=True)
class _AddressWithArgs(Reply):
    """``str address [, str args]``: ESMTP arguments in one space-separated string."""

    address: bytes
    args: bytes | None = None

    def payload(self) -> bytes:
        head = _cstr(self.address, "address")
        return head if self.args is None else head + _cstr(self.args, "ESMTP arguments")

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        return cls(*_optional_args(cls, payload))


@dataclass(frozen=True, slots=True)
class AddRcptPar(_AddressWithArgs):
    """SMFIR_ADDRCPT_PAR: add a recipient with ESMTP arguments (SMFIF_ADDRCPT_PAR)."""

    code: ClassVar[bytes] = b"2"


@dataclass(frozen=True, slots=True)
class ChangeFrom(_AddressWithArgs):
    """SMFIR_CHGFROM: replace the envelope sender (SMFIF_CHGFROM)."""

    code: ClassVar[bytes] = b"e"


@dataclass(frozen=True, slots=True)
class ReplaceBody(Reply):
    """SMFIR_REPLBODY: one chunk of the new body; the first chunk truncates (SMFIF_CHGBODY)."""

    code: ClassVar[bytes] = b"b"
    chunk: bytes

    def payload(self) -> bytes:
        return self.chunk

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        return cls(payload)


@dataclass(frozen=True, slots=True)
class Quarantine(Reply):
    """SMFIR_QUARANTINE: hold the message with a reason; not final (SMFIF_QUARANTINE)."""

    code: ClassVar[bytes] = b"q"
    reason: bytes

    def payload(self) -> bytes:
        return _cstr(self.reason, "reason")

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        return cls(*_exact_strings(cls, payload, 1))


COMMANDS: dict[bytes, type[Command]] = {
    cls.code: cls
    for cls in (
        OptNeg,
        Macro,
        Connect,
        Helo,
        Mail,
        Rcpt,
        Data,
        Header,
        EndOfHeaders,
        Body,
        EndOfMessage,
        Abort,
        Unknown,
        Quit,
        QuitNoClose,
    )
}

REPLIES: dict[bytes, type[Reply]] = {
    cls.code: cls
    for cls in (
        OptNegReply,
        Continue,
        Accept,
        Reject,
        Tempfail,
        Discard,
        ReplyCode,
        Skip,
        Progress,
        Shutdown,
        ConnFail,
        AddHeader,
        InsertHeader,
        ChangeHeader,
        AddRcpt,
        AddRcptPar,
        DelRcpt,
        ChangeFrom,
        ReplaceBody,
        Quarantine,
    )
}

#: Replies that end the MTA's wait for a command.
FINAL_REPLIES: tuple[type[Reply], ...] = (
    Continue,
    Accept,
    Reject,
    Tempfail,
    Discard,
    ReplyCode,
    Skip,
    Shutdown,
    ConnFail,
)

#: Replies that edit the message; legal only after EndOfMessage, before its final reply.
EDIT_REPLIES: dict[type[Reply], Action] = {
    AddHeader: Action.ADDHDRS,
    InsertHeader: Action.ADDHDRS,
    ChangeHeader: Action.CHGHDRS,
    AddRcpt: Action.ADDRCPT,
    AddRcptPar: Action.ADDRCPT_PAR,
    DelRcpt: Action.DELRCPT,
    ChangeFrom: Action.CHGFROM,
    ReplaceBody: Action.CHGBODY,
    Quarantine: Action.QUARANTINE,
}
