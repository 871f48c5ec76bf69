"""What a session must not leave behind: tasks, sockets, spool files (tests only).

The session promises (server/session.py, "Lifetime") that however it ends, nothing it started
outlives it: its tasks live in its own nurseries, every upstream connection is closed, and the
body spool is dropped. A fault test cannot see that from the MTA's side -- a leaked socket or
task changes no reply -- so it looks at the process itself:

* tasks: every live trio task, found by walking the task tree down from
  ``trio.lowlevel.current_root_task()`` (system tasks included, so a task parked in the system
  nursery is seen too); a task whose await stack runs code of the milterbridge package once the
  session has returned is the session's leak;
* sockets: this process's file descriptors that are ``socket:[inode]`` in ``/proc/self/fd``, and
  for TCP ones the ports from ``/proc/net/tcp``/``tcp6``, so a test can ask for "no socket of
  ours still connected to that peer" while the peer (in this same process) is still running;
* spool files: the session's ``spool_directory`` must be empty, and no file descriptor of this
  process may point into it -- the spool's file is unlinked at once, so a leaked one shows only
  as an open ``(deleted)`` descriptor.

``LeakCheck`` takes a snapshot when a cell starts (before its peers start), checks the session's
own promises when it has returned (``session_ended``, peers still up), and checks at the end
(``finished``, peers gone) that the process is back to the snapshot.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import trio

import milterbridge

#: Where the bridge's code lives: a task running a frame from here belongs to the bridge.
_PACKAGE = str(Path(milterbridge.__file__).parent) + os.sep
_PROC_FD = Path("/proc/self/fd")


def live_tasks() -> set[trio.lowlevel.Task]:
    """Every task of this trio run, system tasks included."""
    found: set[trio.lowlevel.Task] = set()
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        if task is None or task in found:
            continue
        found.add(task)
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return found


def bridge_tasks() -> list[str]:
    """Tasks waiting in milterbridge code now, as ``name (file:line)`` for an assertion message.

    The calling task is left out: it is running, not waiting, so it has no await stack.
    """
    leaked = []
    for task in live_tasks():
        if task is trio.lowlevel.current_task():
            continue
        inside = [
            f"{frame.f_code.co_filename}:{line}"
            for frame, line in task.iter_await_frames()
            if frame.f_code.co_filename.startswith(_PACKAGE)
        ]
        if inside:
            leaked.append(f"{task.name} ({inside[-1]})")
    return leaked


def open_fds() -> dict[int, str]:
    """This process's file descriptors and what each points to (its ``/proc`` link)."""
    links: dict[int, str] = {}
    for entry in _PROC_FD.iterdir():
        try:
            links[int(entry.name)] = os.readlink(entry)
        except FileNotFoundError:  # closed between listing and reading (the listing's own fd)
            continue
    return links


def socket_inodes() -> set[int]:
    """The inodes of this process's open sockets."""
    return {
        int(link[len("socket:[") : -1])
        for link in open_fds().values()
        if link.startswith("socket:[")
    }


@dataclass(frozen=True)
class TcpSocket:
    """One TCP socket of the kernel's table: its local and remote port."""

    inode: int
    local_port: int
    remote_port: int


def tcp_sockets() -> list[TcpSocket]:
    """This process's TCP sockets (IPv4 and IPv6), from the kernel's tables."""
    ours = socket_inodes()
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:  # pragma: no cover -- a kernel without IPv6
            continue
        for line in lines:
            fields = line.split()
            inode = int(fields[9])
            if inode in ours:
                local, remote = (int(field.rsplit(":", 1)[1], 16) for field in fields[1:3])
                found.append(TcpSocket(inode, local, remote))
    return found


def connections_to(ports: Collection[int]) -> list[TcpSocket]:
    """Our sockets connected to one of ``ports`` (the client side of a connection to a peer)."""
    return [sock for sock in tcp_sockets() if sock.remote_port in ports]


def files_under(directory: Path) -> list[str]:
    """Open file descriptors of this process that point into ``directory``."""
    prefix = str(directory.resolve()) + os.sep
    return [link for link in open_fds().values() if link.startswith(prefix)]


@dataclass(frozen=True)
class Snapshot:
    tasks: frozenset[trio.lowlevel.Task]
    sockets: frozenset[int]


def snapshot() -> Snapshot:
    return Snapshot(frozenset(live_tasks()), frozenset(socket_inodes()))


class LeakCheck:
    """The leak checks of one fault cell.

    Args:
        spool: the session's ``spool_directory`` (created here, empty).
    """

    def __init__(self, spool: Path) -> None:
        self.spool = spool
        spool.mkdir(exist_ok=True)
        assert not any(spool.iterdir()), f"{spool} is not empty to begin with"
        self.before = snapshot()

    def session_ended(self, peer_ports: Collection[int] = ()) -> None:
        """The session has returned: nothing of it may be running or open any more.

        Args:
            peer_ports: the ports of the peers it talked to (still running in this process):
                no socket of ours may still be connected to one of them.
        """
        assert bridge_tasks() == [], "tasks of the session outlived it"
        assert connections_to(peer_ports) == [], "connections to a peer outlived the session"
        self.assert_spool_clean()

    def assert_spool_clean(self) -> None:
        assert files_under(self.spool) == [], "a spool file is still open"
        assert list(self.spool.iterdir()) == [], "a spool file is left in the directory"

    def finished(self) -> None:
        """Everything the cell started is gone: the process is as the snapshot found it."""
        after = snapshot()
        new_tasks = sorted(task.name for task in after.tasks - self.before.tasks)
        assert new_tasks == [], "tasks outlived the cell"
        assert after.sockets - self.before.sockets == set(), "sockets outlived the cell"
        self.assert_spool_clean()


__all__ = [
    "LeakCheck",
    "Snapshot",
    "TcpSocket",
    "bridge_tasks",
    "connections_to",
    "files_under",
    "live_tasks",
    "open_fds",
    "snapshot",
    "socket_inodes",
    "tcp_sockets",
]
