"""Listener specs in Postfix's notation, and opening them as trio listeners.

``inet:HOST:PORT`` (IPv4 or a name), ``inet6:[ADDR]:PORT`` and ``unix:PATH`` -- the forms an admin
writes in ``smtpd_milters``, so the same string works on both sides.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from dataclasses import dataclass

import trio


class ListenerSpecError(ValueError):
    """A listener spec that does not parse."""


@dataclass(frozen=True, slots=True)
class InetSpec:
    host: str
    port: int
    family: socket.AddressFamily

    def __str__(self) -> str:
        if self.family == socket.AF_INET6:
            return f"inet6:[{self.host}]:{self.port}"
        return f"inet:{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UnixSpec:
    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


ListenerSpec = InetSpec | UnixSpec


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ListenerSpecError(f"{spec!r}: port {text!r} is not a number from 0 to 65535")
    return int(text)


def parse_listener(spec: str) -> ListenerSpec:
    """Parse ``inet:HOST:PORT``, ``inet6:[ADDR]:PORT`` or ``unix:PATH``."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ListenerSpecError(
            f"{spec!r}: expected inet:HOST:PORT, inet6:[ADDR]:PORT or unix:PATH"
        )
    if kind == "unix":
        if not rest.startswith("/"):
            raise ListenerSpecError(f"{spec!r}: the socket path must be absolute")
        return UnixSpec(rest)
    if kind == "inet":
        host, sep, port = rest.rpartition(":")
        if not sep or not host or ":" in host:
            raise ListenerSpecError(f"{spec!r}: expected inet:HOST:PORT")
        return InetSpec(host, _port(port, spec), socket.AF_INET)
    if kind == "inet6":
        if not rest.startswith("[") or "]:" not in rest:
            raise ListenerSpecError(f"{spec!r}: expected inet6:[ADDR]:PORT")
        host, _, port = rest[1:].partition("]:")
        return InetSpec(host, _port(port, spec), socket.AF_INET6)
    raise ListenerSpecError(f"{spec!r}: unknown kind {kind!r} (inet, inet6 or unix)")


async def open_listener(
    spec: ListenerSpec, *, unix_mode: int = 0o660, reuse_port: bool = False
) -> trio.SocketListener:
    """Bind and listen. A stale Unix socket file is replaced; any other file there is an error.

    ``reuse_port`` sets SO_REUSEPORT on an inet/inet6 listener, so that several worker processes
    can each listen on the same port and the kernel spreads connections over them (``--workers``).
    It has no meaning for a Unix socket, whose workers share one listening socket instead.
    """
    if isinstance(spec, UnixSpec):
        return await _open_unix(spec.path, unix_mode)
    sock = trio.socket.socket(spec.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if spec.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind((spec.host, spec.port))
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


async def _open_unix(path: str, mode: int) -> trio.SocketListener:
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ListenerSpecError(f"unix:{path}: exists and is not a socket")
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        os.chmod(path, mode)
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


def bound_address(listener: trio.SocketListener) -> str:
    """The listener's actual address as a spec (shows the port when 0 was asked for)."""
    sock = listener.socket
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    if sock.family == socket.AF_INET6:
        return f"inet6:[{host}]:{port}"
    return f"inet:{host}:{port}"
