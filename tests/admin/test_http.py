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
    LINGER_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_REQUEST_BODY,
    REQUEST_TIMEOUT,
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
    """A connection that sends nothing is closed, without an answer, at REQUEST_TIMEOUT."""
    stream = await trio.open_tcp_stream(*await start(nursery))
    with trio.fail_after(REQUEST_TIMEOUT + 5):
        assert await read_until_closed(stream) == b""
    assert REQUEST_TIMEOUT <= trio.current_time() < REQUEST_TIMEOUT + 1


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


# --- what a client cannot do: hold a slot, or make the server read a large body -------------------


class Recorder:
    """A handler and a refuser that remember what reached them."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.refusals: list[tuple[str, int]] = []

    async def handle(self, request: Request) -> Response:
        self.requests.append(request)
        return text_response(200, f"{request.path} {len(request.body)} from {request.client}")

    def refuse(self, request: Request, status: int, detail: str) -> Response:
        self.refusals.append((request.path, status))
        return text_response(status, f"refused {request.path}: {detail}")


async def start_recording(nursery: trio.Nursery) -> tuple[Recorder, tuple[str, int]]:
    recorder = Recorder()
    address = await nursery.start(
        lambda task_status: serve_http(
            "127.0.0.1", 0, recorder.handle, refuse=recorder.refuse, task_status=task_status
        )
    )
    host, _, port = address.rpartition(":")
    return recorder, (host, int(port))


async def drip(stream: trio.SocketStream, data: bytes, every: float = 1.0) -> None:
    """Send ``data`` a byte at a time, ``every`` seconds apart, until the server hangs up."""
    try:
        for byte in data:
            await stream.send_all(bytes([byte]))
            await trio.sleep(every)
    except trio.BrokenResourceError:
        pass


async def test_the_handler_sees_the_client_address(nursery: trio.Nursery) -> None:
    recorder, address = await start_recording(nursery)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*address)
        await stream.send_all(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await read_until_closed(stream)).endswith(b"/a 0 from 127.0.0.1\n")
    assert [request.client for request in recorder.requests] == ["127.0.0.1"]


@pytest.mark.parametrize("expect", [b"", b"Expect: 100-continue\r\n"])
async def test_a_declared_oversize_body_is_refused_before_it_is_read(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, expect: bytes
) -> None:
    """A Content-Length over the limit is answered 413 at once -- no 100 Continue, not a byte
    of the body awaited -- through the refuser, and the server shuts its side at once."""
    recorder, address = await start_recording(nursery)
    stream = await trio.open_tcp_stream(*address)
    await stream.send_all(
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n" + expect + b"\r\n"
    )
    response = await read_response(stream)
    assert trio.current_time() < 1  # not waiting for the body
    assert response.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in response
    assert b"connection: close" in response.lower()
    assert response.endswith(f"over {MAX_REQUEST_BODY} bytes\n".encode())
    assert recorder.refusals == [("/x", 413)]
    assert recorder.requests == []
    assert await read_until_closed(stream) == b""  # the server's side is shut at once
    assert trio.current_time() < 1


async def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Without a declared length the body is counted as it comes: one byte over the limit is a
    413 there and then, without waiting for the last chunk; up to the limit it is read whole."""
    recorder, address = await start_recording(nursery)
    head = b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    half = MAX_REQUEST_BODY // 2
    stream = await trio.open_tcp_stream(*address)
    chunk = f"{half:x}\r\n".encode() + b"b" * half + b"\r\n"
    await stream.send_all(head + chunk + chunk + b"0\r\n\r\n")
    assert (await read_response(stream)).endswith(
        f"/x {MAX_REQUEST_BODY} from 127.0.0.1\n".encode()
    )
    await stream.send_all(head + chunk + chunk + b"1\r\nb\r\n")  # one over, and no last chunk
    response = await read_response(stream)
    assert trio.current_time() < 1
    assert response.startswith(b"HTTP/1.1 413 ")
    assert recorder.refusals == [("/x", 413)]
    assert len(recorder.requests) == 1
    assert await read_until_closed(stream) == b""


