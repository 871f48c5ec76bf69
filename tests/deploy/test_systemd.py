"""deploy/systemd/milterbridge.service, checked with systemd-analyze."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.deploy.tools import DEPLOY, require_tool, run

UNIT = DEPLOY / "systemd" / "milterbridge.service"
INSTALLED = "ExecStart=/opt/milterbridge/.venv/bin/milterbridge "


def verifiable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this interpreter.

    ``systemd-analyze verify`` fails a unit whose ExecStart binary does not exist, and the
    shipped path (/opt/milterbridge/.venv) exists only where the bridge is installed. The copy
    runs the same command line through the interpreter running the tests; every other line is
    the shipped one.
    """
    text = UNIT.read_text()
    assert text.count(INSTALLED) == 1, "ExecStart changed: update this test"
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(INSTALLED, f"ExecStart={sys.executable} -m milterbridge "))
    return copy


def test_unit_passes_systemd_analyze_verify_without_a_warning(tmp_path: Path) -> None:
    """verify exits 0 even for unknown keys and bad values, so any output is a failure too."""
    output = run([require_tool("systemd-analyze"), "verify", str(verifiable_copy(tmp_path))])
    assert output.strip() == "", output


def test_unit_hardening_stays_ok(tmp_path: Path) -> None:
    """systemd's own exposure score stays in its "OK" band (at most 2.0 of 10)."""
    output = run(
        [
            require_tool("systemd-analyze"),
            "security",
            "--offline=yes",
            "--threshold=20",
            str(verifiable_copy(tmp_path)),
        ]
    )
    assert "Overall exposure level for milterbridge.service" in output


def test_unit_has_what_the_service_needs() -> None:
    """Reload by SIGHUP, a runtime dir for the unix socket, a state dir, no new privileges."""
    lines = set(UNIT.read_text().splitlines())
    for line in (
        "ExecReload=/bin/kill -HUP $MAINPID",
        "RuntimeDirectory=milterbridge",
        "StateDirectory=milterbridge",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "DynamicUser=yes",
    ):
        assert line in lines, line
    # The process metrics read /proc/stat: ProcSubset=pid would hide it.
    assert not any(line.startswith("ProcSubset=") for line in lines)
