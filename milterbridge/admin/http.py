"""A small HTTP/1.1 server on trio: h11 drives the protocol, this module the sockets.

Why h11 directly and not hypercorn's trio worker: the admin listener serves a few small GET
endpoints on a loopback port to Prometheus and a kubelet, and later one JSON POST (/api). h11 is
already installed (httpx depends on it), so this costs no new dependency tree (hypercorn brings
h2, hpack, wsproto, priority and its own config and logging set-up), and it lets the listener
follow the rules of the rest of the service: started with ``nursery.start`` and reporting its
real address, stopped by cancelling its nursery, every timeout a cancel scope written here,
every size bounded by a named constant, and logs through structlog only (debug for each
request, so that scrapes never flood the info log). The price is this module: keep-alive,
request-size limits and timeouts are ours to get right, and there is no HTTP/2 or TLS (put a
reverse proxy in front if the admin port must leave the host).

A handler is a coroutine from :class:`Request` to :class:`Response`. An exception in it is a
bug, but one in an observability endpoint must not take the mail path down with it: it is
logged with its traceback and answered 500, and the service keeps running.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus

import h11
import structlog
import trio

log = structlog.get_logger("milterbridge.admin")

#: Largest request line plus headers (h11's default; a scrape request is a few hundred bytes).
MAX_REQUEST_HEAD = 16 * 1024
#: Largest request body read. Nothing served yet takes a body; /api requests will be small JSON.
MAX_REQUEST_BODY = 64 * 1024
#: Longest wait for a whole request, including the wait for its first byte on a kept-alive
#: connection: a little over a 60 s scrape interval, so one connection serves every scrape.
IDLE_TIMEOUT = 65.0
#: Longest time a response may take to be written to a slow reader.
SEND_TIMEOUT = 10.0
#: Connections served at once; more are closed at once. Prometheus, a kubelet and an operator's
#: curl need a handful.
MAX_CONNECTIONS = 32
_RECEIVE_SIZE = 16 * 1024


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request, read whole."""

    method: str
    #: The path, without the query string.
    path: str
    query: str
    #: Header names in lower case; a repeated header's values joined with ", ".
    headers: Mapping[str, str]
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Response:
    """One HTTP response; Content-Length is added when it is sent."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Request], Awaitable[Response]]


def text_response(status: int, text: str, **headers: str) -> Response:
    """A plain-text response (a line of text and a newline)."""
    return Response(status, f"{text}\n".encode(), headers=list(headers.items()))


class _Closed(Exception):
    """The client went away or broke HTTP; the connection just ends."""


class _BadRequest(Exception):
    """A request h11 refuses; ``status`` is h11's hint (400, 414, 431, ...)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


