"""``--workers N``: a supervisor process and N worker processes sharing the milter listeners.

trio runs one thread, so one process uses one core; N workers use N (design §2). The parent
does no milter work at all. It

* **reserves the listeners** before any worker starts. An ``inet``/``inet6`` listener is bound
  here with SO_REUSEPORT but never listens: that resolves port 0 to a real port once, for every
  worker, and holds the port for the group, so that a worker restarting later rebinds the same
  one. Each worker then binds that port itself with SO_REUSEPORT and listens, and the kernel
  spreads new connections over the listening workers. A ``unix:`` listener has no SO_REUSEPORT:
  the parent binds and listens on it (mode and stale-file handling as in single-process mode),
  and every worker inherits the listening descriptor (``pass_fds``) and accepts on it: one
  accept queue, served by whichever worker is free;
* **starts the workers** as ``python -m milterbridge run`` with the parent's own options plus
  the internal ``--worker-index I`` and ``--worker-listeners`` (the reservations above). Worker I
  runs its admin listener on the admin port + I. Each worker reads the config file itself;
* **forwards** SIGTERM, SIGINT and SIGHUP to every worker. Workers run in a process group of
  their own so that a Ctrl-C in a terminal reaches them once, through the parent, and not also
  directly;
* **restarts** a worker that exits unless the parent is stopping: at once if it ran for at least
  :data:`STABLE_SECONDS`, else after a back-off that doubles from :data:`BACKOFF_FIRST` up to
  :data:`BACKOFF_MAX` -- a worker that dies at start (a broken config file, a taken admin port)
  must not make the parent spin;
* **stops** after SIGTERM/SIGINT once every worker has exited, with exit status 0. It closes
  its own copies of the listeners first (a unix socket then refuses connections as soon as the
  workers have closed theirs), and kills a worker still running when its drain and abandon time
  plus :data:`STOP_GRACE` have passed.

A worker checks once a second that its parent is still there and drains when it is not, so that
killing the parent with SIGKILL does not leave workers serving on unsupervised.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import structlog
import trio

from .listeners import InetSpec, UnixSpec, open_listener, parse_listener

log = structlog.get_logger("milterbridge.workers")

#: A worker that ran at least this long before it died is restarted at once.
STABLE_SECONDS = 10.0
#: The first back-off for a worker that died sooner; it doubles with each such death.
BACKOFF_FIRST = 1.0
#: The longest back-off.
BACKOFF_MAX = 30.0
#: Beyond the drain deadline, how long a stopping worker may take (abandoned sessions closing,
#: the interpreter exiting) before the parent kills it.
STOP_GRACE = 10.0

#: Builds worker ``index``'s command line, given the descriptor of its readiness pipe.
WorkerCommand = Callable[[int, int], Sequence[str]]


@dataclass
class Reservation:
    """The listeners the parent holds for its workers.

    ``plan`` maps each ``listen`` spec to how a worker opens it: ``fd:N`` for an inherited
    listening socket, or the spec with its real port (for SO_REUSEPORT). ``sockets`` are the
    parent's sockets, kept open until the parent exits; ``pass_fds`` the descriptors the
    workers inherit.
    """

    plan: dict[str, str] = field(default_factory=dict)
    sockets: list[trio.socket.SocketType] = field(default_factory=list)
    pass_fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


class ReservationError(Exception):
    """A listener cannot be reserved; the message names it and the operating system's reason."""


async def reserve_listeners(specs: Sequence[str], unix_mode: int) -> Reservation:
    """Bind every listener spec for the workers (see the module docstring).

    Raises:
        ReservationError: a listener cannot be bound; the sockets bound so far are closed.
        ListenerSpecError: a ``unix:`` path holds something that is not a socket.
    """
    reservation = Reservation()
    try:
        for spec in specs:
            try:
                await _reserve(reservation, spec, unix_mode)
            except OSError as exc:
                raise ReservationError(f"{spec}: {exc.strerror or exc}") from exc
    except BaseException:
        reservation.close()
        raise
    return reservation


