"""The running service: listeners, one session task per MTA connection, limits, signals, reload.

Every task lives in a nursery owned by whoever owns its lifetime: the admin HTTP listener and the
filter watcher belong to the :class:`Service`; the accept loop and the sessions to its sessions
nursery, inside it, so that the listeners can close while the sessions finish and the admin
listener still answers; each session's own tasks belong to the session.

Filter health: every milter is probed at start-up (which also fills the options cache the MTA's
OPTNEG is answered from) and then watched: one that is down or not reached yet is probed again
every :data:`RETRY_SECONDS`, every milter every :data:`REFRESH_SECONDS`. Each answer sets
``milterbridge_filter_up`` and the readiness. Without the retry a milter that is down while the
bridge starts would keep the bridge unready for good -- and an orchestrator sends no mail to an
unready bridge, so no session would ever find out that the milter came back.

Limits (design §12): at most ``maxSessions`` MTA sessions run at once; a connection beyond them
gets the refusal of server/refuse.py (TEMPFAIL at CONNECT, no upstream contacted). The count is
checked when a connection's task starts, with no checkpoint between the check and the session's
registration, so concurrent accepts cannot overshoot it. A connection that arrives when the
process has no file descriptor left gets the same refusal: the accept loop (server/accept.py)
holds one descriptor in reserve for exactly that, rather than leaving the MTA waiting in the
listen backlog until its connect timeout.

Stopping (design §2), :meth:`Service.stop`: the listeners close (a new connection is refused by
the kernel, so the MTA applies its own default at once instead of waiting on a backlog nobody
reads), ``/readyz`` turns 503, running sessions may finish until ``drainDeadline``; then every
session still open is abandoned -- a step in progress is answered TEMPFAIL, so the MTA keeps the
message and retries -- and whatever has not ended :data:`ABANDON_SECONDS` later is cancelled.
A second stop skips the wait.

Reload (SIGHUP), :meth:`Service.reload`: a new :class:`SessionFactory` for the new
configuration. The accept loop reads the current factory for each connection, and a session
keeps the factory (the configuration snapshot) it started with, so running sessions are never
switched to filters they did not negotiate for. What cannot change without closing listeners
(the milter listeners, their socket mode, the admin listener) is kept and named in a
``config_reload_partial`` line. A filter that disappears keeps its metric series until the last
session using it has ended: removing them earlier would make that session's next count fail.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import resource
import signal
import socket
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import structlog
import trio
from prometheus_client import CollectorRegistry

from .admin import Readiness, serve_admin
from .admin.store import FilterStore
from .config import EMBEDDED_DEFAULT, Config, ConfigError, MilterFilter, load_config
from .listeners import bound_address, open_listener, parse_listener
from .metrics import Metrics
from .milter import ALL_ACTIONS, ALL_PROTOCOL, OptNeg
from .server.accept import AcceptLoop
from .server.circuit import CircuitBreakers
from .server.filters import OptionsCache, endpoint_of
from .server.refuse import RefusalLog, refuse_session
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

    def session(self, stream: trio.abc.Stream) -> MtaSession:
        """A session on ``stream`` with this configuration (not started yet)."""
        server = self.config.server
        return MtaSession(
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
            idle_timeout=float(server.idle_timeout),
            defer_message_verdicts=server.defer_message_verdicts,
        )

    async def __call__(self, stream: trio.SocketStream) -> None:
        await self.session(stream).run()


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


def circuit_breakers(
    config: Config,
    metrics: Metrics,
    readiness: Readiness,
    milters: Collection[str] | None = None,
) -> CircuitBreakers:
    """The process's circuit breakers, reporting to the gauge and the readiness.

    ``milters`` are the names the readiness tracks, read at each report (the service passes a
    set it updates on reload: a session of the previous configuration may still report on a
    milter the readiness no longer knows); the config's milters by default.
    """

    tracked = {milter.name for milter in config.milter} if milters is None else milters

    def report(name: str, is_open: bool) -> None:
        metrics.filter_circuit(name, is_open)
        if name in tracked:  # the readiness follows the milters only (hooks are not probed)
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


@dataclass(frozen=True)
class ConfigSource:
    """Where the configuration comes from, and what the command line overrides in it.

    The same overrides apply at start and at every reload, so that a reload compares like with
    like: without them, ``--listen`` would look like a change of ``listen`` on every SIGHUP.
    """

    #: The file; None: the embedded default (then there is nothing to reload).
    path: Path | None = None
    #: ``--listen``: replaces ``[server] listen``.
    listen: tuple[str, ...] | None = None
    #: ``--admin-listen``: replaces ``[admin] listen``.
    admin_listen: str | None = None
    #: Added to the admin port (worker i of ``--workers`` listens on port + i).
    admin_offset: int = 0

    def load(self) -> Config:
        """Read and validate the file, then apply the overrides. Raises ConfigError."""
        config = EMBEDDED_DEFAULT if self.path is None else load_config(self.path)
        return self.apply(config)

    def apply(self, config: Config) -> Config:
        """``config`` with the command line's overrides. Raises ConfigError (admin port)."""
        server, admin = config.server, config.admin
        if self.listen is not None:
            server = msgspec.structs.replace(server, listen=list(self.listen))
        listen = admin.listen if self.admin_listen is None else self.admin_listen
        if listen and self.admin_offset:
            listen = offset_port(listen, self.admin_offset)
        if listen != admin.listen:
            admin = msgspec.structs.replace(admin, listen=listen)
        return msgspec.structs.replace(config, server=server, admin=admin)


