#!/usr/bin/env python3
"""By-hand benchmark of the load generator itself: how many messages/s ``milterbridge bench``
can drive when the milter costs next to nothing.

Run from the repository root::

    PYTHONPATH=. python benchmarks/generator_ceiling.py [--duration S] [--concurrency C]
        [--headers H] [--body-size B]

Why: a protocol-level figure means something only if the generator was not what set the pace.
The responder here answers from pre-encoded bytes (OPTNEG: version 6, ADDHDRS, every step
with a reply; CONTINUE to every step; one added header and CONTINUE at end-of-message), reading
packets by their length word only, so its cost per message is a fraction of the generator's.
Rows:

* ``in-process``: responder and generator in one trio loop, one process, one core: the lower
  bound (the responder's work is counted against the generator);
* ``1 process`` / ``N processes``: the responder in a process of its own, the generator with
  ``--processes 1`` and ``--processes N`` (N = the number of cores).

The generator's CPU per message (its own processes only) is the figure to compare with the
bridge's CPU per message in benchmarks/protocol.py: as long as it is several times smaller,
the bridge rows measure the bridge.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (
    REPO,
    bench_argv,
    cpu_seconds,
    machine_line,
    progress,
    run_bench,
)
from milterbridge.bench import BenchSettings, run_load, summarize

_HEADER = b"X-Ceiling\x00yes\x00"
_CONTINUE = struct.pack(">Ic", 1, b"c")
#: Replies by command letter; absent letters (MACRO, ABORT) get none, QUIT closes.
_REPLIES = {
    ord("O"): struct.pack(">IcIII", 13, b"O", 6, 0x01, 0),
    ord("E"): struct.pack(">Ic", 1 + len(_HEADER), b"h") + _HEADER + _CONTINUE,
    **{ord(c): _CONTINUE for c in "CHMRTLNBU"},
}


async def _serve_one(sock: socket.socket) -> None:
    buffer = bytearray()
    try:
        while True:
            try:
                data = sock.recv(65536 + 16)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError:
                return
            if not data:
                return
            buffer += data
            out = bytearray()
            while len(buffer) >= 5:
                size = int.from_bytes(buffer[:4], "big")
                if len(buffer) < 4 + size:
                    break
                code = buffer[4]
                del buffer[: 4 + size]
                if code == ord("Q"):
                    return
                out += _REPLIES.get(code, b"")
            view = memoryview(out)
            while view:
                try:
                    view = view[sock.send(view) :]
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
                except OSError:
                    return
    finally:
        trio.lowlevel.notify_closing(sock)
        sock.close()


async def serve(listener: socket.socket) -> None:
    """Answer every connection on ``listener`` until cancelled."""
    listener.setblocking(False)
    async with trio.open_nursery() as nursery:
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listener)
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nursery.start_soon(_serve_one, conn)


def listening_socket() -> socket.socket:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    return listener


async def in_process(settings: BenchSettings) -> tuple[float, float, int]:
    """messages/s, CPU ms per message, errors -- responder and generator in one loop."""
    listener = listening_socket()
    target = f"inet:127.0.0.1:{listener.getsockname()[1]}"
    settings = replace(settings, target=target)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, listener)
        raw = await run_load(settings)
        nursery.cancel_scope.cancel()
    listener.close()
    summary = summarize(settings, [raw], 1)
    return (
        summary.messages_per_second,
        summary.generator_cpu_ms_per_message or 0.0,
        summary.error_total,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--headers", type=int, default=10)
    parser.add_argument("--body-size", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--serve", action="store_true", help="internal: be the responder")
    args = parser.parse_args()
    if args.serve:
        listener = listening_socket()
        print(listener.getsockname()[1], flush=True)
        trio.run(serve, listener)
        return 0

    settings = BenchSettings(
        target="inet:127.0.0.1:1",
        concurrency=args.concurrency,
        messages=None,
        duration=args.duration,
        warmup=args.warmup,
        headers=args.headers,
        body_size=args.body_size,
    )
    load = f"{args.duration:g} s, C={args.concurrency}, {args.headers} headers, {args.body_size} B"
    rows = []
    progress(f"in-process responder; {machine_line()}")
    rate, cpu, errors = trio.run(in_process, settings)
    rows.append(("generator + responder in one process", rate, f"{cpu:.2f} (both)", "-", errors))
    responder = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, cwd=REPO
    )
    try:
        assert responder.stdout is not None
        port = int(responder.stdout.readline())
        cores = os.cpu_count() or 1
        for processes in sorted({1, cores}):
            progress(f"separate responder, --processes {processes}")
            target = f"inet:127.0.0.1:{port}"
            shape = {"headers": args.headers, "body_size": args.body_size}
            if args.warmup:  # apart, so that the responder's CPU below is the measured part's
                run_bench(bench_argv(target, messages=args.warmup, **shape))
            before = cpu_seconds(responder.pid)
            summary = run_bench(
                bench_argv(
                    target,
                    duration=args.duration,
                    concurrency=args.concurrency,
                    processes=processes,
                    **shape,
                )
            )
            responder_ms = (cpu_seconds(responder.pid) - before) * 1000 / max(summary.completed, 1)
            rows.append(
                (
                    f"generator --processes {processes}, responder apart",
                    summary.messages_per_second,
                    f"{summary.generator_cpu_ms_per_message or 0:.2f}",
                    f"{responder_ms:.2f}",
                    summary.error_total,
                )
            )
    finally:
        responder.terminate()
        responder.wait(10)
    print(f"Generator ceiling, {machine_line()}\n")
    print("| configuration | load | msg/s | CPU ms/msg generator | CPU ms/msg responder | errors |")
    print("|---|---|---|---|---|---|")
    for label, rate, gen, resp, errors in rows:
        print(f"| {label} | {load} | {rate:.0f} | {gen} | {resp} | {errors} |")
    return 0 if all(row[4] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
