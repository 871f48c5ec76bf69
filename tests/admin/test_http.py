"""The HTTP server under the admin endpoints: keep-alive, limits, timeouts, handler bugs.

Raw sockets where the behaviour is below what an HTTP client shows (a connection kept or closed,
a malformed request line); httpx where it is not.
"""

from __future__ import annotations

import ssl

import httpx
import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from milterbridge.admin.http import (
    IDLE_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_REQUEST_BODY,
    Request,
    Response,
    serve_http,
    text_response,
)

#: Built once: httpx would load the CA bundle for every client (plain HTTP needs none).
TLS = ssl.create_default_context()


async def echo(request: Request) -> Response:
    if request.path == "/boom":
        raise RuntimeError("a bug in an endpoint")
    return text_response(200, f"{request.method} {request.path} {len(request.body)}")


async def start(nursery: trio.Nursery) -> tuple[str, int]:
    address = await nursery.start(serve_http, "127.0.0.1", 0, echo)
    host, _, port = address.rpartition(":")
    return host, int(port)


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes; our end is closed too."""
    data = b""
    async with stream:
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def read_response(stream: trio.SocketStream) -> bytes:
    """One response with a body ending in a newline (every text_response's does)."""
    data = b""
    while not (data.endswith(b"\n") and b"\r\n\r\n" in data and not data.endswith(b"\r\n\r\n")):
        chunk = await stream.receive_some(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


async def test_keep_alive_serves_several_requests_on_one_connection(
    nursery: trio.Nursery,
) -> None:
    """Two requests on one connection get two answers, and the connection stays open."""
    with trio.fail_after(10):
        async with await trio.open_tcp_stream(*await start(nursery)) as stream:
            for path in (b"/a", b"/b"):
                await stream.send_all(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                response = await read_response(stream)
                assert response.startswith(b"HTTP/1.1 200 OK\r\n")
                assert response.endswith(b"GET " + path + b" 0\n")


async def test_connection_close_is_honoured(nursery: trio.Nursery) -> None:
    """A client asking for Connection: close gets its answer, then the close."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*await start(nursery))
        await stream.send_all(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        response = await read_until_closed(stream)
        assert response.startswith(b"HTTP/1.1 200 OK\r\n")
        assert response.endswith(b"GET /a 0\n")


async def test_garbage_gets_400_and_a_close(nursery: trio.Nursery) -> None:
    """A request line that is not HTTP is answered 400 and the connection closed."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*await start(nursery))
        await stream.send_all(b"HELO mail.example\r\n\r\n")
        response = await read_until_closed(stream)
        assert response.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert b"connection: close" in response.lower()


async def test_oversized_head_is_refused(nursery: trio.Nursery) -> None:
    """Headers beyond the head limit are refused with a 4xx and a close, never buffered on."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*await start(nursery))
        await stream.send_all(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        response = await read_until_closed(stream)
        assert response.startswith(b"HTTP/1.1 4")


async def test_body_over_the_limit_is_413(nursery: trio.Nursery) -> None:
    """A body larger than MAX_REQUEST_BODY is refused; one within it is read whole."""
    host, port = await start(nursery)
    with trio.fail_after(10):
        async with httpx.AsyncClient(verify=TLS, base_url=f"http://{host}:{port}") as http:
            small = await http.post("/x", content=b"b" * MAX_REQUEST_BODY)
            assert small.text == f"POST /x {MAX_REQUEST_BODY}\n"
            big = await http.post("/x", content=b"b" * (MAX_REQUEST_BODY + 1))
            assert big.status_code == 413


async def test_a_failing_handler_is_500_and_the_server_lives_on(nursery: trio.Nursery) -> None:
    """A bug in an endpoint is logged with its traceback and answered 500; nothing else stops."""
    host, port = await start(nursery)
    with trio.fail_after(10), capture_logs() as logs:
        async with httpx.AsyncClient(verify=TLS, base_url=f"http://{host}:{port}") as http:
            assert (await http.get("/boom")).status_code == 500
            assert (await http.get("/fine")).status_code == 200
    (failed,) = [line for line in logs if line["event"] == "admin_handler_failed"]
    assert failed["log_level"] == "error"
    assert failed["path"] == "/boom"
    assert failed["exc_info"] is True


async def test_idle_connection_is_closed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A connection that sends nothing is closed after IDLE_TIMEOUT, not held for ever."""
    stream = await trio.open_tcp_stream(*await start(nursery))
    with trio.fail_after(IDLE_TIMEOUT + 5):
        assert await read_until_closed(stream) == b""
    assert trio.current_time() >= IDLE_TIMEOUT


async def test_connections_beyond_the_limit_are_closed_at_once(nursery: trio.Nursery) -> None:
    """With MAX_CONNECTIONS open, the next connection is closed without an answer."""
    address = await start(nursery)
    streams: list[trio.SocketStream] = []
    try:
        with trio.fail_after(20):
            for _ in range(MAX_CONNECTIONS):
                streams.append(stream := await trio.open_tcp_stream(*address))
                # An answer proves its handler holds a slot (kept: the connection stays open).
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                await read_response(stream)
            extra = await trio.open_tcp_stream(*address)
            await extra.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await read_until_closed(extra) == b""
            await streams.pop().aclose()
            # The freed slot serves again (the server sees the close a moment later).
            while True:
                again = await trio.open_tcp_stream(*address)
                await again.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if response := await read_until_closed(again):
                    assert response.startswith(b"HTTP/1.1 200 OK")
                    break
                await trio.testing.wait_all_tasks_blocked()
    finally:
        for stream in streams:
            await stream.aclose()


@pytest.mark.parametrize("family_host", ["localhost"])
async def test_a_host_name_binds_every_address_it_resolves_to(
    nursery: trio.Nursery, family_host: str
) -> None:
    """A name is served on its addresses; the first is reported."""
    address = await nursery.start(serve_http, family_host, 0, echo)
    assert address.rpartition(":")[0] in ("127.0.0.1", "[::1]")
