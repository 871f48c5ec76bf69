"""What the benchmark scripts (and tests/test_c_filter.py) share: the reference C filter, the
bridge as a process, the load generator as a process, and CPU accounting from /proc.

Synchronous on purpose, like tests/fixtures/filter_process.py: the scripts start processes,
wait for them to listen, then hand the measuring to ``milterbridge bench`` (trio) in a process
of its own, so nothing here competes with the generator for the event loop.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

import msgspec

REPO = Path(__file__).resolve().parents[1]
C_FILTER_DIR = REPO / "benchmarks" / "c_filter"
#: Where `make -C benchmarks/c_filter` puts the binary (build/ is git-ignored).
C_FILTER_BUILD = C_FILTER_DIR / "build"
MFAPI_H = Path("/usr/include/libmilter/mfapi.h")

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from milterbridge.bench import Summary  # noqa: E402

_CLK_TCK = os.sysconf("SC_CLK_TCK")


class BuildError(RuntimeError):
    pass


def build_c_filter(build_dir: Path = C_FILTER_BUILD) -> Path:
    """Compile bench_filter with its Makefile; the path of the binary.

    Raises BuildError naming what is missing: gcc and Debian's libmilter-dev are required
    (``.ci/system-deps.sh`` installs them), never optional.
    """
    missing = [
        what
        for what, present in (
            ("gcc", shutil.which("gcc") is not None),
            ("make", shutil.which("make") is not None),
            (f"libmilter-dev ({MFAPI_H})", MFAPI_H.exists()),
        )
        if not present
    ]
    if missing:
        raise BuildError(
            f"cannot build the C filter: missing {', '.join(missing)} "
            "(apt-get install gcc make libmilter-dev, or run .ci/system-deps.sh as root)"
        )
    result = subprocess.run(
        ["make", "-s", "-C", str(C_FILTER_DIR), f"BUILD={build_dir}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise BuildError(f"make failed:\n{result.stdout}{result.stderr}")
    return build_dir / "bench_filter"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_listening(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with status {proc.returncode} before listening")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")


class CFilter:
    """One bench_filter process (one libmilter instance), with FilterProcess's attributes."""

    def __init__(
        self,
        binary: Path,
        workdir: Path,
        *,
        name: str = "cfilter",
        sleep_ms: int = 0,
        header: tuple[str, str] | None = ("X-Bench-Filter", "1"),
        verdict: str = "continue",
        unix: bool = False,
        verbose: bool = False,
        edits: int = 1,
        edit_gap_ms: int = 0,
        port: int = 0,
        log_edits: bool = False,
        nagle: bool = False,
    ) -> None:
        """``edits`` > 1 adds the headers ``NAME-1`` .. ``NAME-N`` instead of one, with
        ``edit_gap_ms`` between two of them (the soak test kills filters between edits);
        ``port``, when not 0, is the TCP port to listen on at every start (a restarted filter
        must come back where the bridge's configuration says it is), else a free one;
        ``log_edits`` logs each edit sent and each reply to its stderr log."""
        self.binary = binary
        self.workdir = workdir
        self.name = name
        self.sleep_ms = sleep_ms
        self.header = header
        self.verdict = verdict
        self.unix = unix
        self.verbose = verbose
        self.edits = edits
        self.edit_gap_ms = edit_gap_ms
        self.fixed_port = port
        self.log_edits = log_edits
        self.nagle = nagle
        self.host = "127.0.0.1"
        self.port = 0
        self.path: Path | None = None
        self.log_path = workdir / f"{name}.stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def spec(self) -> str:
        """The milterbridge (and ``bench --to``) notation."""
        return f"unix:{self.path}" if self.path is not None else f"inet:{self.host}:{self.port}"

    @property
    def libmilter_spec(self) -> str:
        """The notation of libmilter and of Postfix's smtpd_milters."""
        return f"unix:{self.path}" if self.path is not None else f"inet:{self.port}@{self.host}"

    def argv(self) -> list[str]:
        argv = [str(self.binary), "--socket", self.libmilter_spec, "--ready"]
        argv += ["--exit-on-stdin-eof", "--sleep-ms", str(self.sleep_ms)]
        argv += ["--verdict", self.verdict]
        if self.header is None:
            argv += ["--header-name", ""]
        else:
            argv += ["--header-name", self.header[0], "--header-value", self.header[1]]
        if self.edits != 1 or self.edit_gap_ms:
            argv += ["--edits", str(self.edits), "--edit-gap-ms", str(self.edit_gap_ms)]
        if self.log_edits:
            argv.append("--log-edits")
        if self.verbose:
            argv.append("--verbose")
        if self.nagle:
            argv.append("--nagle")
        return argv

    def start(self, timeout: float = 10.0) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.unix:
            self.path = self.workdir / f"{self.name}.sock"
        else:
            self.port = self.fixed_port or free_port()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log
            )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if line != b"READY\n":
            self.stop()
            raise RuntimeError(f"bench_filter did not start: {self.stderr_text()[-2000:]}")
        return self

    def stop(self) -> int | None:
        """Close its stdin (it exits at once on EOF); SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        return proc.returncode

    def kill(self) -> int | None:
        """SIGKILL, as a crash would: its connections drop without a goodbye, mid-reply if
        it was writing one. ``start()`` brings it back (on the same port if it has one)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
        return proc.returncode

    def stderr_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def bridge_toml(filters: list[CFilter]) -> str:
    """One ``[[milter]]`` per filter, joining at DATA (the default stages)."""
    lines: list[str] = []
    for f in filters:
        where = (
            f'unixPath = "{f.path}"'
            if f.path is not None
            else f'hostname = "{f.host}"\nport = {f.port}'
        )
        lines += ["[[milter]]", f'name = "{f.name}"', where, 'stages = ["data"]', ""]
    return "\n".join(lines)