async def test_what_follows_a_refusal_is_read_so_the_client_is_not_reset(
    nursery: trio.Nursery,
) -> None:
    """After the 413 the server shuts its side and reads what the client still sends (the body
    it had started), instead of closing on unread data, which resets the connection."""
    _, address = await start_recording(nursery)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*address)
        await stream.send_all(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 400000\r\n\r\n")
        assert (await read_response(stream)).startswith(b"HTTP/1.1 413 ")
        for _ in range(4):  # a write after a reset fails
            await stream.send_all(b"b" * 100_000)
            await trio.sleep(0.05)
        await stream.send_eof()
        assert await read_until_closed(stream) == b""


async def test_a_head_dripped_a_byte_at_a_time_is_cut_off_at_the_deadline(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Slowloris on the head: 408 (as text: there is no head to word it from) at
    REQUEST_TIMEOUT after the connect, however steadily the bytes come."""
    recorder, address = await start_recording(nursery)
    stream = await trio.open_tcp_stream(*address)
    nursery.start_soon(drip, stream, b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100)
    response = await read_until_closed(stream)
    assert response.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"connection: close" in response.lower()
    assert REQUEST_TIMEOUT <= trio.current_time() < REQUEST_TIMEOUT + LINGER_TIMEOUT + 1
    assert recorder.refusals == []
    assert recorder.requests == []


async def test_a_body_dripped_a_byte_at_a_time_is_refused_408_through_the_refuser(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Slowloris on the body: the deadline covers head and body together."""
    recorder, address = await start_recording(nursery)
    stream = await trio.open_tcp_stream(*address)
    await stream.send_all(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    nursery.start_soon(drip, stream, b"b" * 100)
    response = await read_until_closed(stream)
    assert response.startswith(b"HTTP/1.1 408 ")
    assert response.endswith(
        f"refused /x: the request did not arrive whole within {REQUEST_TIMEOUT:g}s\n".encode()
    )
    assert REQUEST_TIMEOUT <= trio.current_time() < REQUEST_TIMEOUT + 1
    assert recorder.refusals == [("/x", 408)]
    assert recorder.requests == []


async def test_on_a_kept_alive_connection_the_deadline_runs_from_the_last_answer(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A request that comes within REQUEST_TIMEOUT of the previous answer is served; after the
    last one, the idle connection is closed without an answer REQUEST_TIMEOUT later."""
    _, address = await start_recording(nursery)
    stream = await trio.open_tcp_stream(*address)
    for _ in range(3):
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(stream)).startswith(b"HTTP/1.1 200 ")
        await trio.sleep(REQUEST_TIMEOUT - 1)
    last_answer = trio.current_time() - (REQUEST_TIMEOUT - 1)
    assert await read_until_closed(stream) == b""
    assert trio.current_time() - last_answer < REQUEST_TIMEOUT + 1


async def test_slow_clients_hold_no_slot_past_the_deadline(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """MAX_CONNECTIONS clients that never finish their request fill every slot -- the next
    connection is closed at once -- but only until REQUEST_TIMEOUT: then each has its 408 and
    a new client is served."""
    _, address = await start_recording(nursery)
    slow = []
    for _ in range(MAX_CONNECTIONS):
        slow.append(stream := await trio.open_tcp_stream(*address))
        await stream.send_all(b"GET / HTTP/1.1\r\n")
    await trio.testing.wait_all_tasks_blocked()
    extra = await trio.open_tcp_stream(*address)
    assert await read_until_closed(extra) == b""
    assert trio.current_time() < 1
    for stream in slow:
        assert (await read_until_closed(stream)).startswith(b"HTTP/1.1 408 ")
    assert trio.current_time() < REQUEST_TIMEOUT + LINGER_TIMEOUT + 1
    fresh = await trio.open_tcp_stream(*address)
    await fresh.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await read_until_closed(fresh)).startswith(b"HTTP/1.1 200 ")


async def test_connections_beyond_the_limit_are_logged_once_a_second(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A client opening connections in a loop while every slot is taken gets one warning line a
    second, which says how many refusals it stands for."""
    _, address = await start_recording(nursery)
    held = []
    for _ in range(MAX_CONNECTIONS):
        held.append(stream := await trio.open_tcp_stream(*address))
        await stream.send_all(b"GET / HTTP/1.1\r\n")
    await trio.testing.wait_all_tasks_blocked()
    with capture_logs() as logs:
        for pause in (0, 0, 0, 1.0):
            await trio.sleep(pause)
            assert await read_until_closed(await trio.open_tcp_stream(*address)) == b""
    lines = [line for line in logs if line["event"] == "admin_connection_refused"]
    assert [(line["suppressed"], line["limit"]) for line in lines] == [
        (0, MAX_CONNECTIONS),
        (2, MAX_CONNECTIONS),
    ]
    for stream in held:
        await stream.aclose()


async def test_a_malformed_header_is_not_echoed(nursery: trio.Nursery) -> None:
    """h11's reason quotes the offending header, which may be a token: the 400 does not."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*await start(nursery))
        await stream.send_all(
            b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cr3t\x00\r\n\r\n"
        )
        response = await read_until_closed(stream)
    assert response.startswith(b"HTTP/1.1 400 ")
    assert b"s3cr3t" not in response


async def test_a_refuser_that_fails_still_refuses(nursery: trio.Nursery) -> None:
    """A bug in the refuser is logged; the plain refusal goes out and the server lives on."""

    def broken(request: Request, status: int, detail: str) -> Response:
        raise RuntimeError("a bug in a refuser")

    address = await nursery.start(
        lambda task_status: serve_http("127.0.0.1", 0, echo, refuse=broken, task_status=task_status)
    )
    with trio.fail_after(10), capture_logs() as logs:
        async with httpx.AsyncClient(verify=TLS, base_url=f"http://{address}") as http:
            big = await http.post("/x", content=b"b" * (MAX_REQUEST_BODY + 1))
            assert (big.status_code, big.text) == (
                413,
                f"the request body is over {MAX_REQUEST_BODY} bytes\n",
            )
            assert (await http.get("/fine")).status_code == 200
    assert [line["event"] for line in logs if line["log_level"] == "error"] == [
        "admin_handler_failed"
    ]
