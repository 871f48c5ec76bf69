"""A session whose every milter fails to join: the MTA connection is closed.

The failure classes of one milter, of a hook and of the MTA, each under both error policies, are
the fault matrix in tests/faults/. This module keeps the case that matrix has no row for, and the
names other session tests import from here (``MESSAGE``, ``_filter``, ``healthy``).
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from milterbridge.milter import ALL_ACTIONS, ALL_PROTOCOL, Connection, OptNeg, Role
from milterbridge.server.session import MtaSession
from milterbridge.transport import MilterStream
from tests.faults.harness import MESSAGE, STAGES, closed_port, healthy, milter_filter

#: A milter joining at connect, with short timeouts (kept under its old name for its importers).
_filter = milter_filter


async def test_every_filter_failing_to_join_closes_the_mta_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """No filter reachable: the MTA connection is dropped so its default action decides."""
    filters = [_filter("a", closed_port(), True), _filter("b", closed_port(), False)]
    mta_stream, session_stream = trio.testing.memory_stream_pair()
    session = MtaSession(session_stream, max_packet=1 << 20, session_id="s", filters=filters)
    mta = MilterStream(mta_stream, Connection(Role.MTA))
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            await mta.send(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
            await mta.receive()
            await mta.send(MESSAGE[0])
            with pytest.raises(Exception, match="without answering Connect"):
                await mta.receive()
    (end,) = [line for line in logs if line["event"] == "session_end"]
    assert end["outcome"] == "all_filters_failed"


__all__ = ["MESSAGE", "STAGES", "_filter", "healthy"]
