"""The real tools the deploy/ files are checked with; a missing one fails the test, never skips."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

#: Tool -> the Debian package that provides it (installed by .ci/system-deps.sh).
PACKAGES = {
    "promtool": "prometheus",
    "systemd-analyze": "systemd",
    "m4": "m4",
}


def require_tool(name: str) -> str:
    """The tool's path; fails the test with the package to install when it is missing."""
    path = shutil.which(name, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        package = PACKAGES.get(name, name)
        pytest.fail(
            f"{name} is missing: apt-get install {package} (bash .ci/system-deps.sh does it)",
            pytrace=False,
        )
    return path


def run(argv: list[str], *, stdin: bytes | None = None, cwd: Path | None = None) -> str:
    """Run a tool; fail the test with its output unless it exits 0. Returns stdout + stderr."""
    proc = subprocess.run(argv, input=stdin, capture_output=True, cwd=cwd, timeout=120, check=False)
    output = (proc.stdout + proc.stderr).decode(errors="replace")
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {proc.returncode}:\n{output}", pytrace=False)
    return output
