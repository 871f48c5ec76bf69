"""deploy/postfix and deploy/sendmail: the MTA settings, applied to the real MTA tools."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.deploy.tools import DEPLOY, require_tool, run
from tests.integration.bridge_process import BridgeProcess, free_port
from tests.integration.postfix_harness import (
    POSTCONF_BIN,
    PostfixInstance,
    make_message,
    require_postfix,
)

SNIPPET = DEPLOY / "postfix" / "main.cf.snippet"
SENDMAIL_MC = DEPLOY / "sendmail" / "sendmail.mc"
SENDMAIL_CF_M4 = Path("/usr/share/sendmail/cf/m4/cf.m4")


def snippet_settings() -> dict[str, str]:
    """The snippet's ``name = value`` lines (no continuation lines are used in it)."""
    settings: dict[str, str] = {}
    for line in SNIPPET.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        assert not line[0].isspace(), f"continuation lines are not read here: {line!r}"
        name, sep, value = line.partition(" = ")
        assert sep, line
        settings[name] = value
    return settings


def test_snippet_sets_what_the_bridge_needs() -> None:
    """The bridge on 8899 for SMTP and local mail, tempfail, protocol 6, the wanted macros."""
    settings = snippet_settings()
    assert settings["smtpd_milters"] == settings["non_smtpd_milters"] == "inet:127.0.0.1:8899"
    assert settings["milter_default_action"] == "tempfail"
    assert settings["milter_protocol"] == "6"
    sent = {
        name for key, value in settings.items() if key.endswith("_macros") for name in value.split()
    }
    wanted = "{auth_authen} {auth_type} {tls_version} {cipher} {cipher_bits} {cert_issuer}"
    wanted += " {cert_subject} {daemon_addr} {daemon_port} {daemon_name} {client_ptr} i j _"
    assert set(wanted.split()) <= sent


def test_snippet_passes_postfix_check_with_no_unknown_parameter(tmp_path: Path) -> None:
    """A Postfix instance with the snippet applied passes `postfix check`, and postconf knows
    every parameter name in it (a misspelt one would be reported as unused)."""
    require_postfix()
    with PostfixInstance(tmp_path, main_cf=snippet_settings()) as postfix:
        warnings = postfix.check()
        assert "warning" not in warnings.lower(), warnings
        proc = subprocess.run(
            [POSTCONF_BIN, "-c", str(postfix.config_dir), "-n"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "warning" not in proc.stderr.lower(), proc.stderr
        for name, value in snippet_settings().items():
            assert f"{name} = {value}" in proc.stdout


@pytest.mark.parametrize("with_snippet", [True, False], ids=["snippet", "postfix-defaults"])
def test_postfix_sends_the_snippets_macros_to_the_bridge(
    tmp_path: Path, with_snippet: bool
) -> None:
    """End to end: with the snippet's macro lists Postfix sends {daemon_port}; without them it
    does not. A milter enabled only while local_port is empty -- and unreachable, so that
    joining tempfails the message -- tells the two apart."""
    require_postfix()
    config = tmp_path / "milterbridge.toml"
    config.write_text(
        f'[[milter]]\nname = "canary"\nhostname = "127.0.0.1"\nport = {free_port()}\n'
        'stages = ["connect"]\nenable = { else = "local_port == \'\'" }\n'
    )
    args = ["--config", str(config), "--admin-listen", ""]
    settings = snippet_settings() if with_snippet else {}
    with BridgeProcess(tmp_path / "bridge", args=args) as bridge:
        settings.update(smtpd_milters=bridge.listen, non_smtpd_milters=bridge.listen)
        with PostfixInstance(tmp_path / "pf", main_cf=settings) as postfix:
            result = postfix.send(
                "a@sender.test", ["b@rcpt.test"], make_message([("Subject", "x")], b"x\r\n")
            )
    assert result.accepted is with_snippet, result


def test_sendmail_mc_builds_a_sendmail_cf_with_the_filter_and_macros(tmp_path: Path) -> None:
    """Sendmail's own m4 macros turn the lines into the filter definition and macro options."""
    m4 = require_tool("m4")
    if not SENDMAIL_CF_M4.exists():
        pytest.fail(
            f"{SENDMAIL_CF_M4} is missing: apt-get install sendmail-cf "
            "(bash .ci/system-deps.sh does it)",
            pytrace=False,
        )
    mc = tmp_path / "test.mc"
    mc.write_text(
        f"divert(-1)\ninclude(`{SENDMAIL_CF_M4}')\ndivert(0)dnl\n"
        "OSTYPE(`linux')dnl\nDOMAIN(`generic')dnl\n"
        + SENDMAIL_MC.read_text()
        + "MAILER(`local')dnl\nMAILER(`smtp')dnl\n"
    )
    cf = run([m4, str(mc)], cwd=tmp_path)
    lines = cf.splitlines()
    assert "O InputMailFilters=milterbridge" in lines
    assert "Xmilterbridge, S=inet:8899@127.0.0.1, F=T, T=C:10s;S:30s;R:30s;E:5m" in lines
    connect = next(line for line in lines if line.startswith("O Milter.macros.connect="))
    for macro in ("{daemon_addr}", "{daemon_port}", "{client_ptr}", "j", "_"):
        assert macro in connect.split("=", 1)[1].replace(",", " ").split()
    assert any(line.startswith("O Milter.macros.eom=") and " i" in line for line in lines)
