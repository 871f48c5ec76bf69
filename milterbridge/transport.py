"""Moves milter packets over a trio stream: the only code between the codec and a socket.

Both sides use it (the MTA-facing session and the upstream milter client), so the socket rules of
design §4 live here once: TCP_NODELAY on every TCP socket, every batch of packets owed to a peer
in one write, and TCP_QUICKACK re-armed after every receive. The last one matters on both sides:
stock libmilter filters write an end-of-message edit and the final reply separately with Nagle
on, and the MTAs write a macro packet and its command separately (Postfix leaves Nagle on for
its milter sockets too): without a quick ACK from our side, the peer's second write waits for
our delayed ACK (about 40 ms on Linux). Measured: dropping it on the MTA side took a message
through Postfix at one session from about 7 to about 33 ms.

**The direct socket path.** On a plain socket, a receive or send first tries the system call
itself and goes through trio only when it would block (or every ``_FAIR_TURNS`` calls, to let
other tasks run). trio's own ``SocketStream`` methods yield to the scheduler twice on every call,
even when the kernel had the bytes ready: with about 80 receives and 80 sends per message that
machinery was the largest single cost in the bridge's profile (benchmarks/README.md). The path
uses the stdlib socket inside trio's socket object (``_sock``, not public API; checked at
construction, and without it the stream is used as before), and translates OS errors the way
trio's stream does, so callers see the same ``BrokenResourceError``/``ClosedResourceError``.
"""

from __future__ import annotations

import errno
import socket

import trio

from .milter import NEED_DATA, Connection, Event, Message

#: Bytes asked of the kernel per receive: one full body chunk and its header.
READ_SIZE = 65536 + 16

_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)

#: Calls of the direct path between two checkpoints: a session whose peers always have bytes
#: ready must still let the other sessions (and its own cancellation) in now and then.
_FAIR_TURNS = 16

#: Errors that mean our own end is already closed (trio's stream says ClosedResourceError).
_CLOSED_ERRNOS = {errno.EBADF, errno.ENOTSOCK}


def _tcp_socket(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream) and stream.socket.family in (
        socket.AF_INET,
        socket.AF_INET6,
    ):
        return stream.socket
    return None


def _stdlib_socket(stream: trio.abc.Stream) -> socket.socket | None:
    """The stdlib socket under a plain trio SocketStream (TLS and test streams have none)."""
    if not isinstance(stream, trio.SocketStream):
        return None
    raw = getattr(stream.socket, "_sock", None)
    return raw if isinstance(raw, socket.socket) else None


def set_nodelay(stream: trio.abc.Stream) -> None:
    """Turn Nagle off (trio does this for its SocketStreams; we say it rather than rely on it)."""
    sock = _tcp_socket(stream)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _stream_error(exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    if exc.errno in _CLOSED_ERRNOS:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


class MilterStream:
    """A Connection bound to a stream: ``receive()`` one packet, ``send()`` a batch at once."""

    def __init__(self, stream: trio.abc.Stream, connection: Connection) -> None:
        self.stream = stream
        self.connection = connection
        self._raw = _stdlib_socket(stream)
        tcp = _tcp_socket(stream)
        # Re-armed after every receive: through the stdlib socket when there is one (trio's
        # wrapper around setsockopt showed in the profile), else trio's (under TLS).
        self._quickack: socket.socket | trio.socket.SocketType | None = None
        if tcp is not None and _QUICKACK is not None:
            self._quickack = self._raw if self._raw is not None else tcp
        self._turns = 0
        set_nodelay(stream)

    async def receive(self) -> Event:
        """The next packet, or CLOSED. Raises RemoteProtocolError and trio's stream errors."""
        connection = self.connection
        while True:
            event = connection.next_event()
            if event is not NEED_DATA:
                return event
            data = await self.receive_some()
            if self._quickack is not None and data:
                self._quickack.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)  # type: ignore[arg-type]
            connection.receive_data(data)

    async def receive_some(self) -> bytes | bytearray:
        """Up to READ_SIZE bytes (b"" at end of stream), by the direct path where there is one."""
        raw = self._raw
        if raw is None:
            return await self.stream.receive_some(READ_SIZE)
        await self._take_turn()
        while True:
            try:
                return raw.recv(READ_SIZE)
            except BlockingIOError:
                self._turns = 0
                await trio.lowlevel.wait_readable(raw)
            except OSError as exc:
                raise _stream_error(exc) from exc

    def receive_ready(self) -> bytes | None:
        """Bytes the kernel already holds (b"" for end of stream), or None if there are none --
        without blocking and without yielding. Only for plain sockets; elsewhere None."""
        raw = self._raw
        if raw is None:
            return None
        try:
            return raw.recv(READ_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise _stream_error(exc) from exc

    async def send(self, *messages: Message) -> None:
        """Encode and write the packets in one send, so Nagle and delayed ACK never split them."""
        data = self.connection.send_many(messages)
        raw = self._raw
        if raw is None:
            await self.stream.send_all(data)
            return
        await self._take_turn()
        try:
            sent = raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise _stream_error(exc) from exc
        if sent < len(data):  # the kernel's buffer is full: let trio wait for room
            self._turns = 0
            await self.stream.send_all(memoryview(data)[sent:])

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def _take_turn(self) -> None:
        """A checkpoint every _FAIR_TURNS direct calls. (A closed socket needs no check here:
        the system call on it fails with EBADF, which reads as ClosedResourceError.)"""
        self._turns += 1
        if self._turns >= _FAIR_TURNS:
            self._turns = 0
            await trio.lowlevel.checkpoint()
