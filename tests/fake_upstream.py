"""A scripted fake upstream milter on a loopback port, for fault injection (tests only).

Each connection runs a script against a ``Peer``: a FILTER-role codec for what a filter may
legally send, and raw writes for everything it must not.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from milterbridge.milter import (
    ALL_ACTIONS,
    NEED_DATA,
    Connection,
    Message,
    OptNeg,
    Protocol,
    Role,
    answer_offer,
)


class Peer:
    """The fake upstream's end of one connection: a FILTER-role codec to read commands, and raw
    writes for everything a real filter must not send."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.codec = Connection(Role.FILTER)

    async def receive(self) -> Message:
        while True:
            event = self.codec.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, Message), event
                return event
            self.codec.receive_data(await self.stream.receive_some(65536))

    async def expect(self, kind: type[Message]) -> Message:
        message = await self.receive()
        assert isinstance(message, kind), message
        return message

    async def reply(self, *replies: Message) -> None:
        """Legal replies, validated by the codec."""
        await self.stream.send_all(self.codec.send_many(replies))

    async def raw(self, data: bytes) -> None:
        """Bytes no codec would let us send."""
        await self.stream.send_all(data)

    async def negotiate(self, protocol: Protocol = Protocol.NONE) -> None:
        offer = await self.expect(OptNeg)
        assert isinstance(offer, OptNeg)
        await self.reply(answer_offer(offer, actions=ALL_ACTIONS, protocol=protocol))

    async def wait_eof(self) -> None:
        """Read until the client closes (whatever it still sends is dropped)."""
        while await self.stream.receive_some(65536):
            pass


Script = Callable[[Peer], Awaitable[None]]


@dataclass
class FakeUpstream:
    """A listener whose every connection runs ``script``, then waits for the client's close."""

    port: int
    finished: trio.Event = field(default_factory=trio.Event)
    saw_eof: bool = False

    async def wait_finished(self) -> None:
        with trio.fail_after(1):
            await self.finished.wait()


async def handle(fake: FakeUpstream, script: Script, stream: trio.abc.Stream) -> None:
    peer = Peer(stream)
    try:
        await script(peer)
        await peer.wait_eof()
        fake.saw_eof = True
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        fake.saw_eof = True  # the client reset or we closed ourselves: either way it is gone
    finally:
        fake.finished.set()


@asynccontextmanager
async def fake_upstream(
    script: Script, wrap: Callable[[trio.SocketStream], trio.abc.Stream] | None = None
) -> AsyncIterator[FakeUpstream]:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    fake = FakeUpstream(port=listener.socket.getsockname()[1])

    async def on_connection(stream: trio.SocketStream) -> None:
        await handle(fake, script, wrap(stream) if wrap is not None else stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, on_connection, [listener])
        try:
            yield fake
        finally:
            nursery.cancel_scope.cancel()
