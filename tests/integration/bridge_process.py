"""Runs ``python -m milterbridge run`` as a subprocess for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

import trio


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class BridgeProcess:
    """The service on one listener; ``logs()`` returns its JSON log lines."""

    def __init__(
        self,
        workdir: Path,
        *,
        listen: str | None = None,
        args: list[str] | None = None,
        listening: int = 1,
        start_timeout: float = 15.0,
    ):
        """``listening``: how many ``listening`` lines mean started (one per worker with
        ``--workers``); ``start_timeout``: how long ``with`` waits for them."""
        self.workdir = workdir
        self.listening = listening
        self.start_timeout = start_timeout
        self.listen = listen or f"inet:127.0.0.1:{free_port()}"
        self.args = args or []
        self.log_path = workdir / "bridge.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float | None = None) -> Self:
        timeout = self.start_timeout if timeout is None else timeout
        # A second start would lose the first process (and leave it running).
        assert self.proc is None or self.proc.poll() is not None, "already started"
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "milterbridge",
                    "run",
                    "--listen",
                    self.listen,
                    "--log-format",
                    "json",
                    # Tests run side by side: never the fixed default admin port.
                    "--admin-listen",
                    "127.0.0.1:0",
                    *self.args,
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=Path(__file__).resolve().parents[2],
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.events("listening")) >= self.listening:
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise AssertionError(f"bridge did not start:\n{self.log_path.read_text()}")

    def logs(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.log_path.read_bytes().splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                lines.append({"event": "unparsed", "text": raw.decode(errors="replace")})
        return lines

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.logs() if line.get("event") == name]

    def wait_for(self, name: str, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if len(found) >= count:
                return found
            time.sleep(0.02)
        raise AssertionError(f"no {count} {name!r} lines:\n{self.log_path.read_text()}")

    async def until_logged(
        self, name: str, count: int = 1, within: float = 10.0
    ) -> list[dict[str, Any]]:
        """``wait_for`` for trio tests: polls with trio.sleep, so the test's own tasks (fake
        milters the bridge talks to) keep running meanwhile."""
        with trio.move_on_after(within):
            # A log file has no event to wait on: polled.
            while len(found := self.events(name)) < count:  # noqa: ASYNC110
                await trio.sleep(0.02)
            return found
        raise AssertionError(f"no {count} {name!r} lines:\n{self.log_path.read_text()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def address(self) -> str:
        """The first milter address of the first ``listening`` line (the real port for 0)."""
        address: str = self.events("listening")[0]["addresses"][0]
        return address

    def send_signal(self, signum: int) -> None:
        assert self.proc is not None, "not started"
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for the process to exit by itself; its exit status."""
        assert self.proc is not None, "not started"
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
