"""The MTA side of one upstream milter connection, for one MTA session.

``connect_upstream`` opens the connection (TCP or Unix socket, optionally TLS) and negotiates;
the ``UpstreamMilter`` it returns forwards the session's commands and returns the upstream's
replies. It never answers the MTA and never merges: it is one filter, spoken to exactly as Postfix
would speak to it (protocol notes §8.2), with the session deciding what to do with the answers.

Invariants:

* Each batch owed to the upstream (a macro packet and its command) goes out in one write
  (design §4); ``MilterStream`` does the socket options.
* Macros are filtered to the names the upstream asked for in its OPTNEG answer (SETSYMLIST) and
  still sent for a step it disabled with SMFIP_NO* (Postfix does; filters read e.g. connect
  macros at end-of-message), but not for a step its protocol version lacks (Postfix's np_mask).
* A step negotiated no-reply (SMFIP_NR_*) is sent without waiting. A reply nobody asked for (to
  an NR step, or a second final reply) is a PROTOCOL failure: before every command we look, without
  blocking, for bytes the upstream sent while it was not its turn, because a stray reply would
  otherwise be taken as the answer to the next command and shift every verdict by one.
* Timeouts are cancel scopes at the call site (design §7): ``timeout_connect`` around connect,
  TLS and OPTNEG; ``timeout_command`` around one envelope or header step (connect, helo, mail,
  rcpt, data, unknown, header, eoh; also abort and quit); ``timeout_data`` around one body chunk or
  end-of-message. The deadline covers writing the command too, so an upstream that stops reading
  cannot block us either.
* PROGRESS: each SMFIR_PROGRESS gives the step a fresh full timeout from its arrival; no other
  packet does. PROGRESS is the protocol's explicit "still working" (smfi_progress), while a
  per-read timer like Postfix's would let an upstream stretch a step forever by trickling bytes.
  Edits come in a burst once the filter has decided, so they need no extension of their own.
* Failure: everything the upstream can do wrong raises ``UpstreamFailure`` (failure.py) and
  leaves this client closed. Any exchange that does not complete -- failure, cancellation, our own
  LocalProtocolError -- closes the stream too: a half-done exchange cannot be resumed, since the
  next reply would belong to the wrong command. Cancellation and LocalProtocolError propagate
  unchanged.

TODO: SMFIP_HDR_LEADSPC normalisation (protocol notes §8.2) is not done here: header values are
forwarded as the session passes them. When the bridge negotiates HDR_LEADSPC with the MTA, the
session (or this client) must strip one leading space for upstreams without it, and add one to
their header edits.

Limitation: the look for unsolicited bytes sees the kernel's receive queue only on a plain socket;
over TLS it sees what an earlier read already buffered, so a stray reply is caught at the next
command boundary after it has been read.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Awaitable, Callable

import structlog
import trio

from .. import logs
from ..milter import (
    CHUNK_SIZE,
    CLOSED,
    NEED_DATA,
    Abort,
    Body,
    Command,
    Connection,
    Continue,
    EndOfMessage,
    Macro,
    Negotiated,
    OptNeg,
    Progress,
    Quit,
    Reply,
    Role,
)
from ..milter.negotiation import MIN_VERSION_FOR
from ..milter.state import MACRO_STAGE
from ..transport import MilterStream
from .endpoint import UpstreamEndpoint, upstream_offer
from .failure import (
    STAGE_NAMES,
    FailureKind,
    UpstreamFailure,
    classify,
    describe,
    local_shortage,
)

#: Per-exchange tracing, at debug level only (packet kinds, never their content).
_trace = structlog.get_logger("milterbridge.upstream")

#: Opens the byte stream to an upstream (TCP or Unix socket by default; tests inject others).
StreamOpener = Callable[[UpstreamEndpoint], Awaitable[trio.abc.Stream]]

#: Steps timed by ``timeout_data`` (design §7: "body chunks and end-of-message").
_DATA_STEPS: frozenset[type[Command]] = frozenset({Body, EndOfMessage})

_OPTNEG_STAGE = STAGE_NAMES[OptNeg]


async def open_socket(endpoint: UpstreamEndpoint) -> trio.abc.Stream:
    """The plain connection: the Unix socket if one is configured, else TCP."""
    if endpoint.unix_path is not None:
        return await trio.open_unix_socket(endpoint.unix_path)
    return await trio.open_tcp_stream(endpoint.hostname, endpoint.port)


def tls_context(endpoint: UpstreamEndpoint) -> ssl.SSLContext:
    """System CAs and hostname check, or neither with ``allow_invalid_certs``."""
    return _tls_context(endpoint.allow_invalid_certs)


@functools.cache
def _tls_context(allow_invalid_certs: bool) -> ssl.SSLContext:
    # Built once per kind: loading the system CA bundle costs milliseconds, and we connect per
    # MTA session. An SSLContext may be shared by any number of connections.
    context = ssl.create_default_context()
    if allow_invalid_certs:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def connect_upstream(
    endpoint: UpstreamEndpoint,
    offer: OptNeg,
    *,
    open_stream: StreamOpener = open_socket,
) -> UpstreamMilter:
    """Connect to one upstream milter and negotiate, all within ``timeout_connect``.

    Args:
        endpoint: where the upstream is and how to talk to it.
        offer: what the MTA offered us; the upstream gets it narrowed by ``upstream_offer``.
        open_stream: opens the byte stream (for tests; the default dials ``endpoint``).

    Returns:
        The negotiated connection; the caller owns it and must ``quit()`` or ``aclose()`` it.

    Raises:
        UpstreamFailure: REFUSED, TLS, CONNECT_TIMEOUT, NEGOTIATION, or CLOSED/GARBAGE/OVERSIZE/
            PROTOCOL for a broken OPTNEG answer. Nothing is left open.
    """
    our_offer = upstream_offer(endpoint, offer)
    stream: trio.abc.Stream | None = None
    try:
        with trio.fail_after(endpoint.timeout_connect) as scope:
            stream = await _open(endpoint, open_stream)
            if endpoint.use_tls:
                stream = await _start_tls(endpoint, stream)
            connection = Connection(Role.MTA, max_packet=endpoint.max_response_size)
            milter = MilterStream(stream, connection)
            await milter.send(our_offer)
            await _read_replies(milter, scope, endpoint.timeout_connect)
    except BaseException as exc:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        failure = _connect_failure(endpoint, exc)
        if failure is None:
            raise
        raise failure from exc
    return UpstreamMilter(endpoint, milter)


async def _open(endpoint: UpstreamEndpoint, open_stream: StreamOpener) -> trio.abc.Stream:
    try:
        return await open_stream(endpoint)
    except OSError as exc:
        where = endpoint.unix_path or f"{endpoint.hostname}:{endpoint.port}"
        shortage = local_shortage(exc)
        if shortage is not None:
            cause = f"cannot connect to {where}: the bridge is short of resources: {shortage}"
            raise UpstreamFailure(
                FailureKind.LOCAL_RESOURCES, endpoint.name, _OPTNEG_STAGE, cause
            ) from exc
        raise UpstreamFailure(
            FailureKind.REFUSED, endpoint.name, _OPTNEG_STAGE, f"cannot connect to {where}: {exc}"
        ) from exc


async def _start_tls(endpoint: UpstreamEndpoint, stream: trio.abc.Stream) -> trio.abc.Stream:
    """TLS with the handshake done now, under the connect deadline, so its errors are TLS's."""
    tls = trio.SSLStream(stream, tls_context(endpoint), server_hostname=endpoint.hostname)
    try:
        await tls.do_handshake()
    except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
        raise UpstreamFailure(
            FailureKind.TLS, endpoint.name, _OPTNEG_STAGE, f"TLS handshake failed: {describe(exc)}"
        ) from exc
    return tls


