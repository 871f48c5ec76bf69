"""The running service: listeners, one session task per MTA connection, signal handling.

Every task lives in a nursery owned by whoever owns its lifetime: the listeners, the admin HTTP
listener, the filter watcher and the sessions belong to ``serve``; each session's own tasks
belong to the session.

Filter health: every milter is probed at start-up (which also fills the options cache the MTA's
OPTNEG is answered from) and then watched: one that is down or not reached yet is probed again
every :data:`RETRY_SECONDS`, every milter every :data:`REFRESH_SECONDS`. Each answer sets
``milterbridge_filter_up`` and the readiness. Without the retry a milter that is down while the
bridge starts would keep the bridge unready for good -- and an orchestrator sends no mail to an
unready bridge, so no session would ever find out that the milter came back.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog
import trio
from prometheus_client import CollectorRegistry

from .admin import Readiness, serve_admin
from .config import Config, MilterFilter
from .listeners import bound_address, open_listener, parse_listener
from .metrics import Metrics
from .milter import ALL_ACTIONS, ALL_PROTOCOL, OptNeg
from .server.circuit import CircuitBreakers
from .server.filters import OptionsCache, endpoint_of
from .server.session import ClientCounts, MtaSession, new_session_id
from .upstream import HookClient, UpstreamFailure, connect_upstream

log = structlog.get_logger("milterbridge")

#: What the start-up probe offers each milter: Postfix's default offer (protocol 6, everything).
PROBE_OFFER = OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL)


@dataclass(frozen=True)
class SessionFactory:
    """What every MTA session of one configuration shares, and how one is started."""

    config: Config
    cache: OptionsCache
    hook_client: HookClient
    metrics: Metrics
    breakers: CircuitBreakers
    client_counts: ClientCounts = field(default_factory=ClientCounts)

    async def __call__(self, stream: trio.SocketStream) -> None:
        server = self.config.server
        session = MtaSession(
            stream,
            max_packet=int(server.max_mta_packet),
            session_id=new_session_id(),
            filters=self.config.milter,
            hooks=self.config.hook,
            hook_client=self.hook_client,
            options_cache=self.cache,
            spool_memory=int(server.spool_memory),
            spool_directory=server.spool_directory,
            client_counts=self.client_counts,
            metrics=self.metrics,
            breakers=self.breakers,
            max_headers=server.max_headers,
            max_recipients=server.max_recipients,
        )
        await session.run()


#: How often a milter that is down (or never reached) is probed again.
RETRY_SECONDS = 10.0
#: How often every milter is probed, to notice one that went down while no session used it.
REFRESH_SECONDS = 60.0

#: Told the outcome of each probe: the filter's name and its failure, None when it answered.
ProbeReport = Callable[[str, UpstreamFailure | None], None]


async def probe_filters(
    filters: Sequence[MilterFilter], cache: OptionsCache, report: ProbeReport | None = None
) -> set[str]:
    """Learn each milter's options, so the MTA's OPTNEG can be answered from them.

    Until a milter has been reached it counts as wanting everything, which is always correct,
    only slower; a milter that cannot be reached now is simply probed again when it joins.

    Returns:
        The names of the milters that could not be reached.
    """
    failed: set[str] = set()

    async def probe(config: MilterFilter) -> None:
        try:
            client = await connect_upstream(endpoint_of(config), PROBE_OFFER)
        except UpstreamFailure as failure:
            failed.add(config.name)
            if report is not None:
                report(config.name, failure)
            return
        cache[config.name] = client.negotiated
        await client.quit()
        if report is not None:
            report(config.name, None)

    async with trio.open_nursery() as nursery:
        for config in filters:
            nursery.start_soon(probe, config)
    return failed


async def watch_filters(
    filters: Sequence[MilterFilter], cache: OptionsCache, report: ProbeReport
) -> None:
    """Probe every milter now, then keep probing (see the module docstring) until cancelled."""
    down = await probe_filters(filters, cache, report)
    last_full = trio.current_time()
    while True:
        await trio.sleep(RETRY_SECONDS if down else REFRESH_SECONDS)
        if not down or trio.current_time() - last_full >= REFRESH_SECONDS:
            targets, last_full = list(filters), trio.current_time()
        else:
            targets = [config for config in filters if config.name in down]
        failed = await probe_filters(targets, cache, report)
        down = (down - {config.name for config in targets}) | failed


def filter_health(metrics: Metrics, readiness: Readiness) -> ProbeReport:
    """Record probe outcomes; log a milter's failure and recovery once each, not per probe."""

    def report(name: str, failure: UpstreamFailure | None) -> None:
        before = readiness.state(name)
        metrics.filter_up(name, failure is None)
        if failure is None:
            readiness.filter_reachable(name)
            if before == "unreachable":
                log.info("filter_reachable", filter=name)
            return
        readiness.filter_unreachable(name, f"{failure.kind.value}: {failure.cause}")
        if before != "unreachable":
            log.warning("probe_failed", filter=name, kind=failure.kind.value, cause=failure.cause)

    return report


