"""Errors of the milter codec.

Strategy (after h11): internally the codec raises LocalProtocolError for anything illegal; where
bytes from the peer enter (Connection.next_event), it is converted to RemoteProtocolError. So a
LocalProtocolError reaching the caller always means "you asked for something the protocol
forbids", and a RemoteProtocolError always means "the peer broke the protocol". Either one leaves
the connection in a permanent error state.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    """What went wrong, in words bounded enough to be a metric label."""

    MALFORMED = "malformed"  # a packet whose payload does not parse
    OVERSIZE = "oversize"  # a length word beyond the configured limit
    UNEXPECTED = "unexpected"  # a legal packet at an illegal moment
    NEGOTIATION = "negotiation"  # an OPTNEG exchange that cannot be honoured
    TRUNCATED = "truncated"  # the peer closed in the middle of a packet or an exchange


class ProtocolError(Exception):
    """Base class; never raised itself."""

    def __init__(self, message: str, kind: ErrorKind = ErrorKind.UNEXPECTED) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError")
        super().__init__(message)
        self.kind = kind


class LocalProtocolError(ProtocolError):
    """We were asked to send or do something the protocol forbids."""

    def to_remote(self) -> RemoteProtocolError:
        """The same problem, blamed on the peer (used where peer bytes enter)."""
        return RemoteProtocolError(str(self), self.kind)


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""
