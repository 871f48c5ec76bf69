"""The running service: listeners, one session task per MTA connection, signal handling.

Every task lives in a nursery owned by whoever owns its lifetime: the listeners and sessions
belong to ``serve``; each session's own tasks belong to the session.
"""

from __future__ import annotations

import signal
from functools import partial

import structlog
import trio

from .config import Config, MilterFilter
from .listeners import bound_address, open_listener, parse_listener
from .milter import ALL_ACTIONS, ALL_PROTOCOL, DEFAULT_MAX_PACKET, OptNeg
from .server.filters import OptionsCache, endpoint_of
from .server.session import MtaSession, new_session_id
from .upstream import UpstreamFailure, connect_upstream

log = structlog.get_logger("milterbridge")

#: What the start-up probe offers each milter: Postfix's default offer (protocol 6, everything).
PROBE_OFFER = OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL)


async def _handle_mta(
    stream: trio.SocketStream,
    *,
    max_packet: int,
    filters: list[MilterFilter],
    cache: OptionsCache,
) -> None:
    session = MtaSession(
        stream,
        max_packet=max_packet,
        session_id=new_session_id(),
        filters=filters,
        options_cache=cache,
    )
    await session.run()


async def probe_filters(filters: list[MilterFilter], cache: OptionsCache) -> None:
    """Learn each milter's options once, so the MTA's OPTNEG can be answered from them.

    Until a milter has been reached it counts as wanting everything, which is always correct,
    only slower; a milter that cannot be reached now is simply probed again when it joins.
    """

    async def probe(config: MilterFilter) -> None:
        try:
            client = await connect_upstream(endpoint_of(config), PROBE_OFFER)
        except UpstreamFailure as failure:
            log.warning("probe_failed", filter=config.name, kind=failure.kind.value)
            return
        cache[config.name] = client.negotiated
        await client.quit()

    async with trio.open_nursery() as nursery:
        for config in filters:
            nursery.start_soon(probe, config)


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
    cache: OptionsCache = {}
    handler = partial(
        _handle_mta, max_packet=DEFAULT_MAX_PACKET, filters=list(config.milter), cache=cache
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe_filters, list(config.milter), cache)
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