def offset_port(listen: str, offset: int) -> str:
    """``HOST:PORT`` with the port moved by ``offset`` (port 0 stays 0: any free port).

    Raises:
        ConfigError: the port would pass 65535.
    """
    prefix, _, port = listen.rpartition(":")
    if int(port) == 0:
        return listen
    moved = int(port) + offset
    if moved > 65535:
        raise ConfigError(f"admin listen {listen!r}: port {moved} (port + {offset}) is above 65535")
    return f"{prefix}:{moved}"


#: How long abandoned sessions may take to answer the MTA and say goodbye to their milters
#: (each bounded by the session's own GOODBYE_SECONDS for both) before they are cancelled.
ABANDON_SECONDS = 5.0


class Service:
    """One process's bridge: listeners, sessions, admin listener, filter watcher; stop, reload.

    Args:
        config: the configuration to start with.
        source: where it came from, for :meth:`reload`; None: nothing to reload.
        registry: where the metrics go; a fresh one by default, so that each service in a
            process (tests run many) has its own instruments and no names collide.
        readiness: the readiness ``/readyz`` shows; a new one by default.
        inherited: for a worker of ``--workers``: how to open each of ``listen``'s specs, as
            ``fd:N`` (a listening socket the supervisor passed down) or a spec with the port the
            supervisor reserved (opened with SO_REUSEPORT). See milterbridge/workers.py.
    """

    def __init__(
        self,
        config: Config,
        *,
        source: ConfigSource | None = None,
        registry: CollectorRegistry | None = None,
        readiness: Readiness | None = None,
        inherited: Mapping[str, str] | None = None,
        store: FilterStore | None = None,
    ) -> None:
        #: What the file (and the command line) say, without the filters created through /api.
        self.file_config = config
        #: The filters of the file and of the admin API's state file (design §10).
        self.store = FilterStore.open(config) if store is None else store
        self.store.on_change.append(self._api_changed)
        config = self.store.merged(config)
        self.config = config
        self.source = source
        self.registry = CollectorRegistry() if registry is None else registry
        # XXX: hooks get metric series (the session counts their requests) but are neither probed
        # nor tracked by the readiness until the hook client can tell whether one is reachable.
        self._milter_names = {m.name for m in config.milter}
        self.readiness = Readiness() if readiness is None else readiness
        self.metrics = Metrics(self.registry, [item.name for item in config.filters])
        self.store.on_write_error.append(lambda _: self.metrics.state_write_failed())
        self.inherited = dict(inherited or {})
        self.client_counts = ClientCounts()
        #: The open sessions, each with the factory (configuration) it started with.
        self._sessions: dict[MtaSession, SessionFactory] = {}
        self._session_ended = trio.Event()
        self._factory: SessionFactory | None = None
        self._background: trio.Nursery | None = None
        self._refusals = RefusalLog()
        #: Filter names removed by a reload whose series wait for their last session to end.
        self._retired: set[str] = set()
        self._watch_scope = trio.CancelScope()
        self._watch_generation = 0
        self._accept_scope = trio.CancelScope()
        self._accept_closed = trio.Event()
        self._stop = trio.Event()
        self._cut_short = False
        self._drain_wait: trio.CancelScope | None = None
        self._abandoning = False

    # --- what callers see -------------------------------------------------------------------

    @property
    def open_sessions(self) -> int:
        """MTA sessions running now (refused connections not counted)."""
        return len(self._sessions)

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stop.is_set()

    def stop(self) -> None:
        """Drain and end :meth:`run` (SIGTERM, SIGINT). A later call skips the drain's wait."""
        if not self._stop.is_set():
            self._stop.set()
            return
        self._cut_short = True
        if self._drain_wait is not None:
            self._drain_wait.cancel()

    def reload(self) -> bool:
        """Re-read the configuration file and :meth:`apply` it (SIGHUP). Logs the outcome.

        Returns:
            Whether a new configuration was applied (False: no file, a broken file, not
            running, or stopping; the old configuration stays).
        """
        if self.source is None or self.source.path is None:
            log.warning("config_reload_skipped", reason="no config file: nothing to reload")
            return False
        if self.stopping or self._factory is None:
            reason = "stopping" if self.stopping else "not running yet"
            log.warning("config_reload_skipped", reason=reason)
            return False
        try:
            config = self.source.load()
            self.store.reload(config)  # the state file too: another worker may have written it
        except ConfigError as exc:
            log.error("config_reload_failed", error=str(exc))
            return False
        self.file_config = config
        self.apply(self.store.merged(config))
        return True

    def _api_changed(self) -> None:
        """A filter was created, changed or removed through /api: new sessions use the result."""
        if self._factory is not None and not self.stopping:
            self.apply(self.store.merged(self.file_config))

    def apply(self, new: Config) -> None:
        """Run ``new`` for the sessions that start from now on (the reload minus the file).

        Raises:
            RuntimeError: the service is not running (before :meth:`run` reported, or after it
                ended).
        """
        factory, background = self._factory, self._background
        if factory is None or background is None:
            raise RuntimeError("the service is not running")
        old = self.config
        new = self._keep_listeners(old, new)
        old_milters = {m.name: m for m in old.milter}
        new_milters = {m.name: m for m in new.milter}
        # A milter that is reached elsewhere or offered something else is another filter as
        # far as its cached options, its readiness and its circuit are concerned; a change of
        # its timeouts, stages or enable is not.
        moved = {
            name
            for name, milter in new_milters.items()
            if name in old_milters and _peer(milter) != _peer(old_milters[name])
        }
        old_filters = {item.name: item for item in old.filters}
        new_names = [item.name for item in new.filters]
        added = [name for name in new_names if name not in old_filters]
        removed = [name for name in old_filters if name not in new_names]
        changed = [
            item.name
            for item in new.filters
            if item.name in old_filters and old_filters[item.name] != item
        ]
        for name in sorted(moved | set(removed)):
            # Forget the failures counted against what is now another filter, or none.
            factory.breakers.succeeded(name)
        _update_breakers(factory.breakers, new)
        for name in new_names:
            self.metrics.add_filter(name)
        self._retired = (self._retired | set(removed)) - set(new_names)
        # Twice: a moved milter loses its state ("unknown" until probed), the others keep it.
        self.readiness.set_filters([name for name in new_milters if name not in moved])
        self.readiness.set_filters(list(new_milters))
        self._milter_names.clear()
        self._milter_names.update(new_milters)
        cache = {
            name: options
            for name, options in factory.cache.items()
            if name in new_milters and name not in moved
        }
        self._factory = dataclasses.replace(factory, config=new, cache=cache)
        self.config = new
        self._start_watch(background, new.milter, cache)
        self._prune_filters()
        log.info(
            "config_reloaded",
            filters=new_names,
            added=added,
            removed=removed,
            changed=changed,
        )

    # --- running ----------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[ServiceAddresses] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and serve until :meth:`stop` has drained the sessions, or until cancelled.

        Reports the bound addresses once listening.

        Raises:
            CannotListen: a listener cannot be opened (from inside a nursery once the milter
                listeners run, so then wrapped in an ExceptionGroup: catch it with ``except*``).
        """
        config = self.config
        self.readiness.set_filters([milter.name for milter in config.milter])
        self.readiness.config_loaded = True
        listeners = await self._open_listeners(config)
        accepting = False
        try:
            async with HookClient() as hook_client, trio.open_nursery() as background:
                breakers = circuit_breakers(
                    config, self.metrics, self.readiness, self._milter_names
                )
                cache: OptionsCache = {}
                self._factory = SessionFactory(
                    config, cache, hook_client, self.metrics, breakers, self.client_counts
                )
                self._background = background
                admin: str | None = None
                if config.admin.listen:
                    try:
                        admin = await background.start(
                            functools.partial(
                                serve_admin,
                                config.admin.listen,
                                self.registry,
                                self.readiness,
                                store=self.store,
                                tokens=config.admin.token,
                            )
                        )
                    except OSError as exc:
                        raise CannotListen(
                            f"admin {config.admin.listen}: {exc.strerror or exc}"
                        ) from exc
                self._start_watch(background, config.milter, cache)
                async with trio.open_nursery() as sessions:
                    addresses = ServiceAddresses([bound_address(item) for item in listeners], admin)
                    # From here the accept loop owns the listeners and closes them when it ends.
                    accepting = True
                    await sessions.start(self._accept, listeners, sessions)
                    self.readiness.listening = True
                    log.info("listening", addresses=list(addresses), admin=admin)
                    task_status.started(addresses)
                    await self._stop.wait()
                    await self._drain(sessions)
                background.cancel_scope.cancel()
        finally:
            self.readiness.listening = False
            self._factory = self._background = None
            if not accepting:
                for listener in listeners:
                    await trio.aclose_forcefully(listener)

    async def _open_listeners(self, config: Config) -> list[trio.SocketListener]:
        mode = int(config.server.socket_mode, 8)
        listeners: list[trio.SocketListener] = []
        try:
            for spec in config.server.listen:
                try:
                    listeners.append(await self._open_listener(spec, mode))
                except OSError as exc:
                    raise CannotListen(f"{spec}: {exc.strerror or exc}") from exc
        except BaseException:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            raise
        return listeners

    async def _open_listener(self, spec: str, mode: int) -> trio.SocketListener:
        target = self.inherited.get(spec)
        if target is None:
            return await open_listener(parse_listener(spec), unix_mode=mode)
        if target.startswith("fd:"):
            sock = socket.socket(fileno=int(target.removeprefix("fd:")))
            return trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        return await open_listener(parse_listener(target), reuse_port=True)

    async def _accept(
        self,
        listeners: list[trio.SocketListener],
        sessions: trio.Nursery,
        task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        loop = AcceptLoop(self._handle, self._refuse_exhausted, sessions)
        try:
            with self._accept_scope:
                await loop.serve(listeners, task_status=task_status)
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            self._accept_closed.set()

    async def _handle(self, stream: trio.SocketStream) -> None:
        """One accepted connection: a session with the current factory, or the refusal."""
        factory = self._factory
        assert factory is not None, "connections are accepted only while running"
        server = factory.config.server
        if len(self._sessions) >= server.max_sessions:
            self.metrics.limit_hit("max_sessions")
            self._refusals.refused("max_sessions", limit=server.max_sessions)
            await refuse_session(stream)
            return
        session = factory.session(stream)
        self._sessions[session] = factory
        if self._abandoning:  # accepted just before the listeners closed, started after
            session.abandon()
        try:
            await session.run()
        finally:
            del self._sessions[session]
            ended, self._session_ended = self._session_ended, trio.Event()
            ended.set()
            if self._retired:
                self._prune_filters()

    async def _refuse_exhausted(self, stream: trio.SocketStream, error: OSError) -> None:
        """A connection accepted with the reserve descriptor (server/accept.py): the refusal.

        The MTA hears TEMPFAIL at CONNECT at once, instead of waiting in the backlog until its
        connect timeout and then applying ``milter_default_action``.
        """
        self.metrics.limit_hit("file_descriptors")
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self._refusals.refused(
            "fd_exhausted", error=error.strerror, limit=soft, sessions=len(self._sessions)
        )
        await refuse_session(stream)

    async def _drain(self, sessions: trio.Nursery) -> None:
        self._accept_scope.cancel()
        await self._accept_closed.wait()
        self.readiness.listening = False
        deadline = float(self.config.server.drain_deadline)
        log.info("draining", sessions=len(self._sessions), deadline=deadline)
        with trio.move_on_after(deadline) as self._drain_wait:
            if self._cut_short:
                self._drain_wait.cancel()
            while self._sessions:
                await self._session_ended.wait()
        self._abandoning = True
        left = list(self._sessions)
        if left:
            log.warning(
                "drain_abandoned",
                sessions=len(left),
                reason="second_signal" if self._cut_short else "drain_deadline",
            )
        for session in left:
            self.metrics.limit_hit("drain_deadline")
            session.abandon()
        # Abandoned sessions and refusals end on their own within their bounds; this is the
        # backstop for anything that does not.
        sessions.cancel_scope.deadline = trio.current_time() + ABANDON_SECONDS

    def _start_watch(
        self, nursery: trio.Nursery, milters: Sequence[MilterFilter], cache: OptionsCache
    ) -> None:
        """(Re)start the filter watcher on ``milters``; the previous one is cancelled.

        A probe of the previous watcher may still complete after the cancel (its result was
        already on the way); the generation check drops its report, which could name a milter
        the readiness no longer tracks.
        """
        self._watch_scope.cancel()
        self._watch_scope = scope = trio.CancelScope()
        self._watch_generation += 1
        generation = self._watch_generation
        health = filter_health(self.metrics, self.readiness)

        def report(name: str, failure: UpstreamFailure | None) -> None:
            if generation == self._watch_generation:
                health(name, failure)

        async def watch() -> None:
            with scope:
                await watch_filters(list(milters), cache, report)

        nursery.start_soon(watch)

    def _keep_listeners(self, old: Config, new: Config) -> Config:
        """``new`` with the listeners ``old`` runs on; logs the differences it leaves out."""
        not_applied = [
            key
            for key, before, after in (
                ("server.listen", old.server.listen, new.server.listen),
                ("server.socketMode", old.server.socket_mode, new.server.socket_mode),
                ("admin.listen", old.admin.listen, new.admin.listen),
            )
            if before != after
        ]
        if not not_applied:
            return new
        log.warning("config_reload_partial", not_applied=not_applied, reason="needs a restart")
        server = msgspec.structs.replace(
            new.server, listen=old.server.listen, socket_mode=old.server.socket_mode
        )
        admin = msgspec.structs.replace(new.admin, listen=old.admin.listen)
        return msgspec.structs.replace(new, server=server, admin=admin)

    def _prune_filters(self) -> None:
        """Drop the series of removed filters that no running session uses any more."""
        in_use = {item.name for item in self.config.filters}
        configs = {id(factory.config): factory.config for factory in self._sessions.values()}
        for config in configs.values():
            in_use.update(item.name for item in config.filters)
        for name in sorted(self._retired - in_use):
            self.metrics.remove_filter(name)
        self._retired &= in_use


def _peer(milter: MilterFilter) -> tuple[object, ...]:
    """Who a milter is and what it is offered: everything its negotiated options depend on."""
    return (
        milter.hostname,
        milter.port,
        milter.unix_path,
        milter.use_tls,
        milter.allow_invalid_certs,
        milter.protocol_version,
        milter.flags_action,
        milter.flags_protocol,
    )


def _update_breakers(breakers: CircuitBreakers, config: Config) -> None:
    """Apply the reloaded circuit settings to the process's breakers (their state is kept)."""
    server = config.server
    breakers.threshold = server.circuit_failures
    breakers.backoff = float(server.circuit_backoff)
    breakers.backoff_max = max(breakers.backoff, float(server.circuit_backoff_max))


