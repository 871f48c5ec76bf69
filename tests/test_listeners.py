"""Listener specs and the service's listeners, with a real OPTNEG exchange on each kind."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from milterbridge.app import serve
from milterbridge.config import AdminConfig, Config, ServerConfig
from milterbridge.listeners import InetSpec, ListenerSpecError, UnixSpec, parse_listener
from milterbridge.milter import ALL_ACTIONS, ALL_PROTOCOL, OptNeg, OptNegReply
from milterbridge.workers import reserve_listeners
from tests.integration.mta_driver import exchange, open_mta


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("inet:127.0.0.1:8899", InetSpec("127.0.0.1", 8899, socket.AF_INET)),
        ("inet:localhost:25", InetSpec("localhost", 25, socket.AF_INET)),
        ("inet6:[::1]:8899", InetSpec("::1", 8899, socket.AF_INET6)),
        ("unix:/run/milterbridge.sock", UnixSpec("/run/milterbridge.sock")),
    ],
)
def test_listener_specs_parse(spec: str, parsed: object) -> None:
    """Postfix's own notation parses, and prints back the same."""
    assert parse_listener(spec) == parsed
    assert str(parsed) == spec


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "inet:",
        "inet:8899",
        "inet:host:99999",
        "inet:host:port",
        "inet6:::1:25",
        "unix:relative.sock",
        "tcp:1.2.3.4:5",
        "inet:1:2:3",
    ],
)
def test_bad_listener_specs_are_refused(spec: str) -> None:
    """Malformed specs raise an error that quotes the spec."""
    with pytest.raises(ListenerSpecError, match=r"expected|port|absolute|unknown kind"):
        parse_listener(spec)


async def test_service_answers_on_inet_inet6_and_unix_listeners(tmp_path: Path) -> None:
    """One service, three listeners, each completes an OPTNEG exchange."""
    config = Config(
        server=ServerConfig(
            listen=["inet:127.0.0.1:0", "inet6:[::1]:0", f"unix:{tmp_path}/m.sock"],
            socket_mode="0600",
        ),
        admin=AdminConfig(listen=""),  # tests run side by side: not the fixed admin port
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(serve, config)
            assert (tmp_path / "m.sock").stat().st_mode & 0o777 == 0o600
            for address in addresses:
                spec = address.replace("inet6:[::1]", "inet:::1")
                milter = await open_mta(spec)
                (reply,) = await exchange(milter, OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
                assert isinstance(reply, OptNegReply)
                await milter.aclose()
            nursery.cancel_scope.cancel()


async def test_a_regular_file_at_the_socket_path_is_not_replaced(tmp_path: Path) -> None:
    """Only a stale socket is unlinked; anything else at the path is an error."""
    (tmp_path / "m.sock").write_text("not a socket")
    config = Config(
        server=ServerConfig(listen=[f"unix:{tmp_path}/m.sock"]), admin=AdminConfig(listen="")
    )
    with pytest.raises(ListenerSpecError, match="not a socket"):
        await serve(config)


@pytest.fixture(params=[0o000, 0o077], ids=["umask-000", "umask-077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """The socket's mode must not depend on the umask the service was started with."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


@pytest.mark.usefixtures("umask")
@pytest.mark.parametrize("mode", ["0600", "0660", "0666", "600"])
async def test_a_unix_socket_gets_the_configured_mode(tmp_path: Path, mode: str) -> None:
    """socketMode is the socket file's mode exactly, whatever the umask, for the service's own
    listener and for the one a --workers supervisor reserves for its workers."""
    path = tmp_path / "m.sock"
    config = Config(
        server=ServerConfig(listen=[f"unix:{path}"], socket_mode=mode), admin=AdminConfig(listen="")
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, config)
            assert stat.S_IMODE(path.stat().st_mode) == int(mode, 8)
            assert stat.S_ISSOCK(path.stat().st_mode)
            nursery.cancel_scope.cancel()
        path.unlink()
        reservation = await reserve_listeners([f"unix:{path}"], int(mode, 8))
        try:
            assert stat.S_IMODE(path.stat().st_mode) == int(mode, 8)
        finally:
            reservation.close()
