"""What can go wrong with one upstream milter, in the bounded classes design §7 counts.

Every way an upstream can misbehave -- refuse the connection, time out, break TLS, answer the
OPTNEG wrongly, close, send garbage, send too much, send a legal packet at an illegal moment --
reaches the session as one ``UpstreamFailure`` with a ``FailureKind``, the filter's name and the
stage, so that the session can apply the filter's error policy (tempfail or drop it), log one line
and count ``milterbridge_filter_errors_total{filter,kind}`` without knowing about sockets, TLS or
the codec. What is *not* the upstream's fault is never converted: cancellation, and the codec's
``LocalProtocolError`` (we tried to send something the protocol forbids: our bug).
"""

from __future__ import annotations

import enum
import errno

import trio

from ..milter import (
    Abort,
    Body,
    Command,
    Connect,
    Data,
    EndOfHeaders,
    EndOfMessage,
    ErrorKind,
    Header,
    Helo,
    Macro,
    Mail,
    OptNeg,
    Quit,
    QuitNoClose,
    Rcpt,
    RemoteProtocolError,
    Unknown,
)


class FailureKind(enum.Enum):
    """Why an upstream failed; the values are metric labels (a fixed, small set)."""

    REFUSED = "refused"  # connection refused, unreachable, name unresolvable
    CONNECT_TIMEOUT = "connect_timeout"  # connect + TLS + OPTNEG over timeout_connect
    TLS = "tls"  # handshake or certificate failure
    NEGOTIATION = "negotiation"  # OPTNEG answer outside our offer
    COMMAND_TIMEOUT = "command_timeout"  # an envelope/header step over timeout_command
    DATA_TIMEOUT = "data_timeout"  # a body chunk or end-of-message over timeout_data
    CLOSED = "closed"  # closed mid-packet, without answering, or between commands
    GARBAGE = "garbage"  # malformed packet or unknown reply letter
    OVERSIZE = "oversize"  # a length word over max_response_size
    PROTOCOL = "protocol"  # a legal packet at an illegal moment
    CIRCUIT_OPEN = "circuit_open"  # not tried: it kept failing, its circuit is open
    HTTP_STATUS = "http_status"  # a hook answered with a status other than 2xx (3xx included)
    INVALID_RESPONSE = "invalid_response"  # a hook's answer is not JSON, or not a valid answer
    LOCAL_RESOURCES = "local_resources"  # not the filter: the bridge had no descriptor/memory


class UpstreamFailure(Exception):
    """One upstream milter failed; the session applies that filter's error policy.

    Attributes:
        kind: the failure class.
        filter_name: the upstream's configured name.
        stage: the exchange that failed, named as in ``STAGE_NAMES`` (``"optneg"`` covers the
            whole connection set-up: TCP, TLS and the OPTNEG exchange).
        cause: what happened, in words for the log line (never message content).
    """

    def __init__(self, kind: FailureKind, filter_name: str, stage: str, cause: str) -> None:
        super().__init__(f"upstream {filter_name!r} failed at {stage} ({kind.value}): {cause}")
        self.kind = kind
        self.filter_name = filter_name
        self.stage = stage
        self.cause = cause


#: Stage names used in failures (and so in log lines): short, stable, pymilter's callback names.
STAGE_NAMES: dict[type[Command], str] = {
    OptNeg: "optneg",
    Connect: "connect",
    Helo: "helo",
    Mail: "mail",
    Rcpt: "rcpt",
    Data: "data",
    Header: "header",
    EndOfHeaders: "eoh",
    Body: "body",
    EndOfMessage: "eom",
    Unknown: "unknown",
    Abort: "abort",
    Quit: "quit",
    QuitNoClose: "quit_nc",
    Macro: "macro",
}

#: The codec's error kinds, seen from the MTA side: all of them are the upstream's fault.
_PROTOCOL_ERROR_KINDS: dict[ErrorKind, FailureKind] = {
    ErrorKind.MALFORMED: FailureKind.GARBAGE,
    ErrorKind.OVERSIZE: FailureKind.OVERSIZE,
    ErrorKind.UNEXPECTED: FailureKind.PROTOCOL,
    ErrorKind.NEGOTIATION: FailureKind.NEGOTIATION,
    ErrorKind.TRUNCATED: FailureKind.CLOSED,
}


def describe(exc: BaseException) -> str:
    """A one-line cause; trio's stream errors usually carry the OS error as ``__cause__``."""
    text = str(exc)
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) != text:
        text = f"{text}: {cause}" if text else str(cause)
    return text or type(exc).__name__


#: The operating system's "we are short of something" errors: the bridge's trouble, not the peer's.
_SHORTAGES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def local_shortage(exc: BaseException) -> OSError | None:
    """The error, in ``exc``, its causes or its groups, saying that this process ran out of
    descriptors or memory (trio reports a failed connect as "all attempts ... failed" with the
    real errors in the cause); None when there is none."""
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _SHORTAGES:
            return current
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return None


def classify(exc: BaseException) -> tuple[FailureKind, str] | None:
    """The failure class of an exception raised while talking to an upstream.

    Returns None for what must propagate unchanged: cancellation, our own bugs
    (``LocalProtocolError``, ``trio.ClosedResourceError`` from using a closed client) and anything
    unknown. Timeouts are not classified here: whether one is a connect, command or data timeout
    depends on the call site's cancel scope.
    """
    if isinstance(exc, RemoteProtocolError):
        return _PROTOCOL_ERROR_KINDS[exc.kind], str(exc)
    if isinstance(exc, trio.BrokenResourceError):
        return FailureKind.CLOSED, f"connection lost: {describe(exc)}"
    if isinstance(exc, OSError):
        return FailureKind.CLOSED, f"connection lost: {describe(exc)}"
    return None


__all__ = [
    "STAGE_NAMES",
    "FailureKind",
    "UpstreamFailure",
    "classify",
    "describe",
    "local_shortage",
]
