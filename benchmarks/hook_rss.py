#!/usr/bin/env python3
"""By-hand benchmark: the bridge's memory while a large message passes a data-stage hook.

Run from the repository root::

    PYTHONPATH=. python benchmarks/hook_rss.py [--size-mb 50] [--spool-memory 1MiB] [--sessions 0]

One bridge process (the real service, started with ``python -m milterbridge run``) with one
``[[hook]]`` on the ``data`` stage. This script plays the MTA with the project's codec and runs
the hook endpoint itself (hypercorn, an ASGI app that reads the request body as a stream and
counts its bytes, so the hook side keeps no copy either). Steps:

1. warm-up: one small message through the hook (imports, pools and buffers exist afterwards);
2. idle: the bridge's RSS (VmRSS from /proc) after the warm-up;
3. the large message: body sent in 65,535-byte chunks; the bridge's RSS is sampled every 5 ms
   from the first body chunk until the end-of-message answer arrives; peak and idle are
   reported, with the difference. The hook checks that it received every byte.

``--sessions N`` opens N idle MTA sessions (OPTNEG + CONNECT) first, to see what each costs.

The markdown table goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from milterbridge.durations import Size
from milterbridge.milter import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    CHUNK_SIZE,
    Body,
    Connect,
    Connection,
    Data,
    EndOfHeaders,
    EndOfMessage,
    Family,
    Header,
    Helo,
    Mail,
    OptNeg,
    Quit,
    Rcpt,
    Reply,
    Role,
)
from milterbridge.transport import MilterStream

ROOT = Path(__file__).resolve().parents[1]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class CountingHook:
    """The hook endpoint: reads each request as a stream, answers accept."""

    def __init__(self) -> None:
        self.received: list[int] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                kind = event["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        self.received.append(size)
        body = json.dumps({"action": "accept"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def play_message(port: int, body_size: int, sampler: list[int] | None, pid: int) -> Reply:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    mta = MilterStream(stream, Connection(Role.MTA))

    async def ask(command: Any) -> Reply | None:
        options = mta.connection.negotiated
        if options is not None and not options.sends(type(command)):
            return None  # as Postfix does: a step the bridge declined is not sent
        await mta.send(command)
        reply: Reply | None = None
        while mta.connection.awaiting is not None:
            event = await mta.receive()
            assert isinstance(event, Reply), event
            reply = event
        return reply

    await mta.send(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
    await mta.receive()
    for command in (
        Connect(b"client.test", Family.INET, 4000, b"192.0.2.1"),
        Helo(b"client.test"),
        Mail(b"<a@x.test>"),
        Rcpt(b"<b@y.test>"),
        Data(),
        Header(b"From", b"a@x.test"),
        Header(b"Subject", b"large"),
        EndOfHeaders(),
    ):
        await ask(command)
    line = b"x" * 78 + b"\r\n"
    chunk = (line * (CHUNK_SIZE // len(line) + 1))[:CHUNK_SIZE]
    sent = 0
    async with trio.open_nursery() as nursery:
        if sampler is not None:
            nursery.start_soon(sample, pid, sampler)
        while sent < body_size:
            piece = chunk[: body_size - sent]
            await ask(Body(piece))
            sent += len(piece)
        final = await ask(EndOfMessage())
        nursery.cancel_scope.cancel()
    await mta.send(Quit())
    await stream.aclose()
    assert final is not None
    return final


async def sample(pid: int, samples: list[int]) -> None:
    while True:
        samples.append(rss_kib(pid))
        await trio.sleep(0.005)


async def idle_sessions(port: int, count: int) -> list[trio.SocketStream]:
    streams = []
    for n in range(count):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        mta = MilterStream(stream, Connection(Role.MTA))
        await mta.send(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
        await mta.receive()
        await mta.send(Connect(b"c.test", Family.INET, 1000 + n, b"192.0.2.9"))
        while mta.connection.awaiting is not None:
            await mta.receive()
        streams.append(stream)
    return streams


@dataclass
class RunningBridge:
    """The bridge process under measurement, with the counting hook it calls."""

    process: subprocess.Popen[bytes]
    milter_port: int
    hook: CountingHook
    workdir: Path


@asynccontextmanager
async def bridge_with_hook(
    spool_memory: str, max_sessions: int, hook_timeout: str, prefix: str
) -> AsyncIterator[RunningBridge]:
    """Start the hook endpoint and ``milterbridge run`` with one data-stage hook on it; stop
    both on exit. Yields once the bridge accepts connections."""
    hook = CountingHook()
    hook_port = free_port()
    config = HypercornConfig()
    config.bind = [f"127.0.0.1:{hook_port}"]
    config.accesslog = None
    config.errorlog = None
    milter_port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    toml = workdir / "bridge.toml"
    toml.write_text(
        f'[server]\nspoolMemory = "{spool_memory}"\nmaxSessions = {max_sessions}\n'
        f'[[hook]]\nname = "counting"\nurl = "http://127.0.0.1:{hook_port}/hook"\n'
        f'timeout = "{hook_timeout}"\n'
    )
    async with trio.open_nursery() as nursery:
        shutdown = trio.Event()
        nursery.start_soon(
            lambda: hypercorn_serve(hook, config, shutdown_trigger=shutdown.wait)  # type: ignore[arg-type]
        )
        argv = [sys.executable, "-m", "milterbridge", "run", "--config", str(toml)]
        argv += ["--listen", f"inet:127.0.0.1:{milter_port}", "--admin-listen", ""]
        with (workdir / "bridge.log").open("wb") as log:
            # Popen only forks and execs: blocking that briefly is fine in a by-hand benchmark.
            process = subprocess.Popen(  # noqa: ASYNC220
                [*argv, "--log-level", "warning"], cwd=ROOT, stderr=log
            )
        try:
            for _ in range(500):
                try:
                    (await trio.open_tcp_stream("127.0.0.1", milter_port)).socket.close()
                    break
                except OSError:
                    await trio.sleep(0.02)
            yield RunningBridge(process, milter_port, hook, workdir)
        finally:
            process.terminate()
            process.wait(30)
            shutdown.set()


async def main(args: argparse.Namespace) -> None:
    size = args.size_mb * 1000 * 1000
    async with bridge_with_hook(
        args.spool_memory, args.sessions + 10, "120s", "hook-rss-"
    ) as running:
        pid, milter_port, hook = running.process.pid, running.milter_port, running.hook
        started = rss_kib(pid)
        await play_message(milter_port, 10_000, None, pid)
        idle = rss_kib(pid)
        held = await idle_sessions(milter_port, args.sessions) if args.sessions else []
        with_sessions = rss_kib(pid)
        samples: list[int] = []
        began = time.perf_counter()
        final = await play_message(milter_port, size, samples, pid)
        elapsed = time.perf_counter() - began
        after = rss_kib(pid)
        for stream in held:
            await stream.aclose()
    assert hook.received[-1] > size, hook.received
    peak = max(samples)
    print(f"# hook RSS, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores", file=sys.stderr)
    print("| measure | value |\n|---|---|")
    print(f"| RSS at start | {started / 1024:.1f} MiB |")
    print(f"| RSS idle (after one small message) | {idle / 1024:.1f} MiB |")
    if args.sessions:
        per = (with_sessions - idle) / args.sessions
        print(
            f"| RSS with {args.sessions} idle sessions | {with_sessions / 1024:.1f} MiB "
            f"({per:.1f} KiB each) |"
        )
    print(f"| peak RSS while a {args.size_mb} MB message passes the hook | {peak / 1024:.1f} MiB |")
    print(f"| peak above idle | {(peak - with_sessions) / 1024:.1f} MiB |")
    print(f"| RSS after | {after / 1024:.1f} MiB |")
    print(f"| request body the hook read | {hook.received[-1] / 1e6:.1f} MB |")
    print(f"| time for the message (MTA -> bridge -> hook -> MTA) | {elapsed:.2f} s |")
    print(f"| final reply | {type(final).__name__} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--spool-memory", default="1MiB")
    parser.add_argument("--sessions", type=int, default=0)
    arguments = parser.parse_args()
    Size.parse(arguments.spool_memory)  # a typo fails here, not in the bridge
    trio.run(main, arguments)