def _connect_failure(endpoint: UpstreamEndpoint, exc: BaseException) -> UpstreamFailure | None:
    if isinstance(exc, UpstreamFailure):
        return exc
    if isinstance(exc, trio.TooSlowError):
        cause = f"connect, TLS and OPTNEG took over {endpoint.timeout_connect}s"
        return UpstreamFailure(FailureKind.CONNECT_TIMEOUT, endpoint.name, _OPTNEG_STAGE, cause)
    classified = classify(exc)
    if classified is None:
        return None
    return UpstreamFailure(classified[0], endpoint.name, _OPTNEG_STAGE, classified[1])


async def _read_replies(
    milter: MilterStream, scope: trio.CancelScope, renewal: float
) -> list[Reply]:
    """Every reply up to the final one; each PROGRESS moves ``scope``'s deadline to ``renewal``
    seconds from its arrival.

    The codec itself refuses a close while a reply is owed (TRUNCATED) and anything illegal.
    """
    replies: list[Reply] = []
    while milter.connection.awaiting is not None:
        event = await milter.receive()
        if not isinstance(event, Reply):  # CLOSED: the codec raises first; kept for the types
            raise trio.BrokenResourceError("upstream closed the connection")
        replies.append(event)
        if isinstance(event, Progress):
            scope.deadline = trio.current_time() + renewal
    return replies


