"""The accept loop: ``trio.serve_listeners`` plus an answer for when file descriptors run out.

trio's loop meets EMFILE/ENFILE (no descriptor left for the new connection) by sleeping 100 ms
and trying again, so the connection waits in the listen backlog and the MTA waits with it -- up
to its own connect timeout (Postfix: ``milter_connect_timeout``, 30 s), after which it applies
``milter_default_action``, which may be ``accept``: mail through unfiltered, after a delay.

This loop keeps one descriptor in reserve (an open ``/dev/null``). When accept fails for want of
descriptors -- which Linux reports before it looks at the queue, so also when no connection is
waiting -- the loop waits, reserve held, until a connection is there; then it closes the reserve,
accepts the connection into the descriptor just freed and hands it to ``exhausted``: the service
answers it with the refusal of server/refuse.py, TEMPFAIL at CONNECT, which needs no further
descriptor. The reserve is taken back once that connection is closed. A connection that accept
gave the very last descriptor is refused the same way: its session could connect no filter, and
would only close the connection, leaving the MTA to its ``milter_default_action``. (Whether one
more descriptor is left is checked by opening and closing one: about 2 µs per connection.)
So while the shortage lasts, waiting connections are refused one after the other, at once, and
sessions already running go on; as soon as one of them ends, its descriptors serve new sessions
again.

While the reserve is out (a refusal in progress) the loop waits for it to come back. When it
cannot be taken back (another task took the descriptor first), the loop falls back to trio's
way -- wait :data:`RETRY_SECONDS`, try again -- and tries to retake the reserve each time. ENOMEM
and ENOBUFS (the kernel short of memory for the socket) are not helped by closing a descriptor
and are waited out the same way. Either is logged as ``accept_failed``, at most once a second.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable, Sequence

import structlog
import trio

log = structlog.get_logger("milterbridge")

#: How long to wait before accepting again when neither accepting nor the reserve can help.
RETRY_SECONDS = 0.1
#: At most one ``accept_failed`` line per this many seconds.
WARN_INTERVAL = 1.0

#: Accept failed for want of a descriptor: the reserve helps.
_NO_DESCRIPTOR = frozenset({errno.EMFILE, errno.ENFILE})
#: Accept failed for want of kernel memory: only waiting helps.
_NO_MEMORY = frozenset({errno.ENOMEM, errno.ENOBUFS})

Handler = Callable[[trio.SocketStream], Awaitable[None]]
#: Answers a connection accepted with the reserve, or given the last descriptor; told the
#: error that showed the shortage.
Exhausted = Callable[[trio.SocketStream, OSError], Awaitable[None]]


class DescriptorReserve:
    """One file descriptor held back so that a connection can still be accepted, and refused,
    when the process has none left."""

    def __init__(self) -> None:
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def take(self) -> bool:
        """Hold the reserve (again); whether it is held now."""
        if self._fd is None:
            try:
                self._fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
        return True

    def release(self) -> None:
        """Give the descriptor back to the process (for the next accept to use)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def descriptor_shortage() -> OSError | None:
    """Whether the process is out of descriptors now: the error of opening one more (closed at
    once when it could), None when it could."""
    try:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return exc if exc.errno in _NO_DESCRIPTOR else None
    os.close(fd)
    return None


