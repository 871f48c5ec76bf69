"""MilterStream's direct socket path: same results and errors as trio's stream, fewer yields."""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.testing

from milterbridge.milter import (
    CLOSED,
    Connect,
    Connection,
    Continue,
    Family,
    OptNeg,
    Protocol,
    Role,
    answer_offer,
)
from milterbridge.milter.constants import ALL_ACTIONS, ALL_PROTOCOL
from milterbridge.transport import MilterStream


async def _tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listener.accept()
    await listener.aclose()
    return client, server


async def _negotiated_pair() -> tuple[MilterStream, MilterStream]:
    """An MTA end and a filter end past OPTNEG, over real loopback TCP."""
    client, server = await _tcp_pair()
    mta = MilterStream(client, Connection(Role.MTA))
    filt = MilterStream(server, Connection(Role.FILTER))
    await mta.send(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
    offer = await filt.receive()
    assert isinstance(offer, OptNeg)
    await filt.send(answer_offer(offer, actions=ALL_ACTIONS, protocol=Protocol.NONE))
    await mta.receive()
    return mta, filt


async def test_plain_sockets_take_the_direct_path_and_memory_streams_do_not() -> None:
    mta, filt = await _negotiated_pair()
    assert mta._raw is not None and filt._raw is not None
    left, _ = trio.testing.memory_stream_pair()
    assert MilterStream(left, Connection(Role.MTA))._raw is None
    await mta.aclose()
    await filt.aclose()


async def test_packets_round_trip_and_a_close_reads_as_closed() -> None:
    mta, filt = await _negotiated_pair()
    connect = Connect(b"client.test", Family.INET, 25, b"192.0.2.1")
    await mta.send(connect)
    assert await filt.receive() == connect
    await filt.send(Continue())
    assert await mta.receive() == Continue()
    await mta.aclose()
    assert await filt.receive() is CLOSED
    await filt.aclose()


async def test_a_send_larger_than_the_kernel_buffer_completes() -> None:
    """The kernel takes part of the packet; trio writes the rest once there is room."""
    client, server = await _tcp_pair()
    client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    mta = MilterStream(client, Connection(Role.MTA))
    filt = MilterStream(server, Connection(Role.FILTER))
    hostname = b"h" * 60000
    async with trio.open_nursery() as nursery:

        async def negotiate_and_read() -> None:
            offer = await filt.receive()
            assert isinstance(offer, OptNeg)
            await filt.send(answer_offer(offer, actions=ALL_ACTIONS, protocol=Protocol.NONE))
            connect = await filt.receive()
            assert isinstance(connect, Connect) and connect.hostname == hostname

        nursery.start_soon(negotiate_and_read)
        await mta.send(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
        await mta.receive()
        with trio.fail_after(30):
            await mta.send(Connect(hostname, Family.INET, 25, b"192.0.2.1"))
    await mta.aclose()
    await filt.aclose()


async def test_errors_are_trio_stream_errors() -> None:
    mta, filt = await _negotiated_pair()
    # The peer resets the connection (SO_LINGER 0 sends RST at close): BrokenResourceError.
    assert mta._raw is not None
    mta._raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await mta.aclose()
    with pytest.raises(trio.BrokenResourceError):
        await filt.receive()
    # Our own end closed: ClosedResourceError, as trio's stream says it.
    await filt.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await filt.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        filt.receive_ready()


async def test_a_peer_that_always_has_bytes_ready_does_not_starve_other_tasks() -> None:
    """Without the periodic checkpoint, the loop below would never let ``other`` run."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    writer = socket.create_connection(("127.0.0.1", port))  # blocking: writes never yield
    server = await listener.accept()
    reader = MilterStream(server, Connection(Role.FILTER))
    turns_of_the_other_task = 0

    async def other() -> None:
        nonlocal turns_of_the_other_task
        while True:
            turns_of_the_other_task += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        for _ in range(48):  # three times _FAIR_TURNS
            writer.sendall(b"z")
            while not reader.receive_ready():  # wait, without yielding, until it has arrived
                pass
            writer.sendall(b"z")
            assert await reader.receive_some() == b"z"
        nursery.cancel_scope.cancel()
    assert turns_of_the_other_task >= 2
    writer.close()
    await server.aclose()
    await listener.aclose()