async def _reserve(reservation: Reservation, spec: str, unix_mode: int) -> None:
    parsed = parse_listener(spec)
    if isinstance(parsed, UnixSpec):
        listener = await open_listener(parsed, unix_mode=unix_mode)
        reservation.sockets.append(listener.socket)
        reservation.pass_fds.append(listener.socket.fileno())
        reservation.plan[spec] = f"fd:{listener.socket.fileno()}"
        return
    sock = trio.socket.socket(parsed.family, socket.SOCK_STREAM)
    reservation.sockets.append(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if parsed.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    await sock.bind((parsed.host, parsed.port))
    host, port = sock.getsockname()[:2]
    reservation.plan[spec] = str(InetSpec(host, port, parsed.family))


def exit_status(returncode: int) -> dict[str, object]:
    """A process's end as log fields: its exit code, or the signal that killed it."""
    if returncode < 0:
        try:
            return {"signal": signal.Signals(-returncode).name}
        except ValueError:
            return {"signal": -returncode}
    return {"exit_code": returncode}


class Supervisor:
    """Keeps ``workers`` worker processes running until told to stop.

    Readiness: each worker is started with the write end of a pipe of its own, and writes one
    byte to it once its signal handlers are installed and it listens. Until then a signal's
    default action applies in the worker -- SIGHUP would kill a worker that is still importing
    -- so SIGHUP is held back for a worker not ready yet and sent when it is (it may have read
    the file before the change). SIGTERM and SIGINT go out at once: a worker not ready yet has
    no session to drain, and their default action ends it.

    Args:
        command: worker i's command line, given the descriptor of its readiness pipe.
        workers: how many.
        pass_fds: descriptors every worker inherits (the unix listeners).
        stop_timeout: seconds after SIGTERM before a worker still running is killed; a
            callable, read when the signal arrives, because SIGHUP may change the drain
            deadline it depends on.
        on_reload: called on SIGHUP before it is forwarded (the parent re-reads what it needs).
        on_stop: called once when stopping, before the signal is forwarded: the parent closes
            its copies of the listeners there, so that a unix socket stops taking connections
            when the workers close theirs (instead of queueing them until the parent exits).
    """

    def __init__(
        self,
        command: WorkerCommand,
        workers: int,
        *,
        pass_fds: Sequence[int] = (),
        stop_timeout: Callable[[], float] = lambda: 30.0 + STOP_GRACE,
        on_reload: Callable[[], None] | None = None,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.command = command
        self.workers = workers
        self.pass_fds = tuple(pass_fds)
        self.stop_timeout = stop_timeout
        self.on_reload = on_reload
        self.on_stop = on_stop
        #: The running worker processes, by index.
        self.running: dict[int, trio.Process] = {}
        #: The indexes of the running workers that said they are ready.
        self.ready: set[int] = set()
        #: Workers owed a SIGHUP that came before they were ready.
        self._reload_owed: set[int] = set()
        self._stopping = trio.Event()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> None:
        """Start the workers and keep them running; returns when all exited after a stop."""
        signals_of_interest = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        with trio.open_signal_receiver(*signals_of_interest) as signals:
            async with trio.open_nursery() as outer:
                outer.start_soon(self._forward, signals, outer)
                async with trio.open_nursery() as keepers:
                    for index in range(self.workers):
                        keepers.start_soon(self._keep, index)
                outer.cancel_scope.cancel()

    def stop(self, nursery: trio.Nursery) -> None:
        """Stop restarting workers; kill those still running after the stop timeout."""
        if self.stopping:
            return
        self._stopping.set()
        if self.on_stop is not None:
            self.on_stop()
        nursery.start_soon(self._kill_after, self.stop_timeout())

    async def _forward(self, signals: AsyncIterator[int], nursery: trio.Nursery) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            workers = sorted(self.running)
            if signum == signal.SIGHUP:
                if self.on_reload is not None:
                    self.on_reload()
                log.info("reload_forwarded", signal=name, workers=workers)
                self._reload_owed.update(index for index in workers if index not in self.ready)
                targets = [self.running[index] for index in workers if index in self.ready]
            else:
                if not self.stopping:
                    log.info("stopping", signal=name, workers=workers)
                    self.stop(nursery)
                else:
                    log.warning("stopping_now", signal=name, workers=workers)
                targets = [self.running[index] for index in workers]
            for process in targets:
                process.send_signal(signum)

    async def _kill_after(self, seconds: float) -> None:
        await trio.sleep(seconds)
        for index, process in sorted(self.running.items()):
            log.error("worker_killed", worker_index=index, pid=process.pid, after=seconds)
            process.kill()

    async def _keep(self, index: int) -> None:
        """Run worker ``index`` until stopping, restarting it (with back-off) when it dies."""
        delay = BACKOFF_FIRST
        while not self.stopping:
            started = trio.current_time()
            returncode, pid = await self._run_once(index)
            status = exit_status(returncode)
            if self.stopping:
                log.info("worker_exited", worker_index=index, pid=pid, **status)
                return
            lived = trio.current_time() - started
            wait = 0.0 if lived >= STABLE_SECONDS else delay
            delay = BACKOFF_FIRST if lived >= STABLE_SECONDS else min(delay * 2, BACKOFF_MAX)
            log.warning(
                "worker_died",
                worker_index=index,
                pid=pid,
                lived=round(lived, 3),
                restart_in=wait,
                **status,
            )
            with trio.move_on_after(wait):
                await self._stopping.wait()

    async def _run_once(self, index: int) -> tuple[int, int]:
        """Start worker ``index`` and wait for its end; returns its return code and pid."""
        ready_read, ready_write = os.pipe()
        try:
            process = await trio.lowlevel.open_process(
                list(self.command(index, ready_write)),
                pass_fds=(*self.pass_fds, ready_write),
                # A group of its own: a terminal's Ctrl-C reaches it once, through us.
                process_group=0,
            )
        except BaseException:
            os.close(ready_read)
            raise
        finally:
            os.close(ready_write)  # the worker holds the only copy: its end is our EOF
        self.running[index] = process
        log.info("worker_started", worker_index=index, pid=process.pid)
        if self.stopping:  # the stop came while it was being started: it missed the signal
            process.send_signal(signal.SIGTERM)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._await_ready, index, process, ready_read)
                await process.wait()
        finally:
            del self.running[index]
            self.ready.discard(index)
            self._reload_owed.discard(index)
            if process.returncode is None:  # we are being cancelled: take it along
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
        assert process.returncode is not None
        return process.returncode, process.pid

    async def _await_ready(self, index: int, process: trio.Process, fd: int) -> None:
        async with trio.lowlevel.FdStream(fd) as pipe:
            if not await pipe.receive_some(1):
                return  # it ended before it was ready
        self.ready.add(index)
        log.info("worker_ready", worker_index=index, pid=process.pid)
        if index in self._reload_owed:
            self._reload_owed.discard(index)
            process.send_signal(signal.SIGHUP)


__all__ = [
    "BACKOFF_FIRST",
    "BACKOFF_MAX",
    "STABLE_SECONDS",
    "STOP_GRACE",
    "Reservation",
    "ReservationError",
    "Supervisor",
    "exit_status",
    "reserve_listeners",
]
