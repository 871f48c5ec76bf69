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

What a client cannot do to the listener, whatever it sends (each bound a constant below):

* **Hold a connection slot.** Every request must arrive whole -- head and body -- within
  :data:`REQUEST_TIMEOUT` of the server starting to wait for it (the connect, or the end of the
  previous answer on a kept-alive connection). A client that drips its request a byte at a time
  is answered 408 and closed then; one that sent nothing is closed without an answer. So no
  connection keeps one of the :data:`MAX_CONNECTIONS` slots longer than that while it owes a
  request, and writing the answer has its own :data:`SEND_TIMEOUT`.
* **Make the server read a large body.** A declared ``Content-Length`` over
  :data:`MAX_REQUEST_BODY` is refused (413) before a byte of the body is read (and before a
  ``100 Continue``); a chunked body is refused as soon as it passes the limit.

A refused request is answered, then the connection is closed in stages (RFC 9112 §9.6): our
side is shut, and what the client still sends is read and thrown away for a short while
(:data:`LINGER_TIMEOUT`, at most :data:`LINGER_BYTES`), so that the client reads the answer
instead of losing it to a reset. A request whose head was read is refused through the ``refuse``
function given to :func:`serve_http`, so that an endpoint can word the refusal (``/api``
answers a JMAP problem document); one whose head was not (broken HTTP, a head over
:data:`MAX_REQUEST_HEAD`, a deadline passed mid-head) gets a line of text.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from http import HTTPStatus

import h11
import structlog
import trio

log = structlog.get_logger("milterbridge.admin")

#: Largest request line plus headers (h11's default; a scrape request is a few hundred bytes).
MAX_REQUEST_HEAD = 16 * 1024
#: Largest request body read; /api requests are small JSON (a few KiB for a large ``set``).
MAX_REQUEST_BODY = 64 * 1024
#: Longest wait for one whole request (head and body), counted from when the server starts
#: waiting for it: the connect, or the end of the previous answer. Prometheus, a kubelet and
#: curl send a request at once; only a client holding the connection open on purpose (an idle
#: kept-alive connection, or a slowloris) takes longer.
REQUEST_TIMEOUT = 10.0
#: Longest time a whole response may take to be written to a slow reader.
SEND_TIMEOUT = 10.0
#: After a refusal, how long (at most) the rest of the request is read and thrown away before
#: the connection is closed; and how much of it.
LINGER_TIMEOUT = 2.0
LINGER_BYTES = 1024 * 1024
#: Connections served at once; more are closed at once. Prometheus, a kubelet and an operator's
#: curl need a handful.
MAX_CONNECTIONS = 32
_RECEIVE_SIZE = 16 * 1024


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request, read whole (or only its head, when it is being refused)."""

    method: str
    #: The path, without the query string.
    path: str
    query: str
    #: Header names in lower case; a repeated header's values joined with ", ".
    headers: Mapping[str, str]
    body: bytes = b""
    #: The client's IP address ("" when the socket no longer knows it).
    client: str = ""


@dataclass(frozen=True, slots=True)
class Response:
    """One HTTP response; Content-Length is added when it is sent."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Request], Awaitable[Response]]
#: Words a refusal of a request whose head was read: (the head, the status, why) -> the answer.
#: The server adds ``Connection: close``; the refusal cannot keep the connection.
Refuser = Callable[[Request, int, str], Response]


def text_response(status: int, text: str, **headers: str) -> Response:
    """A plain-text response (a line of text and a newline)."""
    return Response(status, f"{text}\n".encode(), headers=list(headers.items()))


def plain_refusal(request: Request, status: int, detail: str) -> Response:
    """The default :data:`Refuser`: the reason as a line of text."""
    return text_response(status, detail)


class _Closed(Exception):
    """The client went away or broke HTTP; the connection just ends."""


@dataclass(frozen=True, slots=True)
class _Refusal:
    """A request the server answers itself, then closes the connection."""

    status: int
    detail: str


