"""Moves milter packets over a trio stream: the only code between the codec and a socket.

Both sides use it (the MTA-facing session and the upstream milter client), so the socket rules of
design §4 live here once: TCP_NODELAY on every TCP socket, every batch of packets owed to a peer
in one write, and TCP_QUICKACK re-armed after every receive. The last one matters because stock
libmilter filters write an end-of-message edit and the final reply separately with Nagle on, and
Sendmail writes each macro packet apart from its command: without a quick ACK from our side, the
peer's second write waits for our delayed ACK (about 40 ms on Linux).
"""

from __future__ import annotations

import socket

import trio

from .milter import NEED_DATA, Connection, Event, Message

#: Bytes asked of the kernel per receive: one full body chunk and its header.
READ_SIZE = 65536 + 16

_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def _tcp_socket(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream) and stream.socket.family in (
        socket.AF_INET,
        socket.AF_INET6,
    ):
        return stream.socket
    return None


def set_nodelay(stream: trio.abc.Stream) -> None:
    """Turn Nagle off (trio does this for its SocketStreams; we say it rather than rely on it)."""
    sock = _tcp_socket(stream)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MilterStream:
    """A Connection bound to a stream: ``receive()`` one packet, ``send()`` a batch at once."""

    def __init__(self, stream: trio.abc.Stream, connection: Connection) -> None:
        self.stream = stream
        self.connection = connection
        self._tcp = _tcp_socket(stream)
        set_nodelay(stream)

    async def receive(self) -> Event:
        """The next packet, or CLOSED. Raises RemoteProtocolError and trio's stream errors."""
        connection = self.connection
        while True:
            event = connection.next_event()
            if event is not NEED_DATA:
                return event
            data = await self.stream.receive_some(READ_SIZE)
            if self._tcp is not None and _QUICKACK is not None and data:
                self._tcp.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            connection.receive_data(data)

    async def send(self, *messages: Message) -> None:
        """Encode and write the packets in one send, so Nagle and delayed ACK never split them."""
        await self.stream.send_all(self.connection.send_many(messages))

    async def aclose(self) -> None:
        await self.stream.aclose()
