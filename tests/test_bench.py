"""``milterbridge bench``, the load generator: against a real libmilter filter, through the
bridge, across several generator processes, and against peers that fail in each way it
counts. Nothing here asserts a duration or a rate: those are the benchmarks' business."""

from __future__ import annotations

import argparse
import io
import math
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from milterbridge.bench import (
    ERROR_KINDS,
    STAGES,
    VERDICTS,
    BenchSettings,
    RawResult,
    Samples,
    Summary,
    _Address,
    add_bench_command,
    format_summary,
    make_body,
    make_headers,
    percentile,
    run_bench,
    run_load,
    summarize,
)
from milterbridge.milter import (
    CLOSED,
    Abort,
    Action,
    Body,
    Command,
    Connection,
    Continue,
    Data,
    EndOfMessage,
    Macro,
    OptNeg,
    Protocol,
    Quit,
    Rcpt,
    Reply,
    Role,
    Shutdown,
    Skip,
    answer_offer,
)
from milterbridge.transport import MilterStream
from tests.fixtures.filter_process import FilterProcess, free_port
from tests.integration.bridge_process import BridgeProcess

#: The pymilter filter writes its end-of-message edit and its answer separately; with Nagle on
#: each message would wait for a delayed ACK (the generator, like Postfix, does not quick-ack).
NODELAY = {"tcp_nodelay": True}


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="milterbridge")
    add_bench_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def _bench_json(*argv: str) -> tuple[int, Summary]:
    out = io.StringIO()
    status = run_bench(_args(*argv, "--json"), out)
    return status, msgspec.json.decode(out.getvalue(), type=Summary)


def _filter(tmp_path: Path, script: dict[str, Any], name: str = "f") -> FilterProcess:
    return FilterProcess({**NODELAY, **script}, tmp_path / name, name=name)


# --------------------------------------------------------------------------------------------
# Against a real libmilter filter
# --------------------------------------------------------------------------------------------


def test_counts_every_message_and_step_against_libmilter(tmp_path: Path) -> None:
    """12 messages, 3 at a time, 4 headers, a 70,000-byte body (two chunks), 2 recipients:
    the filter sees each of them; the summary counts each step and message once."""
    with _filter(tmp_path, {"eom_edits": [["addheader", "X-Bench", "1"]]}) as f:
        status, summary = _bench_json(
            "--to", f.spec, "--messages", "12", "--concurrency", "3", "--headers", "4",
            "--body-size", "70000", "--recipients", "2", "--warmup", "2",
        )  # fmt: skip
        eoms = f.wait_for("eom", count=14)  # the warm-up's 2 and the 12 measured
    assert status == 0
    assert summary.completed == summary.attempted == 12
    assert summary.verdicts == {**dict.fromkeys(VERDICTS, 0), "accepted": 12}
    assert summary.errors == dict.fromkeys(ERROR_KINDS, 0)
    assert summary.error_total == 0
    counts = {stage: lat.count for stage, lat in summary.latency_ms.items()}
    assert counts == {
        "open": 12, "connect": 12, "helo": 12, "mail": 12, "rcpt": 24, "data": 12,
        "header": 48, "eoh": 12, "body": 24, "eom": 12, "end_to_end": 12,
    }  # fmt: skip
    assert all(eom["body_len"] == 70000 for eom in eoms)
    assert summary.settings.message_size == 70000 + 2 + sum(
        len(n) + len(v.replace(b"\n", b"\r\n")) + 4 for n, v in make_headers(4)
    )
    for lat in summary.latency_ms.values():
        assert 0 <= lat.p50_ms <= lat.p95_ms <= lat.p99_ms <= lat.max_ms
    assert summary.sampling == "exact"
    assert summary.processes == 1 and summary.concurrency == 3