async def serve_http(
    host: str,
    port: int,
    handler: Handler,
    *,
    refuse: Refuser = plain_refusal,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTP on ``host:port`` until cancelled; reports the bound ``HOST:PORT``.

    A host name that resolves to several addresses is served on all of them (the first is
    reported). Port 0 picks a free port, which the reported address shows. ``refuse`` words
    the refusals of requests whose head was read (see the module docstring).
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
    refusals = _RefusalLog()

    async def connection(stream: trio.SocketStream) -> None:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            refusals.refused()
            return  # serve_listeners closes the stream
        try:
            await _Connection(stream, handler, refuse, _peer_host(stream)).serve()
        finally:
            limiter.release()

    async with trio.open_nursery() as nursery:
        # From here serve_listeners owns the listeners and closes them when it ends.
        await nursery.start(trio.serve_listeners, connection, listeners)
        addresses = [_address(listener) for listener in listeners]
        log.debug("admin_listening", addresses=addresses)
        task_status.started(addresses[0])


class _RefusalLog:
    """At most one ``admin_connection_refused`` warning a second: a client opening connections
    in a loop must not turn each one into a log write. ``suppressed`` counts those not logged
    since the previous line."""

    def __init__(self) -> None:
        self._last: float | None = None
        self._suppressed = 0

    def refused(self) -> None:
        now = trio.current_time()
        if self._last is not None and now - self._last < 1.0:
            self._suppressed += 1
            return
        log.warning("admin_connection_refused", limit=MAX_CONNECTIONS, suppressed=self._suppressed)
        self._last, self._suppressed = now, 0


def _address(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    if listener.socket.family == socket.AF_INET6:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _peer_host(stream: trio.SocketStream) -> str:
    try:
        host: str = stream.socket.getpeername()[0]
    except OSError:  # the client is already gone
        return ""
    return host


class _Connection:
    """One client connection: requests in turn, each under :data:`REQUEST_TIMEOUT`."""

    def __init__(
        self, stream: trio.SocketStream, handler: Handler, refuse: Refuser, client: str
    ) -> None:
        self.stream = stream
        self.handler = handler
        self.refuse = refuse
        self.client = client
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        #: The head of the request being read, once it is complete (for its refusal).
        self.head: Request | None = None

    async def serve(self) -> None:
        try:
            while True:
                received = await self._receive()
                if received is None:  # idle too long, or the client closed between requests
                    return
                if isinstance(received, _Refusal):
                    await self._refuse(received)
                    return
                started = trio.current_time()
                response = await _handle(self.handler, received)
                # Logged before the answer goes out, so that whoever reads the answer can rely
                # on the line being there (the tests do).
                log.debug(
                    "admin_request",
                    method=received.method,
                    path=received.path,
                    status=response.status,
                    seconds=round(trio.current_time() - started, 6),
                )
                await self._send_response(response, head=received.method == "HEAD")
                if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
                    return  # HTTP/1.0, or Connection: close
                self.conn.start_next_cycle()
        except _Closed as exc:
            log.debug("admin_connection_ended", cause=str(exc))

    async def _receive(self) -> Request | _Refusal | None:
        """The next whole request; a refusal; None when the connection should just close."""
        self.head = None
        with trio.move_on_after(REQUEST_TIMEOUT):
            return await self._read_request()
        if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
            return None  # not a byte of a request: an idle connection, closed without a word
        return _Refusal(408, f"the request did not arrive whole within {REQUEST_TIMEOUT:g}s")

    async def _read_request(self) -> Request | _Refusal | None:
        try:
            event = await self._next_event()
        except h11.RemoteProtocolError as exc:
            # h11's words may quote the offending bytes (a header value: a token); not echoed.
            status = exc.error_status_hint
            return _Refusal(status, f"bad request: {HTTPStatus(status).phrase.lower()}")
        if isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Request), event
        self.head = _head(event, self.client)
        declared = self.head.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_REQUEST_BODY:  # h11 checked the syntax
            return _too_large()
        try:
            body = await self._read_body()
        except h11.RemoteProtocolError as exc:
            return _Refusal(exc.error_status_hint, "bad request: a malformed body")
        if body is None:
            return _too_large()
        return replace(self.head, body=body)

    async def _read_body(self) -> bytes | None:
        """The request's body; None as soon as it is over :data:`MAX_REQUEST_BODY`."""
        if self.conn.they_are_waiting_for_100_continue:
            await self._send(self.conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event()
            if isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            if isinstance(event, h11.ConnectionClosed):
                raise _Closed("closed inside a request body")
            assert isinstance(event, h11.Data), event
            size += len(event.data)
            if size > MAX_REQUEST_BODY:
                return None
            chunks.append(event.data)

    async def _next_event(self) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                assert not isinstance(event, type)  # PAUSED only comes after a complete request
                return event
            try:
                data = await self.stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, OSError) as exc:
                raise _Closed(f"receive failed: {exc}") from None
            self.conn.receive_data(data)

    async def _refuse(self, refusal: _Refusal) -> None:
        """Answer a refused request, then close in stages (see the module docstring)."""
        response = text_response(refusal.status, refusal.detail)
        if self.head is not None:
            try:
                response = self.refuse(self.head, refusal.status, refusal.detail)
            except Exception:  # a bug in an endpoint's wording: the plain refusal still goes
                log.exception("admin_handler_failed", method=self.head.method, path=self.head.path)
        log.debug(
            "admin_request_refused",
            path=None if self.head is None else self.head.path,
            status=response.status,
            reason=refusal.detail,
        )
        closing = replace(response, headers=[*response.headers, ("Connection", "close")])
        head = self.head is not None and self.head.method == "HEAD"
        await self._send_response(closing, head=head)
        await self._linger()

    async def _linger(self) -> None:
        with trio.move_on_after(LINGER_TIMEOUT):
            try:
                await self.stream.send_eof()
                discarded = 0
                while discarded < LINGER_BYTES:
                    data = await self.stream.receive_some(_RECEIVE_SIZE)
                    if not data:
                        return
                    discarded += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return

    async def _send_response(self, response: Response, *, head: bool) -> None:
        """The whole response in one write, under :data:`SEND_TIMEOUT`."""
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            *response.headers,
        ]
        reason = HTTPStatus(response.status).phrase.encode()
        conn = self.conn
        try:
            data = conn.send(
                h11.Response(status_code=response.status, headers=headers, reason=reason)
            )
            if response.body and not head:
                data = (data or b"") + (conn.send(h11.Data(data=response.body)) or b"")
            data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError as exc:  # the client's state allows no answer any more
            raise _Closed(f"cannot answer: {exc}") from None
        await self._send(data)

    async def _send(self, data: bytes | None) -> None:
        if not data:
            return
        try:
            with trio.fail_after(SEND_TIMEOUT):
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.TooSlowError, OSError) as exc:
            self.conn.send_failed()
            raise _Closed(f"send failed: {exc or type(exc).__name__}") from None


def _head(event: h11.Request, client: str) -> Request:
    target = event.target.decode("ascii", "replace")
    path, _, query = target.partition("?")
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key, text = name.decode("ascii").lower(), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return Request(event.method.decode("ascii"), path, query, headers, client=client)


def _too_large() -> _Refusal:
    return _Refusal(413, f"the request body is over {MAX_REQUEST_BODY} bytes")


async def _handle(handler: Handler, request: Request) -> Response:
    try:
        return await handler(request)
    except Exception:
        log.exception("admin_handler_failed", method=request.method, path=request.path)
        return text_response(500, "internal error")


__all__ = [
    "LINGER_BYTES",
    "LINGER_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_REQUEST_BODY",
    "MAX_REQUEST_HEAD",
    "REQUEST_TIMEOUT",
    "SEND_TIMEOUT",
    "Handler",
    "Refuser",
    "Request",
    "Response",
    "plain_refusal",
    "serve_http",
    "text_response",
]
