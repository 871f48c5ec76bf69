#!/usr/bin/env python3
"""By-hand benchmark: the bridge's memory with many idle sessions, and while a large message
passes a data-stage hook.

Run from the repository root::

    PYTHONPATH=. python benchmarks/memory.py [--sessions 1000] [--size-mb 50]
        [--spool-memory 1MiB]

It reuses benchmarks/hook_rss.py's pieces (the counting hook endpoint, the MTA side written
with the project's codec, the RSS sampler) and differs from it in two ways: the bridge's
``maxSessions`` is raised above ``--sessions`` (at the default of 1000 the 1000 idle sessions
would leave no room for the message), and the two figures are measured apart, each against
its own idle baseline, so neither contaminates the other:

1. one warm-up message through the hook, then RSS idle;
2. the large message (body in 65,535-byte chunks, RSS sampled every 5 ms from its first body
   chunk to the end-of-message answer): peak, and peak above idle;
3. then ``--sessions`` idle MTA sessions (OPTNEG + CONNECT answered, then nothing), opened one
   after the other and held open: RSS with all of them, and per session.

Targets (issue #9): at most 150 MB with 1,000 sessions, at most 10 MB above idle for a 50 MB
message. The markdown table goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import machine_line, progress
from benchmarks.hook_rss import bridge_with_hook, idle_sessions, play_message, rss_kib
from milterbridge.durations import Size

SESSIONS_TARGET_MB = 150.0
MESSAGE_TARGET_MB = 10.0


def mb(kib: int) -> float:
    """KiB from /proc to MB (10^6 bytes), the unit of the targets."""
    return kib * 1024 / 1e6


async def main(args: argparse.Namespace) -> int:
    size = args.size_mb * 1000 * 1000
    async with bridge_with_hook(
        args.spool_memory, args.sessions + 10, "300s", "mb-memory-"
    ) as running:
        pid, milter_port, hook, workdir = (
            running.process.pid,
            running.milter_port,
            running.hook,
            running.workdir,
        )
        progress(f"work directory {workdir}; {machine_line()}")
        started = rss_kib(pid)
        await play_message(milter_port, 10_000, None, pid)
        idle = rss_kib(pid)
        progress(f"idle {mb(idle):.1f} MB; sending a {args.size_mb} MB message")
        samples: list[int] = []
        began = time.perf_counter()
        final = await play_message(milter_port, size, samples, pid)
        took = time.perf_counter() - began
        await trio.sleep(0.5)
        after_message = rss_kib(pid)
        progress(f"opening {args.sessions} idle sessions")
        held = await idle_sessions(milter_port, args.sessions)
        await trio.sleep(0.5)
        with_sessions = rss_kib(pid)
        for stream in held:
            await stream.aclose()
    received = hook.received[-1]
    peak = max(samples) if samples else 0
    above = peak - idle
    per_session = (with_sessions - after_message) / max(args.sessions, 1)

    def verdict(value: float, target: float) -> str:
        return "met" if value <= target else "not met"

    print(f"Memory, {machine_line()}\n")
    print("| measure | value | target | |\n|---|---|---|---|")
    print(f"| RSS at start | {mb(started):.1f} MB | | |")
    print(f"| RSS idle (after one small message) | {mb(idle):.1f} MB | | |")
    print(f"| peak RSS while a {args.size_mb} MB message passes the hook | {mb(peak):.1f} MB | | |")
    print(
        f"| peak above idle | {mb(above):.1f} MB | <= {MESSAGE_TARGET_MB:g} MB | "
        f"{verdict(mb(above), MESSAGE_TARGET_MB)} |"
    )
    print(f"| RSS after the message | {mb(after_message):.1f} MB | | |")
    print(
        f"| RSS with {args.sessions} idle sessions | {mb(with_sessions):.1f} MB | "
        f"<= {SESSIONS_TARGET_MB:g} MB | {verdict(mb(with_sessions), SESSIONS_TARGET_MB)} |"
    )
    print(f"| per idle session | {per_session:.1f} KiB | | |")
    print(f"| request body the hook read | {received / 1e6:.1f} MB | | |")
    print(f"| time for the {args.size_mb} MB message | {took:.2f} s | | |")
    print(f"| final reply | {type(final).__name__} | | |")
    ok = received > size and not (workdir / "bridge.log").read_text().strip()
    if not ok:
        progress(f"problem: the hook read {received} bytes or the bridge logged; see {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--spool-memory", default="1MiB")
    arguments = parser.parse_args()
    Size.parse(arguments.spool_memory)  # a typo fails here, not in the bridge
    sys.exit(trio.run(main, arguments))
