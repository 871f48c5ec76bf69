"""One MTA connection: we play the filter.

This is the pass-through session of the foundation: it negotiates every step with the MTA,
answers CONTINUE to each step that wants a reply and ACCEPT at end-of-message, and forgets
nothing between messages. The fan-out engine replaces the answering, not the loop.

Lifetime: the session owns its stream (the listener's handler closes it); it ends on QUIT, on the
MTA closing the connection at any byte, or on a protocol error, and in each case logs exactly one
``session_end`` line.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import structlog
import trio

from ..milter import (
    CLOSED,
    Abort,
    Accept,
    Action,
    Connect,
    Connection,
    Continue,
    EndOfMessage,
    Mail,
    OptNeg,
    Protocol,
    ProtocolError,
    Quit,
    QuitNoClose,
    Role,
    answer_offer,
)
from ..transport import MilterStream

log = structlog.get_logger("milterbridge.session")

#: What the pass-through asks of the MTA: every step, every reply (no NO_*/NR_* bits), no edits.
PASS_THROUGH_ACTIONS = Action.NONE
PASS_THROUGH_PROTOCOL = Protocol.NONE


def new_session_id() -> str:
    return secrets.token_hex(6)


@dataclass
class SessionStats:
    """What the session_end line reports."""

    client: str | None = None
    messages: int = 0
    aborts: int = 0
    commands: int = 0
    outcome: str = "closed"
    error: str | None = None
    started: float = field(default_factory=trio.current_time)


class MtaSession:
    """Drives one MTA connection through the codec in the filter role."""

    def __init__(self, stream: trio.abc.Stream, *, max_packet: int, session_id: str) -> None:
        self.session_id = session_id
        self.milter = MilterStream(stream, Connection(Role.FILTER, max_packet=max_packet))
        self.stats = SessionStats()

    async def run(self) -> None:
        """Serve the connection until it ends; never raises for the MTA's misbehaviour."""
        with structlog.contextvars.bound_contextvars(session_id=self.session_id):
            try:
                await self._serve()
            except ProtocolError as exc:
                self.stats.outcome, self.stats.error = "protocol_error", str(exc)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.stats.outcome, self.stats.error = "connection_lost", str(exc) or None
            finally:
                self._log_end()

    async def _serve(self) -> None:
        connection = self.milter.connection
        while True:
            event = await self.milter.receive()
            if event is CLOSED:
                return
            self.stats.commands += 1
            match event:
                case OptNeg():
                    await self.milter.send(
                        answer_offer(
                            event, actions=PASS_THROUGH_ACTIONS, protocol=PASS_THROUGH_PROTOCOL
                        )
                    )
                case Connect():
                    self.stats.client = event.address.decode("ascii", "replace") or None
                case Quit():
                    self.stats.outcome = "quit"
                    return
                case QuitNoClose():
                    self.stats.client = None
                case Abort():
                    self.stats.aborts += 1
                case Mail():
                    pass
                case EndOfMessage():
                    self.stats.messages += 1
                    await self.milter.send(Accept())
                    continue
            if connection.awaiting is not None:
                await self.milter.send(Continue())

    def _log_end(self) -> None:
        stats = self.stats
        log.info(
            "session_end",
            client=stats.client,
            messages=stats.messages,
            aborts=stats.aborts,
            commands=stats.commands,
            outcome=stats.outcome,
            error=stats.error,
            duration=round(trio.current_time() - stats.started, 6),
        )