def test_macros_and_headers_reach_the_filter(tmp_path: Path) -> None:
    """--macro values ride with the connect macros, where every later step sees them."""
    script = {"macro_names": ["j", "{daemon_name}", "{bench}", "i"]}
    with _filter(tmp_path, script) as f:
        status, _ = _bench_json(
            "--to", f.spec, "--messages", "1", "--headers", "3", "--macro", "{bench}=yes",
            "--macro", "j=mx.example",
        )  # fmt: skip
        connect = f.wait_for("connect")[0]
        headers = f.wait_for("header", count=3)
        eom = f.wait_for("eom")[0]
    assert status == 0
    assert connect["macros"]["{bench}"] == "yes"
    assert connect["macros"]["j"] == "mx.example"
    assert eom["macros"]["i"] == "BENCH0001"
    assert [h["name"] for h in headers] == [n.decode() for n, _ in make_headers(3)]


def test_several_messages_per_session(tmp_path: Path) -> None:
    """--per-session 3: six messages over two connections, ABORT between messages."""
    with _filter(tmp_path, {}) as f:
        status, summary = _bench_json(
            "--to", f.spec, "--messages", "6", "--concurrency", "1", "--per-session", "3"
        )  # fmt: skip
        f.wait_for("close", count=2)
        records = f.records()
    assert status == 0
    assert summary.completed == 6
    assert summary.latency_ms["open"].count == 2
    assert summary.latency_ms["mail"].count == 6
    assert len([r for r in records if r["event"] == "connect"]) == 2
    assert len([r for r in records if r["event"] == "eom"]) == 6


@pytest.mark.parametrize(
    ("script", "verdict"),
    [
        ({"replies": {"eom": "reject"}}, "rejected"),
        ({"replies": {"mail": "tempfail"}}, "tempfailed"),
        ({"replies": {"eoh": ["reject", "554", "5.7.1", "no"]}}, "rejected"),
        ({"replies": {"rcpt": "reject"}}, "rejected"),
        ({"replies": {"connect": "tempfail"}}, "tempfailed"),
        ({"replies": {"eom": "discard"}}, "discarded"),
        ({"replies": {"header": "accept"}}, "accepted"),
        ({"eom_edits": [["quarantine", "look"]]}, "held"),
    ],
)
def test_verdicts_are_counted_apart_from_errors(
    tmp_path: Path, script: dict[str, Any], verdict: str
) -> None:
    """A filter that refuses mail is answering, not failing: exit 0, no error counted."""
    with _filter(tmp_path, script) as f:
        status, summary = _bench_json("--to", f.spec, "--messages", "4", "--concurrency", "2")
    assert status == 0
    assert summary.verdicts == {**dict.fromkeys(VERDICTS, 0), verdict: 4}
    assert summary.error_total == 0
    assert summary.latency_ms["end_to_end"].count == 4


def test_duration_mode_finishes_the_sessions_it_started(tmp_path: Path) -> None:
    """--duration: no new session after the deadline, every started one is counted."""
    with _filter(tmp_path, {}) as f:
        status, summary = _bench_json(
            "--to", f.spec, "--duration", "0.3", "--concurrency", "2"
        )  # fmt: skip
    assert status == 0
    assert summary.settings.duration_s == 0.3 and summary.settings.messages is None
    assert summary.completed == summary.attempted >= 2


# --------------------------------------------------------------------------------------------
# Through the bridge, and from several processes
# --------------------------------------------------------------------------------------------


def test_through_the_bridge_from_two_processes(tmp_path: Path) -> None:
    """bench -> bridge -> libmilter filter, the load split over two generator processes whose
    samples are merged: every message reaches the filter, every sample is in the summary."""
    with _filter(tmp_path, {"eom_edits": [["addheader", "X-Bench", "1"]]}) as f:
        config = tmp_path / "bridge.toml"
        config.write_text(
            f'[[milter]]\nname = "f"\nhostname = "{f.host}"\nport = {f.port}\nstages = ["data"]\n'
        )
        with BridgeProcess(tmp_path / "bridge", args=["--config", str(config)]) as bridge:
            status, summary = _bench_json(
                "--to", bridge.listen, "--messages", "10", "--concurrency", "4",
                "--processes", "2", "--warmup", "2", "--headers", "2",
            )  # fmt: skip
            f.wait_for("eom", count=12)
    assert status == 0
    assert summary.processes == 2
    assert summary.completed == 10
    assert summary.verdicts["accepted"] == 10
    assert summary.latency_ms["end_to_end"].count == 10
    assert summary.latency_ms["header"].count == 20
    assert summary.generator_cpu_s > 0


