#!/usr/bin/env python3
"""By-hand benchmark at the protocol level: ``milterbridge bench`` -> the C filter directly vs
``milterbridge bench`` -> the bridge -> the same C filter, and the bridge with 1 vs 2 workers.

Run from the repository root (no root needed)::

    PYTHONPATH=. python benchmarks/protocol.py [--duration S] [--messages N] [--concurrency C]
        [--rounds R] [--latency-messages M] [--headers H] [--body-size B] [--warmup W]
        [--processes P] [--no-workers] [--profile FILE] [--keep]

Why at the protocol level: without an MTA the figures hold only the bridge's own cost
(Postfix spends more CPU per message than the bridge does and would blur the difference).
The upstream is benchmarks/c_filter (stock libmilter, microseconds of C per step, TCP_NODELAY
on its sockets), so what the bridge adds is most of what is left.

Rows, each configuration measured side by side with its baseline in every round (the order
flips from round to round, so a trend in the machine's load hits both alike):

* ``a``     bench -> filter (baseline) vs bench -> bridge -> filter: messages/s at C sessions.
* ``a-lat`` the same two with one session at a time: end-to-end p50 per message; the
  difference is the latency the bridge adds to one message.
* ``d``     bench -> bridge (``--workers 1``, baseline) vs bench -> bridge (``--workers 2``)
  -> filter: messages/s at C sessions. Skipped, with a note, when ``milterbridge run`` has no
  ``--workers`` yet.

Every filter joins at DATA (``stages = ["data"]``, the default), so the bridge connects to it
per message and replays CONNECT, HELO, MAIL and RCPT, as in production. The "CPU ms/msg"
column is the CPU time (user + system, /proc) of the bridge (all its processes), of the filter
and of the generator, per message. "gen. load" is the generator's CPU time over the elapsed
time per generator process: near 100 % the generator, not what it measures, set the pace.

``--profile FILE`` runs one more measurement of the bridge row under py-spy (``pip install
py-spy``) and writes its raw stacks to FILE and a summary of the top functions to stderr.

The markdown table goes to stdout, progress to stderr; exit status 1 if any run had errors.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (
    Bridge,
    CFilter,
    Summary,
    bench_argv,
    build_c_filter,
    cpu_seconds,
    machine_line,
    progress,
    run_bench,
    workers_supported,
)
from benchmarks.pyspy import summarize_raw


@dataclass
class Setup:
    key: str
    label: str
    target: str
    filter: CFilter
    bridge: Bridge | None = None

    def cpu(self) -> tuple[float | None, float]:
        bridge = None
        if self.bridge is not None:
            bridge = sum(cpu_seconds(pid) for pid in self.bridge.pids())
        assert self.filter.proc is not None
        return bridge, cpu_seconds(self.filter.proc.pid)


@dataclass
class Run:
    summary: Summary
    bridge_cpu: float | None
    filter_cpu: float


@dataclass
class Row:
    test: str
    setup: Setup
    load: str
    metric: str  # "msg/s" or "ms p50"
    argv: list[str]
    baseline: Row | None = None
    #: The unmeasured warm-up, a ``bench`` run of its own before the CPU snapshot.
    warmup_argv: list[str] | None = None
    runs: list[Run] = field(default_factory=list)

    def value(self, run: Run) -> float:
        if self.metric == "msg/s":
            return run.summary.messages_per_second
        return run.summary.latency_ms["end_to_end"].p50_ms

    def median(self) -> float | None:
        return statistics.median(self.value(r) for r in self.runs) if self.runs else None

    def versus(self) -> str:
        if self.baseline is None:
            return "baseline"
        mine, base = self.median(), self.baseline.median()
        if mine is None or base is None or base == 0:
            return "n/a"
        if self.metric == "msg/s":
            return f"{mine / base:.2f}x"
        return f"+{mine - base:.1f} ms"

    def cpu_text(self) -> str:
        def per_message(values: list[float]) -> str:
            return f"{statistics.median(values):.2f}"

        done = [max(r.summary.completed, 1) for r in self.runs]
        filt = per_message([r.filter_cpu * 1000 / n for r, n in zip(self.runs, done, strict=True)])
        gen = per_message(
            [r.summary.generator_cpu_s * 1000 / n for r, n in zip(self.runs, done, strict=True)]
        )
        if self.runs[0].bridge_cpu is None:
            return f"- / {filt} / {gen}"
        bridge = per_message(
            [(r.bridge_cpu or 0) * 1000 / n for r, n in zip(self.runs, done, strict=True)]
        )
        return f"{bridge} / {filt} / {gen}"

    def generator_load(self) -> str:
        loads = [
            r.summary.generator_cpu_s / r.summary.elapsed_s / r.summary.processes * 100
            for r in self.runs
        ]
        return f"{statistics.median(loads):.0f} %"

    def e2e(self) -> str:
        p50 = statistics.median(r.summary.latency_ms["end_to_end"].p50_ms for r in self.runs)
        p99 = statistics.median(r.summary.latency_ms["end_to_end"].p99_ms for r in self.runs)
        return f"{p50:.1f} / {p99:.1f}"

    def errors(self) -> str:
        total = sum(r.summary.error_total for r in self.runs)
        if not total:
            return "none"
        kinds: dict[str, int] = {}
        for r in self.runs:
            for kind, n in r.summary.errors.items():
                kinds[kind] = kinds.get(kind, 0) + n
        first = next(s for r in self.runs for s in r.summary.error_samples)
        return f"{total}: {kinds} (e.g. {first[:120]})".replace("|", "/")


def fmt(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def table(rows: list[Row]) -> str:
    out = [
        "| row | configuration | load | metric | median | per round | vs baseline "
        "| e2e p50 / p99 ms | CPU ms/msg bridge / filter / generator | gen. load | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        median = row.median()
        out.append(
            f"| {row.test} | {row.setup.label} | {row.load} | {row.metric} | "
            f"{fmt(median) if median is not None else '-'} | "
            f"{', '.join(fmt(row.value(r)) for r in row.runs)} | {row.versus()} | {row.e2e()} | "
            f"{row.cpu_text()} | {row.generator_load()} | {row.errors()} |"
        )
    return "\n".join(out)


def measure(row: Row) -> Run:
    """One run. The warm-up is a separate ``bench`` before the CPU snapshot: the bridge's and
    the filter's CPU time is then the measured messages' only."""
    if row.warmup_argv is not None:
        run_bench(row.warmup_argv)
    before = row.setup.cpu()
    summary = run_bench(row.argv)
    after = row.setup.cpu()
    bridge = None if before[0] is None or after[0] is None else after[0] - before[0]
    return Run(summary, bridge, after[1] - before[1])


def profile_bridge(setup: Setup, argv: list[str], out: Path) -> None:
    """One more bridge run under py-spy; raw stacks to ``out``, the top functions to stderr."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.access(pyspy, os.X_OK):
        progress("--profile: py-spy not found (pip install py-spy); no profile")
        return
    assert setup.bridge is not None and setup.bridge.proc is not None
    command = [pyspy, "record", "-p", str(setup.bridge.proc.pid), "-r", "250", "-f", "raw"]
    spy = subprocess.Popen(
        [*command, "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)  # py-spy attaches
    summary = run_bench(argv)
    spy.send_signal(signal.SIGINT)
    _, err = spy.communicate(timeout=60)
    if not out.exists():
        progress(f"--profile: py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")
        return
    progress(
        f"profile of the bridge during {summary.completed} messages "
        f"({summary.messages_per_second:.1f} msg/s under py-spy), raw stacks in {out}:"
    )
    print(summarize_raw(out, top=25), file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--duration", type=float, help="seconds per throughput run (default 15)")
    amount.add_argument("--messages", type=int, help="messages per throughput run instead")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-messages", type=int, default=200)
    parser.add_argument("--headers", type=int, default=10)
    parser.add_argument("--body-size", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=40, help="unmeasured messages per run")
    parser.add_argument("--processes", type=int, default=1, help="generator processes")
    parser.add_argument("--no-workers", action="store_true", help="skip row d")
    parser.add_argument(
        "--deferred", action="store_true", help="add rows for deferMessageVerdicts = true"
    )
    parser.add_argument("--profile", type=Path, metavar="FILE", help="py-spy the bridge")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    duration = args.duration if args.messages is None and args.duration else None
    if args.messages is None and duration is None:
        duration = 15.0

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="mb-protocol-"))
    progress(f"work directory {workdir}; {machine_line()}")
    binary = build_c_filter(workdir / "build")
    workers = not args.no_workers and workers_supported()
    notes: list[str] = []
    if not args.no_workers and not workers:
        notes.append(
            "row d skipped: this checkout's `milterbridge run` has no `--workers` option yet"
        )
    c = args.concurrency
    shape = f"{args.headers} headers, {args.body_size} B body"
    if duration is not None:
        load = f"{duration:g} s, C={c}, {shape}"
    else:
        load = f"N={args.messages}, C={c}, {shape}"
    lat_load = f"N={args.latency_messages}, C=1, {shape}"
    ok = True
    with ExitStack() as stack:

        def setup(
            key: str, label: str, *, bridge: bool, count: int | None = None, server: str = ""
        ) -> Setup:
            """A filter of its own, and in front of it a bridge of its own (``--workers
            count``, or no such option when None; ``server``: its ``[server]`` lines)."""
            f = stack.enter_context(CFilter(binary, workdir / key, name=f"{key}-filter"))
            if not bridge:
                return Setup(key, label, f.spec, f)
            b = stack.enter_context(Bridge(workdir / key, [f], workers=count, server=server))
            return Setup(key, label, b.spec, f, b)

        direct = setup("direct", "bench -> filter", bridge=False)
        via = setup("bridge", "bench -> bridge -> filter", bridge=True)
        setups = [direct, via]
        if args.deferred:
            deferred = setup(
                "deferred",
                "bench -> bridge (deferMessageVerdicts) -> filter",
                bridge=True,
                server="deferMessageVerdicts = true",
            )
            setups.append(deferred)
        if workers:
            one = setup("w1", "bench -> bridge --workers 1 -> filter", bridge=True, count=1)
            two = setup("w2", "bench -> bridge --workers 2 -> filter", bridge=True, count=2)
            setups += [one, two]
        progress("set up: " + "; ".join(f"{s.key} -> {s.target}" for s in setups))

        def row(
            test: str, s: Setup, concurrency: int, messages: int | None, base: Row | None = None
        ) -> Row:
            def argv(amount: int | None, timed: float | None) -> list[str]:
                return bench_argv(
                    s.target,
                    messages=amount,
                    duration=timed,
                    concurrency=concurrency,
                    headers=args.headers,
                    body_size=args.body_size,
                    processes=args.processes,
                )

            measured = argv(messages, None if messages is not None else duration)
            warm = argv(args.warmup, None) if args.warmup else None
            metric = "msg/s" if concurrency > 1 else "ms p50"
            return Row(test, s, load if concurrency > 1 else lat_load, metric, measured, base, warm)

        a_d = row("a", direct, c, args.messages)
        a_b = row("a", via, c, args.messages, a_d)
        lat_d = row("a-lat", direct, 1, args.latency_messages)
        lat_b = row("a-lat", via, 1, args.latency_messages, lat_d)
        pairs = [(a_d, a_b), (lat_d, lat_b)]
        if args.deferred:
            # Against the plain bridge: what not waiting at headers and body saves.
            pairs.append((a_b, row("a-defer", deferred, c, args.messages, a_b)))
            pairs.append((lat_b, row("a-defer-lat", deferred, 1, args.latency_messages, lat_b)))
        if workers:
            d_1 = row("d", one, c, args.messages)
            d_2 = row("d", two, c, args.messages, d_1)
            pairs.append((d_1, d_2))
        for rnd in range(args.rounds):
            for pair in pairs:
                for row in pair if rnd % 2 == 0 else pair[::-1]:
                    run = measure(row)
                    row.runs.append(run)
                    s = run.summary
                    ok = ok and not s.error_total
                    progress(
                        f"round {rnd + 1}/{args.rounds} {row.test} {row.setup.key}: "
                        f"{s.completed} msgs in {s.elapsed_s:.1f}s -> "
                        f"{fmt(row.value(run))} {row.metric}; errors {s.error_total}"
                    )
        print(f"Protocol level, {machine_line()}\n")
        # A row in two pairs (the plain bridge, with --deferred) is measured in both, shown once.
        shown = {id(row): row for pair in pairs for row in pair}
        print(table(list(shown.values())))
        for note in notes:
            print(f"\n{note}")
        sys.stdout.flush()
        if args.profile is not None:
            profile_bridge(via, a_b.argv, args.profile)
        problems = [s.bridge.log_text() for s in setups if s.bridge is not None]
        if any(text.strip() for text in problems):
            progress("the bridge logged warnings or errors; see the bridge.log files")
            ok = False
    progress(f"done in {time.monotonic() - started:.0f}s")
    if args.keep or not ok:
        progress(f"work directory kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
