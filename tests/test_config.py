"""Loading the config file and `milterbridge check-config`."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from milterbridge.app import ConfigSource
from milterbridge.cli import main
from milterbridge.config import (
    EMBEDDED_DEFAULT,
    Config,
    ConfigError,
    load_config,
    parse_host_port,
)
from milterbridge.listeners import InetSpec, parse_listener


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "milterbridge.toml"
    path.write_text(text)
    return path


def test_empty_file_is_the_embedded_default(tmp_path: Path) -> None:
    """Every table is optional: an empty file means the built-in defaults."""
    assert load_config(_write(tmp_path, "")) == EMBEDDED_DEFAULT
    assert EMBEDDED_DEFAULT.server.listen == ["inet:127.0.0.1:8899"]


def test_server_keys_are_read(tmp_path: Path) -> None:
    """[server] listen and socketMode are taken from the file."""
    config = load_config(
        _write(
            tmp_path,
            '[server]\nlisten = ["unix:/run/m.sock", "inet:0.0.0.0:9"]\nsocketMode = "0666"\n',
        )
    )
    assert config.server.listen == ["unix:/run/m.sock", "inet:0.0.0.0:9"]
    assert config.server.socket_mode == "0666"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nlisten = 5\n", "server.listen: Expected `array`, got `int`"),
        ("[server]\nlisten = []\n", "server.listen: Expected `array` of length >= 1"),
        ("[server]\nlistn = []\n", "server: Object contains unknown field `listn`"),
        ("[srever]\n", "(top level): Object contains unknown field `srever`"),
        ('[server]\nlisten = ["tcp:1:2"]\n', "server: listen: 'tcp:1:2': unknown kind"),
        ('[server]\nsocketMode = "999"\n', "server.socketMode: Expected `str` matching"),
        ("[server\n", "at line 1"),
    ],
)
def test_errors_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    """Each error starts with the file name, then the key path, then the problem."""
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """An unreadable file is reported like any other config problem."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_check_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config exits 0 for a good file and 2, with the error on stderr, for a bad one."""
    assert main(["check-config", str(_write(tmp_path, ""))]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["check-config", str(_write(tmp_path, "[x]\n"))]) == 2
    assert "unknown field `x`" in capsys.readouterr().err


def test_run_refuses_a_bad_listen_option(capsys: pytest.CaptureFixture[str]) -> None:
    """`run --listen` with a malformed spec exits 2 before binding anything."""
    # --allow-core-dumps: an in-process run must not turn core dumps off for pytest itself.
    argv = ["run", "--listen", "inet:nowhere", "--log-format", "json", "--allow-core-dumps"]
    assert main(argv) == 2
    assert "--listen" in capsys.readouterr().err


# --- safe defaults ------------------------------------------------------------------------------

REPOSITORY = Path(__file__).resolve().parents[1]


def _hosts(config: Config) -> list[str]:
    """The host of every milter listener and of the admin listener."""
    hosts = []
    for spec in config.server.listen:
        parsed = parse_listener(spec)
        assert isinstance(parsed, InetSpec), spec
        hosts.append(parsed.host)
    return [*hosts, parse_host_port(config.admin.listen)[0]]


@pytest.mark.parametrize(
    "config",
    [
        lambda: EMBEDDED_DEFAULT,
        lambda: ConfigSource().load(),  # what `run` without --config serves
        lambda: load_config(REPOSITORY / "deploy" / "milterbridge.toml"),  # the example to copy
    ],
    ids=["embedded", "run-without-config", "deploy-example"],
)
def test_the_defaults_listen_on_loopback_only(config: Callable[[], Config]) -> None:
    """Nothing off the host reaches the milter port or the admin port unless a file says so."""
    hosts = _hosts(config())
    assert len(hosts) == 2
    assert all(ipaddress.ip_address(host).is_loopback for host in hosts), hosts


INSECURE = """
[[milter]]
name = "tls-unverified"
hostname = "127.0.0.1"
useTls = true
allowInvalidCerts = true

[[milter]]
name = "plain-with-the-key"
hostname = "127.0.0.1"
allowInvalidCerts = true

[[milter]]
name = "tls-verified"
hostname = "127.0.0.1"
useTls = true

[[hook]]
name = "https-unverified"
url = "https://policy.example/hook"
allowInvalidCerts = true

[[hook]]
name = "http-with-the-key"
url = "http://policy.example/hook"
allowInvalidCerts = true

[[hook]]
name = "https-verified"
url = "https://policy.example/hook"
"""


def test_unverified_tls_is_a_warning_at_every_load(tmp_path: Path) -> None:
    """One insecure_tls warning per filter that speaks TLS without checking the certificate,
    naming it, each time the file is loaded (start, reload, check-config); none where TLS is
    verified or not used at all (the key then has no effect)."""
    path = _write(tmp_path, INSECURE)
    with capture_logs() as logs:
        load_config(path)
        load_config(path)
    warnings = [line for line in logs if line["event"] == "insecure_tls"]
    assert [(line["kind"], line["filter"]) for line in warnings] == [
        ("milter", "tls-unverified"),
        ("hook", "https-unverified"),
    ] * 2
    assert all(line["log_level"] == "warning" for line in warnings)
    assert warnings[0]["config"] == str(path)
    assert "allowInvalidCerts" in warnings[0]["reason"]
    assert [line for line in logs if line["event"] != "insecure_tls"] == []


def test_verified_tls_loads_without_a_warning(tmp_path: Path) -> None:
    with capture_logs() as logs:
        load_config(_write(tmp_path, INSECURE.replace("allowInvalidCerts = true", "")))
    assert logs == []