async def serve_http(
    host: str,
    port: int,
    handler: Handler,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTP on ``host:port`` until cancelled; reports the bound ``HOST:PORT``.

    A host name that resolves to several addresses is served on all of them (the first is
    reported). Port 0 picks a free port, which the reported address shows.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def connection(stream: trio.SocketStream) -> None:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            log.warning("admin_connection_refused", limit=MAX_CONNECTIONS)
            return  # serve_listeners closes the stream
        try:
            await _serve_connection(stream, handler)
        finally:
            limiter.release()

    async with trio.open_nursery() as nursery:
        # From here serve_listeners owns the listeners and closes them when it ends.
        await nursery.start(trio.serve_listeners, connection, listeners)
        addresses = [_address(listener) for listener in listeners]
        log.debug("admin_listening", addresses=addresses)
        task_status.started(addresses[0])


def _address(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    if listener.socket.family == socket.AF_INET6:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


async def _serve_connection(stream: trio.SocketStream, handler: Handler) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    try:
        while True:
            request: Request | Response | None = None
            with trio.move_on_after(IDLE_TIMEOUT):
                request = await _read_request(conn, stream)
            if request is None:  # idle too long, or the client closed between requests
                return
            if isinstance(request, Response):  # the request broke a limit or HTTP itself
                await _send_response(conn, stream, request, head=False)
                return
            started = trio.current_time()
            response = await _handle(handler, request)
            # Logged before the answer goes out, so that whoever reads the answer can rely on
            # the line being there (the tests do).
            log.debug(
                "admin_request",
                method=request.method,
                path=request.path,
                status=response.status,
                seconds=round(trio.current_time() - started, 6),
            )
            await _send_response(conn, stream, response, head=request.method == "HEAD")
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # HTTP/1.0, Connection: close, or a body we did not read
            conn.start_next_cycle()
    except _Closed as exc:
        log.debug("admin_connection_ended", cause=str(exc))


async def _handle(handler: Handler, request: Request) -> Response:
    try:
        return await handler(request)
    except Exception:
        log.exception("admin_handler_failed", method=request.method, path=request.path)
        return text_response(500, "internal error")


async def _next_event(conn: h11.Connection, stream: trio.SocketStream) -> h11.Event:
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise _BadRequest(exc.error_status_hint, str(exc)) from None
        if event is not h11.NEED_DATA:
            assert not isinstance(event, type)  # PAUSED only comes after a complete request
            return event
        try:
            data = await stream.receive_some(_RECEIVE_SIZE)
        except (trio.BrokenResourceError, OSError) as exc:
            raise _Closed(f"receive failed: {exc}") from None
        conn.receive_data(data)


async def _read_request(
    conn: h11.Connection, stream: trio.SocketStream
) -> Request | Response | None:
    """The next request; a Response for a request to refuse; None when the client is done."""
    try:
        event = await _next_event(conn, stream)
        if isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Request), event
        target = event.target.decode("ascii", "replace")
        path, _, query = target.partition("?")
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key, text = name.decode("ascii").lower(), value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        body = await _read_body(conn, stream)
    except _BadRequest as exc:
        return text_response(exc.status, f"bad request: {exc}", Connection="close")
    if body is None:
        return text_response(413, "request body too large", Connection="close")
    return Request(event.method.decode("ascii"), path, query, headers, body)


async def _read_body(conn: h11.Connection, stream: trio.SocketStream) -> bytes | None:
    if conn.they_are_waiting_for_100_continue:
        await _send(conn, stream, h11.InformationalResponse(status_code=100, headers=[]))
    chunks: list[bytes] = []
    size = 0
    while True:
        event = await _next_event(conn, stream)
        if isinstance(event, h11.EndOfMessage):
            return b"".join(chunks)
        if isinstance(event, h11.ConnectionClosed):
            raise _Closed("closed inside a request body")
        assert isinstance(event, h11.Data), event
        size += len(event.data)
        if size > MAX_REQUEST_BODY:
            return None
        chunks.append(event.data)


async def _send_response(
    conn: h11.Connection, stream: trio.SocketStream, response: Response, *, head: bool
) -> None:
    headers = [
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(response.body))),
        *response.headers,
    ]
    reason = HTTPStatus(response.status).phrase.encode()
    await _send(
        conn, stream, h11.Response(status_code=response.status, headers=headers, reason=reason)
    )
    if response.body and not head:
        await _send(conn, stream, h11.Data(data=response.body))
    await _send(conn, stream, h11.EndOfMessage())


async def _send(conn: h11.Connection, stream: trio.SocketStream, event: h11.Event) -> None:
    data = conn.send(event)
    if not data:
        return
    try:
        with trio.fail_after(SEND_TIMEOUT):
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.TooSlowError, OSError) as exc:
        conn.send_failed()
        raise _Closed(f"send failed: {exc or type(exc).__name__}") from None


__all__ = [
    "IDLE_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_REQUEST_BODY",
    "MAX_REQUEST_HEAD",
    "SEND_TIMEOUT",
    "Handler",
    "Request",
    "Response",
    "serve_http",
    "text_response",
]
