"""The JSON request an HTTP hook receives, built from what the MTA told the session.

The document follows the MTA Hooks reference (context, envelope, message); every key is always
present, with JSON null for what is not known (yet), so a hook never has to tell "absent" from
"null". Where the values come from (milter macros, the CONNECT/HELO/MAIL/RCPT commands) is the
field table in the README's ``[[hook]]`` section.

The message body can be 50 MB, so at the ``data`` stage the request is never one string in
memory: everything but ``message.contents`` is encoded with msgspec up front, and the body is
read from the session's spool file in 64 KiB pieces, each decoded as UTF-8 (incrementally, with
replacement characters for invalid bytes, so a character split between two reads is decoded
whole) and JSON-escaped on the way out. ``message.contents`` is the last key of the document so
the body can stream at the end.

The spool file may be read by several hooks at once (they are called in parallel) and is
written by the session, so each piece is read with an explicit seek, and the file position is
put back, with no checkpoint between the seek and the read: concurrent readers never see each
other's positions. The reads themselves are plain blocking reads, the same deliberate exception
to "all I/O through trio" that the spool makes for its writes (a page-cache read of 64 KiB costs
less than a worker-thread hand-off).
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Final

import msgspec
import trio

#: How much of the body is read, decoded and escaped at a time.
READ_SIZE: Final = 64 * 1024

#: The hook stages and their spelling in ``context.stage``.
HOOK_STAGES: Final[Mapping[str, str]] = {
    "connect": "CONNECT",
    "ehlo": "EHLO",
    "auth": "AUTH",
    "mail": "MAIL",
    "rcpt": "RCPT",
    "data": "DATA",
}

#: ``context.protocol.version``: the integer the reference implementation sends.
PROTOCOL_VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class HookInput:
    """Everything one hook call is built from; the session fills it from its own state."""

    #: "connect" | "ehlo" | "auth" | "mail" | "rcpt" | "data".
    stage: str
    #: Every macro the MTA sent so far in the connection (latest value), names without braces.
    macros: Mapping[str, str]
    #: The client address from the milter CONNECT command; None before connect.
    client_address: str | None = None
    client_port: int | None = None
    #: CONNECT's host name: Postfix sends "[1.2.3.4]" or "unknown" when there is no PTR name.
    client_hostname: str | None = None
    helo: str | None = None
    #: MAIL FROM as the MTA sent it (usually in angle brackets), and its ESMTP arguments.
    sender: tuple[bytes, Sequence[bytes]] | None = None
    #: Accepted recipients so far; at the rcpt stage the one being decided is last.
    recipients: Sequence[tuple[bytes, Sequence[bytes]]] = ()
    #: Data stage: the headers as the MTA sent them (name, value).
    headers: Sequence[tuple[bytes, bytes]] = ()
    #: Data stage: a seekable file holding the body, read from offset 0.
    body: BinaryIO | None = None
    body_size: int = 0
    #: The bridge's own count of open sessions from this client address.
    active_connections: int = 0


# --- the document -------------------------------------------------------------------------------


class _Doc(msgspec.Struct, frozen=True, rename="camel"):
    """Shared policy: camelCase keys, and None encoded as null (never left out)."""


class Sasl(_Doc, frozen=True):
    login: str | None
    method: str | None


class Client(_Doc, frozen=True):
    ip: str | None
    port: int | None
    ptr: str | None
    ehlo: str | None
    active_connections: int


class Tls(_Doc, frozen=True):
    version: str | None
    cipher: str | None
    cipher_bits: int | None
    cert_issuer: str | None
    cert_subject: str | None


class Server(_Doc, frozen=True):
    name: str | None
    port: int | None
    ip: str | None


class Queue(_Doc, frozen=True):
    id: str


class ProtocolInfo(_Doc, frozen=True):
    version: int


class Context(_Doc, frozen=True):
    stage: str
    sasl: Sasl | None
    client: Client
    tls: Tls | None
    server: Server
    queue: Queue | None
    protocol: ProtocolInfo


#: An ESMTP parameter value: text, a number (``size``), or true for a keyword without a value.
ParameterValue = str | int | bool


class Address(_Doc, frozen=True):
    address: str
    parameters: dict[str, ParameterValue] | None


class Envelope(msgspec.Struct, frozen=True):
    from_: Address | None = msgspec.field(name="from")
    to: list[Address] = msgspec.field(default_factory=list)


_encoder: Final = msgspec.json.Encoder()


def _text(value: bytes) -> str:
    return value.decode("utf-8", errors="replace")


def _number(text: str | None) -> int | None:
    if text is None or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def _ptr(request: HookInput) -> str | None:
    """CONNECT's host name is the verified PTR name unless Postfix had none ("unknown") or
    only the address literal; then Postfix's ``{client_ptr}`` macro may still hold a name."""
    name = request.client_hostname
    if name and name != "unknown" and not (name.startswith("[") and name.endswith("]")):
        return name
    return request.macros.get("client_ptr") or None