class AcceptLoop:
    """Accepts on every listener; each connection runs ``handler`` in ``handler_nursery``.

    A connection accepted with the reserve, or given the last descriptor, runs ``exhausted``
    instead, also in ``handler_nursery`` (so a drain that stops accepting does not cut its
    refusal short).
    Either way the stream is closed when the call returns. The listeners are closed when the
    loop ends.
    """

    def __init__(
        self, handler: Handler, exhausted: Exhausted, handler_nursery: trio.Nursery
    ) -> None:
        self.handler = handler
        self.exhausted = exhausted
        self.handler_nursery = handler_nursery
        self.reserve = DescriptorReserve()
        #: Set while a connection accepted with the reserve is open; the reserve is out.
        self._refusing: trio.Event | None = None
        self._warned_at: float | None = None
        self._serving = False

    async def serve(
        self,
        listeners: Sequence[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept until cancelled; reports once every listener's loop runs."""
        self._serving = True
        self.reserve.take()
        try:
            async with trio.open_nursery() as loops:
                for listener in listeners:
                    loops.start_soon(self._accept_loop, listener)
                task_status.started()
        finally:
            self._serving = False
            self.reserve.release()

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno in _NO_DESCRIPTOR:
                        await self._out_of_descriptors(listener, exc)
                    elif exc.errno in _NO_MEMORY:
                        await self._wait(exc)
                    else:
                        raise
                    continue
                self._start(stream)

    async def _out_of_descriptors(self, listener: trio.SocketListener, error: OSError) -> None:
        """Accept failed for want of a descriptor: refuse the next connection with the reserve.

        Linux fails accept with EMFILE before it looks at the queue, so the failure does not
        mean that a connection is waiting: the reserve stays held until one is.
        """
        if self._refusing is not None:
            await self._refusing.wait()  # the reserve comes back when that refusal ends
            return
        held = self.reserve.take()
        await trio.lowlevel.wait_readable(listener.socket)
        if not held:
            await self._wait(error)  # nothing to accept it with: wait, as trio does
            return
        try:
            stream = await listener.accept()  # a session may have ended meanwhile
        except OSError as exc:
            if exc.errno in _NO_DESCRIPTOR:
                await self._accept_with_reserve(listener, exc)
            else:
                await self._wait(exc)
            return
        self._start(stream)

    async def _accept_with_reserve(self, listener: trio.SocketListener, error: OSError) -> None:
        self.reserve.release()
        stream: trio.SocketStream | None = None
        failure: OSError | None = None
        # No checkpoint comes between the release and the accept call, so no other task can
        # take the descriptor; the bound is for a connection that went away since it was seen.
        with trio.move_on_after(RETRY_SECONDS):
            try:
                stream = await listener.accept()
            except OSError as exc:
                failure = exc
        if stream is None:
            self.reserve.take()
            if failure is not None:
                await self._wait(failure)
            return
        self._refusing = trio.Event()
        self.handler_nursery.start_soon(self._refuse, stream, error, True)

    def _start(self, stream: trio.SocketStream) -> None:
        """A session for an accepted connection -- unless that took the last descriptor: then
        no filter could be connected for it, and the session would only close the connection
        and leave the MTA to its ``milter_default_action``. It is refused instead."""
        shortage = descriptor_shortage()
        if shortage is None:
            self.handler_nursery.start_soon(_run, self.handler, stream)
        else:
            self.handler_nursery.start_soon(self._refuse, stream, shortage, False)

    async def _refuse(self, stream: trio.SocketStream, error: OSError, reserve: bool) -> None:
        """``exhausted`` for ``stream``; then, if it was accepted with the reserve (``reserve``),
        the reserve is taken back."""
        try:
            await self.exhausted(stream, error)
        finally:
            await trio.aclose_forcefully(stream)
            if reserve:
                refusing, self._refusing = self._refusing, None
                if self._serving:  # else the loop is over and keeps nothing in reserve
                    self.reserve.take()
                if refusing is not None:
                    refusing.set()

    async def _wait(self, error: OSError) -> None:
        now = trio.current_time()
        if self._warned_at is None or now - self._warned_at >= WARN_INTERVAL:
            self._warned_at = now
            log.warning(
                "accept_failed",
                error=error.strerror or str(error),
                reserve=self.reserve.held,
                retry=RETRY_SECONDS,
            )
        await trio.sleep(RETRY_SECONDS)


async def _run(handler: Handler, stream: trio.SocketStream) -> None:
    try:
        await handler(stream)
    finally:
        await trio.aclose_forcefully(stream)


__all__ = [
    "RETRY_SECONDS",
    "AcceptLoop",
    "DescriptorReserve",
    "Exhausted",
    "Handler",
    "descriptor_shortage",
]
