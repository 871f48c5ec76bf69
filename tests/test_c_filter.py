"""The benchmarks' reference filter (benchmarks/c_filter): it builds with gcc against Debian's
libmilter-dev, adds its header at end-of-message, gives the verdict it is told to, and sets
TCP_NODELAY on every TCP socket libmilter accepts (without it each message would wait ~40 ms
for a delayed ACK, and the benchmarks would measure the kernel's timer)."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import harness
from benchmarks.harness import BuildError, CFilter, build_c_filter
from milterbridge.send import Envelope, Verdict, send_main

MESSAGE = b"From: a@sender.test\nTo: b@rcpt.test\nSubject: hello\n\nline one\n"


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Built once for the module; a missing compiler or header fails here, loudly."""
    yield build_c_filter(tmp_path_factory.mktemp("c_filter_build"))


def _send(spec: str) -> tuple[int, str]:
    out = io.StringIO()
    envelope = Envelope(sender=b"a@sender.test", recipients=[b"b@rcpt.test"])
    return send_main(spec, envelope, MESSAGE, 10.0, out), out.getvalue()


def test_missing_libmilter_headers_fail_with_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """CI installs gcc and libmilter-dev: their absence is an error that says what to do."""
    monkeypatch.setattr(harness, "MFAPI_H", tmp_path / "no" / "mfapi.h")
    with pytest.raises(BuildError, match="libmilter-dev"):
        build_c_filter(tmp_path)


def test_the_binary_defines_accept_for_libmilter_to_call(binary: Path) -> None:
    """The TCP_NODELAY interposition needs accept() in the executable's dynamic symbols."""
    symbols = subprocess.run(["nm", "-D", str(binary)], capture_output=True, text=True, check=True)
    assert any(line.split()[-2:] == ["T", "accept"] for line in symbols.stdout.splitlines())


def test_adds_its_header_at_end_of_message_with_nodelay_set(binary: Path, tmp_path: Path) -> None:
    """One message through the codec: the header edit arrives, and the socket libmilter
    accepted had TCP_NODELAY on (read back by the filter itself)."""
    with CFilter(binary, tmp_path, header=("X-Checked", "yes"), verbose=True) as f:
        status, out = _send(f.spec)
        assert status == Verdict.ACCEPTED
        log = f.stderr_text()
    assert "  edit      addheader X-Checked: yes" in out
    assert "+X-Checked: yes\n" in out
    assert "tcp_nodelay=1" in log, log
    assert "tcp_nodelay=0" not in log


def test_nagle_leaves_the_socket_as_libmilter_accepted_it(binary: Path, tmp_path: Path) -> None:
    """--nagle: a stock packaged filter's socket, for the delayed-ACK experiment."""
    with CFilter(binary, tmp_path, verbose=True, nagle=True) as f:
        status, _ = _send(f.spec)
        assert status == Verdict.ACCEPTED
        log = f.stderr_text()
    assert "tcp_nodelay=0" in log, log


def test_sleeps_then_answers(binary: Path, tmp_path: Path) -> None:
    """--sleep-ms delays end-of-message (how long is the benchmarks' business, not asserted)."""
    with CFilter(binary, tmp_path, sleep_ms=20) as f:
        status, out = _send(f.spec)
    assert status == Verdict.ACCEPTED
    assert "addheader X-Bench-Filter: 1" in out


@pytest.mark.parametrize(
    ("verdict", "expected"),
    [
        ("reject", Verdict.REJECTED),
        ("tempfail", Verdict.TEMPFAILED),
        ("discard", Verdict.DISCARDED),
        ("accept", Verdict.ACCEPTED),
    ],
)
def test_end_of_message_verdict(
    binary: Path, tmp_path: Path, verdict: str, expected: Verdict
) -> None:
    with CFilter(binary, tmp_path, verdict=verdict) as f:
        status, _ = _send(f.spec)
    assert status == expected


