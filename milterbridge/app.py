"""The running service: listeners, one session task per MTA connection, signal handling.

Every task lives in a nursery owned by whoever owns its lifetime: the listeners and sessions
belong to ``serve``; each session's own tasks belong to the session.
"""

from __future__ import annotations

import signal
from functools import partial

import structlog
import trio

from .config import Config
from .listeners import bound_address, open_listener, parse_listener
from .milter import DEFAULT_MAX_PACKET
from .server.session import MtaSession, new_session_id

log = structlog.get_logger("milterbridge")


async def _handle_mta(stream: trio.SocketStream, *, max_packet: int) -> None:
    await MtaSession(stream, max_packet=max_packet, session_id=new_session_id()).run()


async def serve(
    config: Config,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen and serve MTA connections until cancelled. Reports the bound addresses."""
    mode = int(config.server.socket_mode, 8)
    listeners: list[trio.SocketListener] = []
    try:
        for spec in config.server.listen:
            listeners.append(await open_listener(parse_listener(spec), unix_mode=mode))
    except BaseException:
        for listener in listeners:
            await listener.aclose()
        raise
    handler = partial(_handle_mta, max_packet=DEFAULT_MAX_PACKET)
    async with trio.open_nursery() as nursery:
        # From here serve_listeners owns the listeners and closes them when it ends.
        await nursery.start(trio.serve_listeners, handler, listeners)
        addresses = [bound_address(listener) for listener in listeners]
        log.info("listening", addresses=addresses)
        task_status.started(addresses)


async def run_until_signalled(config: Config) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting and end running sessions."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, config)
            async for signum in signals:
                log.info("stopping", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
