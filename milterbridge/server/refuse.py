"""The answer to an MTA connection the bridge cannot serve: TEMPFAIL at CONNECT, no filter asked.

Two reasons lead here: the connection is one beyond ``maxSessions``, or the process ran out of
file descriptors and accepted it with the one it keeps in reserve (server/accept.py); either way
the refusal itself needs nothing beyond the connection it answers.

A bridge at its limit must not start a real session (that would contact the upstreams and use
the memory the limit protects), and must not simply drop the connection either: the MTA would
then apply its ``milter_default_action``, which may be ``accept`` -- letting the mail through
unfiltered. So the refusal speaks just enough milter to say "not now": it answers OPTNEG asking
for nothing but CONNECT (no edits, no macros, every other step declined where the MTA allows
it) and answers CONNECT with TEMPFAIL. Postfix then greets the SMTP client normally and answers
each of its later commands 451 4.7.1; Sendmail enters its tempfail mode (protocol notes §5.4).
Both end the milter conversation there: Postfix closes the socket, Sendmail sends QUIT.

Anything else the MTA still sends is answered TEMPFAIL when it expects an answer, until it closes
or :data:`REFUSE_SECONDS` pass; a peer that breaks the protocol is simply dropped. Nothing here
logs or counts: the caller does, once per refusal and rate-limited (:class:`RefusalLog`).
"""

from __future__ import annotations

import structlog
import trio

from ..milter import (
    CLOSED,
    DEFAULT_MAX_PACKET,
    Action,
    Connection,
    OptNeg,
    Protocol,
    ProtocolError,
    Quit,
    Role,
    Tempfail,
    answer_offer,
)
from ..transport import MilterStream

log = structlog.get_logger("milterbridge.session")

#: How long a refused connection may take in all, from accept to close. Postfix closes right
#: after the TEMPFAIL; the bound is for an MTA that does not, so refusals cannot pile up.
REFUSE_SECONDS = 5.0

#: Every step but CONNECT declined: the MTA then has nothing else to send us (it narrows these to
#: the bits it offered, as ``answer_offer`` does for every filter answer).
REFUSE_PROTOCOL = (
    Protocol.NOHELO
    | Protocol.NOMAIL
    | Protocol.NORCPT
    | Protocol.NOBODY
    | Protocol.NOHDRS
    | Protocol.NOEOH
    | Protocol.NOUNKNOWN
    | Protocol.NODATA
)


async def refuse_session(
    stream: trio.abc.Stream,
    *,
    max_packet: int = DEFAULT_MAX_PACKET,
    within: float = REFUSE_SECONDS,
) -> bool:
    """Answer the MTA's CONNECT with TEMPFAIL and close the stream (always, also on errors).

    Returns:
        Whether the TEMPFAIL was sent (False: the MTA went away or broke the protocol first, or
        did not get that far ``within`` seconds).
    """
    milter = MilterStream(stream, Connection(Role.FILTER, max_packet=max_packet))
    answered = False
    try:
        with trio.move_on_after(within):
            while True:
                event = await milter.receive()
                if event is CLOSED or isinstance(event, Quit):
                    break
                if isinstance(event, OptNeg):
                    reply = answer_offer(event, actions=Action.NONE, protocol=REFUSE_PROTOCOL)
                    await milter.send(reply)
                elif milter.connection.awaiting is not None:
                    await milter.send(Tempfail())
                    answered = True
    except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)
    return answered


class RefusalLog:
    """At most one ``session_refused`` line per :attr:`interval` and reason, whatever the rate.

    A bridge at its limit is usually being flooded; a line per refused connection would add a
    flood of log writes to the load that caused it. The line carries how many refusals for the
    same reason were not logged since the previous one (``suppressed``); the metric counts every
    refusal. Each reason has its own interval, so that a flood of one never hides the other.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        #: Per reason: when its last line was logged, and the refusals since.
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def refused(self, reason: str, **fields: object) -> None:
        """Log this refusal, or count it for the next line when one was logged too recently."""
        now = trio.current_time()
        last = self._last.get(reason)
        if last is not None and now - last < self.interval:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        suppressed = self._suppressed.pop(reason, 0)
        log.warning("session_refused", reason=reason, suppressed=suppressed, **fields)
        self._last[reason] = now


__all__ = ["REFUSE_PROTOCOL", "REFUSE_SECONDS", "RefusalLog", "refuse_session"]