def test_no_header_and_a_unix_socket(binary: Path, tmp_path: Path) -> None:
    """An empty header name adds nothing; on a Unix socket there is no TCP option to set."""
    with CFilter(binary, tmp_path, header=None, unix=True, verbose=True) as f:
        status, out = _send(f.spec)
        log = f.stderr_text()
    assert status == Verdict.ACCEPTED
    assert "edit" not in out
    assert "(message unchanged)" in out
    assert "unix" in log


def test_several_edits_are_numbered_headers_in_order(binary: Path, tmp_path: Path) -> None:
    """--edits 3: NAME-1 .. NAME-3 with the value, in that order, instead of NAME itself;
    --log-edits logs each edit sent and the reply, numbered by end-of-message call."""
    with CFilter(binary, tmp_path, header=("X-Soak-f1", "v"), edits=3, log_edits=True) as f:
        status, out = _send(f.spec)
        log = f.stderr_text()
    assert status == Verdict.ACCEPTED
    assert log.splitlines() == ["eom 1 edit 1", "eom 1 edit 2", "eom 1 edit 3", "eom 1 replied"]
    edits = [line.strip() for line in out.splitlines() if line.startswith("  edit ")]
    assert edits == [f"edit      addheader X-Soak-f1-{i}: v" for i in (1, 2, 3)]
    assert "+X-Soak-f1-3: v\n" in out
    assert "X-Soak-f1: v" not in out


class _KillAtFirstEdit(io.StringIO):
    """``send``'s output, which kills the filter as soon as the first edit is printed:
    the edit has then arrived while the filter still owes the others and its reply."""

    def __init__(self, f: CFilter) -> None:
        super().__init__()
        self.filter = f

    def write(self, text: str) -> int:
        if text.startswith("  edit ") and self.filter.proc is not None:
            self.filter.kill()
        return super().write(text)


def test_each_edit_is_on_the_wire_before_the_next_is_made(binary: Path, tmp_path: Path) -> None:
    """What the soak test relies on: with --edit-gap-ms, a SIGKILL between two edits leaves
    the receiver with some of a filter's edits, no final reply, and a closed connection."""
    f = CFilter(
        binary, tmp_path, header=("X-Soak-f2", "v"), edits=3, edit_gap_ms=60_000, log_edits=True
    )
    f.start()
    out = _KillAtFirstEdit(f)
    try:
        envelope = Envelope(sender=b"a@sender.test", recipients=[b"b@rcpt.test"])
        status = send_main(f.spec, envelope, MESSAGE, 30.0, out)
    finally:
        f.stop()
    assert status == 1  # the connection closed at end-of-message: no verdict
    assert f.stderr_text().splitlines() == ["eom 1 edit 1"]
    edits = [line.strip() for line in out.getvalue().splitlines() if line.startswith("  edit ")]
    assert edits == ["edit      addheader X-Soak-f2-1: v"]
    assert "eom" not in out.getvalue()


def test_a_killed_filter_restarts_on_its_port(binary: Path, tmp_path: Path) -> None:
    """``port=``: after kill() and start() it listens where it did, and answers again."""
    port = harness.free_port()
    f = CFilter(binary, tmp_path, port=port).start()
    try:
        assert f.kill() == -9
        f.start()
        assert f.port == port
        status, out = _send(f.spec)
    finally:
        f.stop()
    assert status == Verdict.ACCEPTED
    assert "addheader X-Bench-Filter: 1" in out


def test_rejects_an_edit_count_of_zero(binary: Path) -> None:
    """No edits is said with an empty header name; --edits 0 is a usage error (status 2)."""
    result = subprocess.run(
        [str(binary), "--port", "1", "--edits", "0"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "--edits" in result.stderr


def test_stops_when_its_parent_closes_stdin(binary: Path, tmp_path: Path) -> None:
    """--exit-on-stdin-eof: a benchmark that dies never leaves a filter listening."""
    f = CFilter(binary, tmp_path).start()
    assert f.stop() == 0
