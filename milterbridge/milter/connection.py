"""The sans-I/O milter connection, for either role.

Usage is h11's: feed bytes from the socket with ``receive_data`` (``b""`` means the peer closed),
take decoded packets out with ``next_event`` until it returns NEED_DATA, and turn packets into
bytes with ``send``/``send_many``. Nothing here does I/O, reads a clock or logs.

``Role.FILTER`` is the filter's side (we receive commands, send replies: towards Postfix);
``Role.MTA`` is the MTA's side (we send commands, receive replies: towards upstream milters).
Both sides validate the same Conversation; a problem in what we send raises LocalProtocolError,
a problem in what we receive raises RemoteProtocolError, and either leaves the connection in a
permanent error state in which every later call raises again.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from .buffer import FrameBuffer
from .constants import DEFAULT_MAX_PACKET
from .errors import ErrorKind, LocalProtocolError, ProtocolError, RemoteProtocolError
from .messages import COMMANDS, REPLIES, Command, Message, Reply
from .negotiation import Negotiated
from .state import Conversation, Phase


class Role(enum.Enum):
    MTA = "mta"
    FILTER = "filter"


class Signal(enum.Enum):
    """What next_event returns when it has no packet."""

    NEED_DATA = "need data"  # feed more bytes
    CLOSED = "closed"  # the peer closed the stream where that is allowed


NEED_DATA = Signal.NEED_DATA
CLOSED = Signal.CLOSED

Event = Message | Signal


class Connection:
    """One milter connection's protocol state, seen from ``our_role``."""

    def __init__(self, our_role: Role, *, max_packet: int = DEFAULT_MAX_PACKET) -> None:
        """Args:
        our_role: the side we play.
        max_packet: largest length word accepted from the peer (design §12, maxResponseSize).
        """
        self.our_role = our_role
        self._buffer = FrameBuffer(max_packet)
        self._conversation = Conversation()
        self._incoming = REPLIES if our_role is Role.MTA else COMMANDS
        self._eof = False
        self._error: ProtocolError | None = None

    # --- state ------------------------------------------------------------------------

    @property
    def negotiated(self) -> Negotiated | None:
        """The agreed options, once the OPTNEG exchange is complete."""
        return self._conversation.negotiated

    @property
    def awaiting(self) -> type[Command] | None:
        """The command whose final reply is outstanding, or None when it is the MTA's turn."""
        return self._conversation.awaiting

    @property
    def conversation(self) -> Conversation:
        return self._conversation

    @property
    def closed(self) -> bool:
        return self._conversation.phase is Phase.CLOSED

    @property
    def error(self) -> ProtocolError | None:
        return self._error

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as packets."""
        return len(self._buffer)

    # --- receiving --------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes from the peer; ``b""`` means it closed its side."""
        if self._eof:
            if data:
                raise RuntimeError("receive_data after EOF")
            return
        if data:
            self._buffer.feed(data)
        else:
            self._eof = True

    def next_event(self) -> Event:
        """The next packet from the peer, NEED_DATA, or CLOSED.

        Raises:
            RemoteProtocolError: the peer broke the protocol (also for a close mid-packet or,
                for the MTA role, while a reply is outstanding).
        """
        self._check_usable()
        try:
            frame = self._buffer.maybe_extract()
            if frame is None:
                return self._on_no_frame()
            message = self._decode(*frame)
            self._apply(message)
        except LocalProtocolError as exc:
            remote = exc.to_remote()
            self._error = remote
            raise remote from None
        return message

    def _on_no_frame(self) -> Event:
        if not self._eof:
            return NEED_DATA
        if len(self._buffer):
            raise LocalProtocolError(
                f"peer closed in the middle of a packet ({len(self._buffer)} bytes buffered)",
                ErrorKind.TRUNCATED,
            )
        awaiting = self._conversation.awaiting
        if self.our_role is Role.MTA and awaiting is not None and not self.closed:
            raise LocalProtocolError(
                f"filter closed the connection without answering {awaiting.__name__}",
                ErrorKind.TRUNCATED,
            )
        self._conversation.phase = Phase.CLOSED
        return CLOSED

    def _decode(self, code: bytes, payload: bytes) -> Message:
        cls = self._incoming.get(code)
        if cls is None:
            raise LocalProtocolError(f"unknown command letter {code!r}", ErrorKind.MALFORMED)
        return cls.from_payload(payload)

    # --- sending ----------------------------------------------------------------------

    def send(self, message: Message) -> bytes:
        """Validate and encode one packet we send.

        Raises:
            LocalProtocolError: the packet is illegal now; the connection is then unusable.
        """
        self._check_usable()
        expected = Command if self.our_role is Role.MTA else Reply
        try:
            if not isinstance(message, expected):
                raise LocalProtocolError(
                    f"the {self.our_role.value} side cannot send {type(message).__name__}"
                )
            frame = message.frame()
            self._apply(message)
        except LocalProtocolError as exc:
            self._error = exc
            raise
        return frame

    def send_many(self, messages: Iterable[Message]) -> bytes:
        """Encode several packets for one write (a macro and its command, edits and a reply)."""
        return b"".join([self.send(m) for m in messages])

    def _apply(self, message: Message) -> None:
        if isinstance(message, Command):
            self._conversation.command(message)
        else:
            assert isinstance(message, Reply)
            self._conversation.reply(message)

    def _check_usable(self) -> None:
        if self._error is not None:
            raise type(self._error)(
                f"connection is in error state after: {self._error}", self._error.kind
            )


__all__ = ["CLOSED", "NEED_DATA", "Connection", "Event", "RemoteProtocolError", "Role", "Signal"]