async def serve(
    config: Config,
    *,
    registry: CollectorRegistry | None = None,
    readiness: Readiness | None = None,
    task_status: trio.TaskStatus[ServiceAddresses] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen and serve MTA connections until cancelled (a :class:`Service` without controls).

    Raises:
        CannotListen: as :meth:`Service.run`.
    """
    service = Service(config, registry=registry, readiness=readiness)
    await service.run(task_status=task_status)


#: For a worker: a stop signal this soon after the previous one is the same request twice. The
#: supervisor forwards SIGTERM to its workers, and a service manager that signals the whole
#: group (systemd's default KillMode=control-group) delivers it to them as well: without this
#: the second copy would cut every drain short.
DUPLICATE_SIGNAL_SECONDS = 1.0
#: How often a worker checks that its supervisor is still there.
PARENT_CHECK_SECONDS = 1.0


async def run_until_signalled(
    config: Config,
    source: ConfigSource | None = None,
    *,
    inherited: Mapping[str, str] | None = None,
    supervisor_pid: int | None = None,
    ready: Callable[[], None] | None = None,
    store: FilterStore | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT has drained the sessions; SIGHUP reloads the config.

    Args:
        config: the configuration to start with (loaded from ``source``).
        source: where it came from, for SIGHUP.
        inherited: the listeners a worker inherits (see :class:`Service`).
        supervisor_pid: for a worker: its supervisor. The worker stops when it is gone (killed
            with SIGKILL, say), instead of serving on unsupervised.
        ready: called once the signal handlers are installed and the service listens.
    """
    service = Service(config, source=source, inherited=inherited, store=store)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_obey, signals, service, supervisor_pid is not None)
            if supervisor_pid is not None:
                nursery.start_soon(_watch_supervisor, supervisor_pid, service)

            async def run(
                task_status: trio.TaskStatus[ServiceAddresses] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                await service.run(task_status=task_status)
                nursery.cancel_scope.cancel()

            await nursery.start(run)
            if ready is not None:
                ready()


async def _obey(signals: AsyncIterator[int], service: Service, debounce: bool) -> None:
    last_stop: float | None = None
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            log.info("reload_requested", signal=name)
            service.reload()
            continue
        now = trio.current_time()
        if debounce and last_stop is not None and now - last_stop < DUPLICATE_SIGNAL_SECONDS:
            continue
        last_stop = now
        if service.stopping:
            log.warning("stopping_now", signal=name, sessions=service.open_sessions)
        else:
            log.info("stopping", signal=name, sessions=service.open_sessions)
        service.stop()


async def _watch_supervisor(pid: int, service: Service) -> None:
    # Polled: nothing wakes a process when its parent dies (PR_SET_PDEATHSIG is Linux-only and
    # tied to the parent's thread), and one getppid() a second costs nothing.
    while os.getppid() == pid:  # noqa: ASYNC110
        await trio.sleep(PARENT_CHECK_SECONDS)
    log.warning("supervisor_gone", supervisor_pid=pid)
    service.stop()