def circuit_breakers(config: Config, metrics: Metrics, readiness: Readiness) -> CircuitBreakers:
    """The process's circuit breakers, reporting to the gauge and the readiness."""

    milters = {milter.name for milter in config.milter}

    def report(name: str, is_open: bool) -> None:
        metrics.filter_circuit(name, is_open)
        if name in milters:  # the readiness follows the milters only (hooks are not probed)
            readiness.filter_circuit(name, is_open)

    server = config.server
    return CircuitBreakers(
        failures=server.circuit_failures,
        backoff=float(server.circuit_backoff),
        backoff_max=float(server.circuit_backoff_max),
        report=report,
    )


class CannotListen(Exception):
    """A listener (milter or admin) cannot be opened: the address is taken, not ours, or not
    allowed. The message names the listener and the operating system's reason.
    """


class ServiceAddresses(list[str]):
    """What ``serve`` reports: the milter listeners' addresses, as a list (as before the admin
    listener existed), and the admin listener's ``HOST:PORT`` in :attr:`admin` (None when off).
    """

    def __init__(self, milter: Sequence[str], admin: str | None) -> None:
        super().__init__(milter)
        self.admin = admin


async def serve(
    config: Config,
    *,
    registry: CollectorRegistry | None = None,
    readiness: Readiness | None = None,
    task_status: trio.TaskStatus[ServiceAddresses] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen and serve MTA connections until cancelled. Reports the bound addresses.

    Args:
        config: the configuration to run.
        registry: where the metrics go; a fresh one by default, so that each ``serve`` in a
            process (tests run many) has its own instruments and no names collide.
        readiness: the readiness ``/readyz`` shows; a new one by default.

    Raises:
        CannotListen: a listener cannot be opened (from inside a nursery once the milter
            listeners run, so then wrapped in an ExceptionGroup: catch it with ``except*``).
    """
    registry = CollectorRegistry() if registry is None else registry
    names = [item.name for item in config.filters]
    # XXX: hooks get metric series (the session counts their requests) but are neither probed
    # nor tracked by the readiness until the hook client can tell whether one is reachable.
    milters = list(config.milter)
    readiness = Readiness([m.name for m in milters]) if readiness is None else readiness
    readiness.set_filters([m.name for m in milters])
    readiness.config_loaded = True
    metrics = Metrics(registry, names)
    mode = int(config.server.socket_mode, 8)
    listeners: list[trio.SocketListener] = []
    try:
        for spec in config.server.listen:
            try:
                listeners.append(await open_listener(parse_listener(spec), unix_mode=mode))
            except OSError as exc:
                raise CannotListen(f"{spec}: {exc.strerror or exc}") from exc
    except BaseException:
        for listener in listeners:
            await listener.aclose()
        raise
    cache: OptionsCache = {}
    try:
        async with HookClient() as hook_client, trio.open_nursery() as nursery:
            breakers = circuit_breakers(config, metrics, readiness)
            handler = SessionFactory(config, cache, hook_client, metrics, breakers)
            # From here serve_listeners owns the listeners and closes them when it ends.
            await nursery.start(trio.serve_listeners, handler, listeners)
            admin: str | None = None
            if config.admin.listen:
                try:
                    admin = await nursery.start(
                        serve_admin, config.admin.listen, registry, readiness
                    )
                except OSError as exc:
                    raise CannotListen(
                        f"admin {config.admin.listen}: {exc.strerror or exc}"
                    ) from exc
            nursery.start_soon(watch_filters, milters, cache, filter_health(metrics, readiness))
            addresses = ServiceAddresses([bound_address(item) for item in listeners], admin)
            readiness.listening = True
            log.info("listening", addresses=list(addresses), admin=admin)
            task_status.started(addresses)
    finally:
        readiness.listening = False


async def run_until_signalled(config: Config) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting and end running sessions."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, config)
            async for signum in signals:
                log.info("stopping", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