def workers_supported() -> bool:
    """Whether this checkout's ``milterbridge run`` has ``--workers`` (built separately)."""
    result = subprocess.run(
        [sys.executable, "-m", "milterbridge", "run", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    return "--workers" in result.stdout


class Bridge:
    """``python -m milterbridge run`` on a loopback port, logging warnings and errors only."""

    def __init__(
        self,
        workdir: Path,
        filters: list[CFilter],
        *,
        workers: int | None = None,
        server: str = "",
    ):
        """``server``: lines for the ``[server]`` table (e.g. ``deferMessageVerdicts = true``)."""
        self.workdir = workdir
        self.filters = filters
        self.workers = workers
        self.server = server
        self.port = 0
        self.log_path = workdir / "bridge.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def spec(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "bridge.toml"
        server = f"[server]\n{self.server}\n\n" if self.server else ""
        config.write_text(server + bridge_toml(self.filters))
        self.port = free_port()
        argv = [sys.executable, "-m", "milterbridge", "run", "--config", str(config)]
        argv += ["--listen", self.spec, "--admin-listen", "", "--log-level", "warning"]
        argv += ["--log-format", "json"]
        if self.workers is not None:
            argv += ["--workers", str(self.workers)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_listening("127.0.0.1", self.port, timeout, self.proc)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(
                f"bridge did not start ({exc}):\n{self.log_text()[-3000:]}"
            ) from None
        if self.workers is not None and self.workers > 1:
            self._wait_workers(self.workers, timeout)
        return self

    def _wait_workers(self, count: int, timeout: float) -> None:
        """Every worker must listen before a run: the supervisor's port answers earlier."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(descendants(self.proc.pid)) >= count:
                time.sleep(1.0)  # imports done, listeners bound
                return
            time.sleep(0.05)
        raise RuntimeError(f"the bridge did not start {count} workers")

    def pids(self) -> list[int]:
        """The bridge's processes: itself and, with --workers, its workers."""
        if self.proc is None:
            return []
        return [self.proc.pid, *descendants(self.proc.pid)]

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# /proc
# --------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (all its threads); 0 when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return 0.0
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rfind(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found: list[int] = []
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --------------------------------------------------------------------------------------------
# The load generator
# --------------------------------------------------------------------------------------------


def bench_argv(
    target: str,
    *,
    messages: int | None = None,
    duration: float | None = None,
    concurrency: int = 20,
    warmup: int = 0,
    headers: int = 10,
    body_size: int = 2048,
    recipients: int = 1,
    processes: int = 1,
    timeout: float = 60.0,
) -> list[str]:
    argv = [sys.executable, "-m", "milterbridge.bench", "--to", target, "--json"]
    argv += ["--concurrency", str(concurrency), "--warmup", str(warmup)]
    argv += ["--headers", str(headers), "--body-size", str(body_size)]
    argv += ["--recipients", str(recipients), "--processes", str(processes)]
    argv += ["--timeout", str(timeout)]
    if duration is not None:
        argv += ["--duration", str(duration)]
    else:
        argv += ["--messages", str(messages or 1000)]
    return argv


def run_bench(argv: list[str]) -> Summary:
    """Run the generator as a process of its own; its JSON summary.

    Exit status 1 (some messages failed) still has a summary; anything else is an error.
    """
    result = subprocess.run(argv, capture_output=True, cwd=REPO, check=False)
    if result.returncode not in (0, 1) or not result.stdout:
        raise RuntimeError(
            f"bench failed (exit {result.returncode}): {result.stderr.decode(errors='replace')}"
        )
    return msgspec.json.decode(result.stdout, type=Summary)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine_line() -> str:
    """The context a table needs: date, cores, load, kernel, Python."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, nproc {os.cpu_count()}, load average {load}, "
        f"kernel {os.uname().release}, Python {sys.version.split()[0]}"
    )