# --------------------------------------------------------------------------------------------
# Errors, by kind
# --------------------------------------------------------------------------------------------


def test_refused_connections_are_errors(tmp_path: Path) -> None:
    """Nothing listens: every attempt is a `refused` error, no verdict, exit status 1."""
    status, summary = _bench_json(
        "--to", f"inet:127.0.0.1:{free_port()}", "--messages", "5", "--concurrency", "2"
    )  # fmt: skip
    assert status == 1
    assert summary.completed == 0
    assert summary.attempted == 5
    assert summary.errors["refused"] == 5 and summary.error_total == 5
    assert summary.error_samples[0].startswith("open: refused:")
    assert "end_to_end" not in summary.latency_ms


def test_a_missing_unix_socket_is_refused(tmp_path: Path) -> None:
    status, summary = _bench_json("--to", f"unix:{tmp_path}/none.sock", "--messages", "2")
    assert status == 1
    assert summary.errors["refused"] == 2


async def _peer(behaviour: str) -> tuple[trio.SocketListener, Any]:
    """A fake milter on a free port that fails in one way, for each connection."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            if behaviour == "close":
                return
            await stream.receive_some(1024)  # the OPTNEG
            if behaviour == "garbage":
                await stream.send_all(b"\x00\x00\x00\x01Z")
                await trio.sleep_forever()
            await trio.sleep_forever()  # "silent"

    async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.serve_listeners(handle, listeners, task_status=task_status)

    return listeners[0], serve


@pytest.mark.parametrize(
    ("behaviour", "kind"),
    [("close", "closed"), ("garbage", "protocol"), ("silent", "timeout")],
)
async def test_failing_peers_are_counted_by_kind(behaviour: str, kind: str) -> None:
    listener, serve = await _peer(behaviour)
    port = listener.socket.getsockname()[1]
    settings = BenchSettings(
        target=f"inet:127.0.0.1:{port}", concurrency=3, messages=3, timeout=0.2
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(serve)
        raw = await run_load(settings)
        nursery.cancel_scope.cancel()
    summary = summarize(settings, [raw], 1)
    assert summary.errors == {**dict.fromkeys(ERROR_KINDS, 0), kind: 3}
    assert summary.completed == 0
    assert all(f": {kind}: " in sample for sample in summary.error_samples)


async def _scripted_filter(
    answers: dict[type[Command], Reply],
) -> tuple[int, Callable[..., Awaitable[None]], list[type[Command]]]:
    """A filter written with the codec (Role.FILTER): CONTINUE to everything but ``answers``;
    records the commands it gets. For replies a libmilter filter cannot be scripted to send."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    seen: list[type[Command]] = []

    async def handle(stream: trio.SocketStream) -> None:
        milter = MilterStream(stream, Connection(Role.FILTER))
        async with stream:
            while True:
                event = await milter.receive()
                if event is CLOSED or isinstance(event, Quit):
                    return
                assert isinstance(event, Command)
                seen.append(type(event))
                if isinstance(event, OptNeg):
                    reply: Reply = answer_offer(
                        event, actions=Action.ADDHDRS, protocol=Protocol.SKIP
                    )
                elif isinstance(event, Macro | Abort):
                    continue
                else:
                    reply = answers.get(type(event), Continue())
                await milter.send(reply)

    async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.serve_listeners(handle, listeners, task_status=task_status)

    return listeners[0].socket.getsockname()[1], serve, seen