def _chunks(data: bytes) -> list[bytes]:
    """Body chunks of at most CHUNK_SIZE (MILTER_CHUNK_SIZE); an empty body stays one chunk."""
    return [data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)] or [data]


def _bare(name: bytes) -> bytes:
    """A macro name without braces, so that ``{i}`` and ``i`` name the same macro."""
    if len(name) > 2 and name.startswith(b"{") and name.endswith(b"}"):
        return name[1:-1]
    return name


class UpstreamMilter(trio.abc.AsyncResource):
    """One negotiated upstream milter connection; we play the MTA.

    Use one instance from one task at a time (the protocol is strictly request/response). After
    an ``UpstreamFailure`` or an interrupted exchange the client is closed and every further
    command raises ``trio.ClosedResourceError``.
    """

    def __init__(self, endpoint: UpstreamEndpoint, milter: MilterStream) -> None:
        negotiated = milter.connection.negotiated
        if negotiated is None:
            raise ValueError("the connection has not negotiated yet")
        self.endpoint = endpoint
        self.milter = milter
        self.negotiated: Negotiated = negotiated
        self._closed = False

    # --- state ------------------------------------------------------------------------

    @property
    def connection(self) -> Connection:
        return self.milter.connection

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def skipping_body(self) -> bool:
        """The upstream answered SKIP: it gets no more body chunks in this message."""
        return self.connection.conversation.skipping_body

    @property
    def done_for_message(self) -> bool:
        """Its final reply ended its part in this message (only abort/mail/helo/... may follow)."""
        return self.connection.conversation.message_done

    @property
    def done_for_connection(self) -> bool:
        """Its final reply ended its part in the connection (only abort/quit may follow)."""
        return self.connection.conversation.connection_done

    # --- commands ---------------------------------------------------------------------

    async def command(self, macro: Macro | None, command: Command) -> list[Reply]:
        """Forward one MTA command (with its macros) and return the upstream's replies.

        The macro packet is filtered to the names the upstream asked for; a step it disabled
        gets only the macro packet, a step outside its protocol version gets nothing, and a
        no-reply step is not waited for. In each of those cases the result is ``[]``.

        Args:
            macro: the MTA's macro packet for this command, or None; its letter must be the
                command's.
            command: the command; never OptNeg (connect_upstream did that) nor Quit (use quit()).

        Returns:
            The replies in order: edits and PROGRESS packets, then the final reply last.

        Raises:
            UpstreamFailure: the upstream failed; this client is closed.
            LocalProtocolError: the command is illegal now (our bug, e.g. a RCPT after the
                upstream accepted the message; see ``done_for_message``); this client is closed.
            ValueError: the macro packet belongs to another command.
        """
        self._check_open()
        kind = type(command)
        if macro is not None and macro.command != command.code:
            raise ValueError(f"macro packet for {macro.command!r} sent with {kind.__name__}")
        if self.negotiated.version < MIN_VERSION_FOR.get(kind, 0):
            return []
        packets: list[Command] = []
        if macro is not None:
            packets.append(self._filter_macro(macro))
        if self.negotiated.sends(kind):
            packets.append(command)
        if not packets:
            return []
        return await self._exchange(kind, packets)

    async def body(self, macro: Macro | None, data: bytes) -> list[Reply]:
        """Forward one MTA body chunk, split into packets of at most CHUNK_SIZE bytes.

        Stops at the first final reply other than CONTINUE (SKIP, a reject, an accept...), since
        the upstream may then take no more body. An upstream already skipping the body is sent
        nothing; one that disabled the body step gets the macro packet once, as it would from
        Postfix for this chunk.

        Returns:
            Every reply to the packets sent, in order.

        Raises:
            As ``command()``.
        """
        self._check_open()
        if self.skipping_body:
            return []
        chunks = _chunks(data) if self.negotiated.sends(Body) else [b""]
        replies: list[Reply] = []
        for chunk in chunks:
            step = await self.command(macro, Body(chunk))
            replies += step
            if step and not isinstance(step[-1], Continue):
                break
        return replies

    async def abort(self) -> None:
        """Send SMFIC_ABORT (never answered): the upstream drops its per-message state.

        Raises:
            UpstreamFailure: COMMAND_TIMEOUT if it could not even be written, CLOSED if the
                upstream closed, PROTOCOL if it had sent something unasked.
        """
        self._check_open()
        await self._exchange(Abort, [Abort()])

    async def quit(self) -> None:
        """Send SMFIC_QUIT and close; best effort, never raises for the upstream.

        Never QUIT_NC: Debian's libmilter answers nothing on a connection after it (README).
        Nobody can act on a failure here, so a dead or slow upstream only shortens the goodbye.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        try:
            with trio.move_on_after(self.endpoint.timeout_command):
                await self.milter.send(Quit())
        except (trio.BrokenResourceError, OSError):
            pass
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close without QUIT, at once; safe in any state and idempotent."""
        self._closed = True
        await trio.aclose_forcefully(self.milter.stream)

    # --- helpers ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError(f"upstream {self.endpoint.name!r} is closed")

    def _filter_macro(self, macro: Macro) -> Macro:
        """Only the names the upstream asked for at this stage, if it sent a list for it."""
        stage = MACRO_STAGE.get(macro.command)
        wanted = self.negotiated.macros.get(stage) if stage is not None else None
        if wanted is None:
            return macro
        names = {_bare(name) for name in wanted}
        return Macro(macro.command, tuple(p for p in macro.macros if _bare(p[0]) in names))

    async def _exchange(self, kind: type[Command], packets: list[Command]) -> list[Reply]:
        """Write the packets in one go and read the replies owed, under the step's timeout.

        The deadline is a plain cancel scope rather than ``fail_after`` in a context manager:
        this runs for every step of every message, and the generator machinery was a visible
        share of the profile.
        """
        stage = STAGE_NAMES.get(kind, kind.__name__.lower())
        timeout, timeout_kind = self._timeout(kind)
        try:
            with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
                self._refuse_unsolicited(stage)
                await self.milter.send(*packets)
                replies = await _read_replies(self.milter, scope, timeout)
        except BaseException as exc:
            await self.aclose()
            failure = self._failure(exc, stage, timeout, timeout_kind)
            if failure is exc:
                raise
            raise failure from exc
        if scope.cancelled_caught:
            await self.aclose()
            cause = f"no complete answer within {timeout}s"
            raise UpstreamFailure(timeout_kind, self.endpoint.name, stage, cause)
        if logs.TRACE:
            _trace.debug(
                "filter_packets",
                filter=self.endpoint.name,
                sent=[type(packet).__name__ for packet in packets],
                received=[type(reply).__name__ for reply in replies],
            )
        return replies

    def _timeout(self, kind: type[Command]) -> tuple[float, FailureKind]:
        if kind in _DATA_STEPS:
            return self.endpoint.timeout_data, FailureKind.DATA_TIMEOUT
        return self.endpoint.timeout_command, FailureKind.COMMAND_TIMEOUT

    def _failure(
        self, exc: BaseException, stage: str, timeout: float, timeout_kind: FailureKind
    ) -> BaseException:
        """What an exchange that raised ``exc`` raises: the upstream's failures get a name."""
        if isinstance(exc, UpstreamFailure):
            return exc
        if isinstance(exc, trio.TooSlowError):
            cause = f"no complete answer within {timeout}s"
            return UpstreamFailure(timeout_kind, self.endpoint.name, stage, cause)
        classified = classify(exc)
        if classified is None:
            return exc
        return UpstreamFailure(classified[0], self.endpoint.name, stage, classified[1])

    def _refuse_unsolicited(self, stage: str) -> None:
        """Fail if the upstream spoke out of turn: a stray reply, garbage, or a close.

        Runs when no reply is owed, so the codec itself rejects any whole packet (UNEXPECTED,
        or MALFORMED for garbage) and reports a close as CLOSED. Looking costs one non-blocking
        receive (nothing to look at on TLS streams, whose records may hold no data).
        """
        connection = self.connection
        if not connection.buffered:
            data = self.milter.receive_ready()
            if data is None:
                return
            connection.receive_data(data)
        event = connection.next_event()
        name = self.endpoint.name
        if event is CLOSED:
            cause = "upstream closed the connection between commands"
            raise UpstreamFailure(FailureKind.CLOSED, name, stage, cause)
        assert event is NEED_DATA  # a whole packet raised RemoteProtocolError above
        cause = f"{connection.buffered} unsolicited bytes before {stage}"
        raise UpstreamFailure(FailureKind.PROTOCOL, name, stage, cause)


__all__ = [
    "StreamOpener",
    "UpstreamMilter",
    "connect_upstream",
    "open_socket",
    "tls_context",
]
