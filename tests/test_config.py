"""Loading the config file and `milterbridge check-config`."""

from __future__ import annotations

from pathlib import Path

import pytest

from milterbridge.cli import main
from milterbridge.config import EMBEDDED_DEFAULT, ConfigError, load_config


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
    assert main(["run", "--listen", "inet:nowhere", "--log-format", "json"]) == 2
    assert "--listen" in capsys.readouterr().err