@pytest.mark.parametrize(
    ("answers", "verdict", "absent"),
    [
        ({Rcpt: Shutdown()}, "tempfailed", Data),  # SHUTDOWN ends the whole session
        ({Body: Skip()}, "accepted", None),  # SKIP: no more body, EOM still asked
    ],
)
async def test_replies_libmilter_cannot_be_scripted_to_send(
    answers: dict[type[Command], Reply], verdict: str, absent: type[Command] | None
) -> None:
    port, serve, seen = await _scripted_filter(answers)
    settings = BenchSettings(
        target=f"inet:127.0.0.1:{port}", concurrency=1, messages=2, recipients=2,
        body_size=200_000,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(serve)
        raw = await run_load(settings)
        nursery.cancel_scope.cancel()
    summary = summarize(settings, [raw], 1)
    assert summary.verdicts[verdict] == 2
    assert summary.error_total == 0
    if absent is not None:
        assert absent not in seen
        assert seen.count(Rcpt) == 2  # one per session: the second is never sent
    else:
        assert seen.count(Body) == 2  # the first chunk of each message, then SKIP
        assert seen.count(EndOfMessage) == 2


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 95) == 95.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0], 50) == 2.0


def test_samples_turn_into_a_bounded_reservoir() -> None:
    """Beyond the limit the kept samples stay a fixed-size uniform subset of all seen."""
    samples = Samples(limit=100)
    for v in range(1000):
        samples.add(float(v))
    assert samples.seen == 1000 and len(samples.values) == 100
    assert not samples.exact
    assert max(samples.values) > 100  # later values do get in
    exact = Samples(limit=100)
    exact.add(1.0)
    assert exact.exact


def test_summary_says_when_a_reservoir_was_used() -> None:
    settings = BenchSettings(target="inet:127.0.0.1:1", messages=1)
    raw = RawResult(
        started=0.0,
        ended=2.0,
        cpu_seconds=0.5,
        attempted=4,
        verdicts={"accepted": 4},
        samples={"eom": (10, Samples().values.tobytes() + b"\x00" * 8 * 4)},
    )
    summary = summarize(settings, [raw], 1)
    assert summary.sampling.startswith("uniform reservoir")
    assert summary.messages_per_second == 2.0
    assert summary.generator_cpu_ms_per_message == 125.0


def test_body_and_headers() -> None:
    body = make_body(200)
    assert len(body) == 200 and body.startswith(b"x" * 78 + b"\r\n")
    assert make_body(0) == b""
    headers = make_headers(12)
    assert len(headers) == 12 and len({n for n, _ in headers}) == 12
    assert make_headers(0) == []


def test_text_report_lists_every_measured_stage(tmp_path: Path) -> None:
    with _filter(tmp_path, {}) as f:
        out = io.StringIO()
        status = run_bench(_args("--to", f.spec, "--messages", "2"), out)
    text = out.getvalue()
    assert status == 0
    assert f"-> {f.spec}: 2 messages in " in text
    assert "verdicts:  accepted 2" in text
    assert "errors:    none" in text
    for stage in (*STAGES, "end_to_end"):
        assert f"\n  {stage} " in text


@pytest.mark.parametrize(
    "argv",
    [
        ["--macro", "novalue"],
        ["--concurrency", "0"],
        ["--messages", "0"],
        ["--recipients", "0"],
        ["--processes", "0"],
        ["--to", "tcp:nowhere"],
        ["--duration", "-1"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run_bench(_args(*argv)) == 2
    assert capsys.readouterr().err.startswith("milterbridge bench: ")


def test_messages_and_duration_exclude_each_other() -> None:
    with pytest.raises(SystemExit):
        _args("--messages", "1", "--duration", "1")


def test_format_summary_shows_errors() -> None:
    settings = BenchSettings(target="inet:127.0.0.1:1", messages=1)
    summary = summarize(
        settings,
        [
            RawResult(
                started=0.0,
                ended=1.0,
                cpu_seconds=0.0,
                attempted=2,
                errors={"refused": 2},
                error_samples=["open: refused: nope"],
            )
        ],
        1,
    )
    text = format_summary(summary)
    assert "errors:    refused 2" in text
    assert "open: refused: nope" in text
    assert math.isclose(summary.messages_per_second, 0.0)


async def test_the_generator_sets_nodelay_on_its_sockets() -> None:
    """Its own writes never wait for Nagle (it writes a command and its macros at once)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    address = _Address(f"inet:127.0.0.1:{port}")
    await address.resolve()
    sock = await address.open()
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        sock.close()
        for listener in listeners:
            await listener.aclose()