def context_of(request: HookInput) -> Context:
    """``context``, from the CONNECT and HELO commands and the macros."""
    macros = request.macros
    login = macros.get("auth_authen")
    tls_version = macros.get("tls_version")
    queue_id = macros.get("i")
    return Context(
        stage=HOOK_STAGES.get(request.stage, request.stage.upper()),
        sasl=Sasl(login, macros.get("auth_type")) if login else None,
        client=Client(
            ip=request.client_address,
            port=request.client_port,
            ptr=_ptr(request),
            ehlo=request.helo,
            active_connections=request.active_connections,
        ),
        tls=None
        if not tls_version
        else Tls(
            version=tls_version,
            cipher=macros.get("cipher"),
            cipher_bits=_number(macros.get("cipher_bits")),
            cert_issuer=macros.get("cert_issuer"),
            cert_subject=macros.get("cert_subject"),
        ),
        server=Server(
            name=macros.get("j"),
            port=_number(macros.get("daemon_port")),
            ip=macros.get("daemon_addr"),
        ),
        queue=Queue(queue_id) if queue_id else None,
        protocol=ProtocolInfo(PROTOCOL_VERSION),
    )


def parameters_of(args: Sequence[bytes]) -> dict[str, ParameterValue] | None:
    """ESMTP arguments as the reference's map: keywords lower-cased, ``KEY`` alone is true,
    ``size`` a number when it is one; None when there are none. A repeated keyword keeps its
    last value, as a map must."""
    if not args:
        return None
    parameters: dict[str, ParameterValue] = {}
    for arg in args:
        keyword, sep, value = _text(arg).partition("=")
        key = keyword.lower()
        if not sep:
            parameters[key] = True
        elif key == "size" and (size := _number(value)) is not None:
            parameters[key] = size
        else:
            parameters[key] = value
    return parameters


def address_of(address: bytes, args: Sequence[bytes]) -> Address:
    """One envelope address without its angle brackets, with its parameters."""
    text = _text(address.strip())
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    return Address(text, parameters_of(args))


def envelope_of(request: HookInput) -> Envelope | None:
    """``envelope``: null until the MTA has sent MAIL."""
    if request.sender is None:
        return None
    return Envelope(
        address_of(*request.sender),
        [address_of(address, args) for address, args in request.recipients],
    )


def message_size(headers: Sequence[tuple[bytes, bytes]], body_size: int) -> int:
    """The message's size as a filter would rebuild it: ``Name: value`` CRLF per header, the
    blank line, the body."""
    return sum(len(name) + 2 + len(value) + 2 for name, value in headers) + 2 + body_size


# --- encoding -----------------------------------------------------------------------------------


def _escaped(text: str) -> bytes:
    """``text`` as the inside of a JSON string (msgspec's escaping, quotes dropped)."""
    return _encoder.encode(text)[1:-1]


class HookRequestBody:
    """One request document, as bytes chunks.

    Iterable any number of times, always producing the same bytes: ``async for`` (what httpx
    streams; there is deliberately no ``__iter__``, which httpx would take for a sync body) or
    ``chunks()``. ``content_length`` is their total, which lets the request carry a
    Content-Length instead of chunked encoding (servers behind a WSGI gateway often drop a
    chunked body) at the cost of one extra pass over the body.
    """

    def __init__(self, request: HookInput) -> None:
        self._body = request.body if request.stage == "data" else None
        head = (
            b'{"context":'
            + _encoder.encode(context_of(request))
            + b',"envelope":'
            + _encoder.encode(envelope_of(request))
            + b',"message":'
        )
        if request.stage != "data":
            self._prefix = head + b"null}"
            self._suffix = b""
            return
        headers = [(_text(name), _text(value)) for name, value in request.headers]
        self._prefix = (
            head
            + b'{"headers":'
            + _encoder.encode(headers)
            + b',"serverHeaders":[],"size":'
            + _encoder.encode(message_size(request.headers, request.body_size))
            + b',"contents":"'
        )
        self._suffix = b'"}}'

    def chunks(self) -> Iterator[bytes]:
        """The document's pieces, read synchronously from the spool."""
        yield self._prefix
        if self._suffix:
            yield from self._contents()
            yield self._suffix

    def _contents(self) -> Iterator[bytes]:
        if self._body is None:
            return
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        offset = 0
        while True:
            data = _read_at(self._body, offset)
            offset += len(data)
            text = decoder.decode(data, final=not data)
            if text:
                yield _escaped(text)
            if not data:
                return

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks():
            yield chunk
            await trio.lowlevel.checkpoint()

    async def content_length(self) -> int:
        """The document's length in bytes (a pass over the body that keeps nothing)."""
        total = 0
        for chunk in self.chunks():
            total += len(chunk)
            await trio.lowlevel.checkpoint()
        return total


def _read_at(file: BinaryIO, offset: int) -> bytes:
    """One piece of the body at ``offset``, leaving the file position where it was."""
    position = file.tell()
    try:
        file.seek(offset)
        return file.read(READ_SIZE)
    finally:
        file.seek(position)


def encode_request(request: HookInput) -> bytes:
    """The whole request document at once (for tests and small calls)."""
    return b"".join(HookRequestBody(request).chunks())


__all__ = [
    "HOOK_STAGES",
    "PROTOCOL_VERSION",
    "READ_SIZE",
    "HookInput",
    "HookRequestBody",
    "context_of",
    "encode_request",
    "envelope_of",
    "message_size",
    "parameters_of",
]
