"""The ``[[milter]]`` filter tables, durations and sizes, and check-config's filter summary."""

from __future__ import annotations

import math
from pathlib import Path

import msgspec
import pytest

from milterbridge.cli import main
from milterbridge.config import (
    ACTION_FLAGS_MASK,
    PROTOCOL_FLAGS_MASK,
    SMTP_STAGE_ORDER,
    ConfigError,
    Expression,
    ExpressionMatch,
    MilterFilter,
    ServerConfig,
    load_config,
    parse_config,
)
from milterbridge.durations import Duration, Size, dec_hook, enc_hook

FILE = Path("/etc/milterbridge.toml")
DEPLOY_EXAMPLE = Path(__file__).parent.parent / "deploy" / "milterbridge.toml"


def _one(body: str, *, head: str = 'name = "a"\nhostname = "h"\n') -> MilterFilter:
    config = parse_config(f"[[milter]]\n{head}{body}", FILE)
    assert len(config.milter) == 1
    return config.milter[0]


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, FILE)
    message = str(info.value)
    assert message.startswith(f"{FILE}: ")
    return message.removeprefix(f"{FILE}: ")


# --- defaults and parsing -----------------------------------------------------------------------


def test_milter_defaults_match_the_reference_object() -> None:
    """A table with only name and hostname gets the reference object's default for every key."""
    milter = _one("")
    assert milter.name == "a"
    assert milter.hostname == "h"
    assert milter.unix_path is None
    assert milter.port == 11332
    assert milter.use_tls is False
    assert milter.allow_invalid_certs is False
    assert milter.max_response_size == 52428800
    assert isinstance(milter.max_response_size, Size)
    assert milter.temp_fail_on_error is True
    assert milter.protocol_version == "v6"
    assert milter.stages == ["data"]
    assert milter.timeout_command == 30.0
    assert milter.timeout_connect == 30.0
    assert milter.timeout_data == 60.0
    assert isinstance(milter.timeout_data, Duration)
    assert milter.flags_action is None
    assert milter.flags_protocol is None
    assert milter.enable == Expression(else_="true")
    assert milter.enable.evaluate({}) is True
    assert milter == MilterFilter(name="a", hostname="h")


def test_no_milter_tables_means_no_filters() -> None:
    """Without [[milter]] tables the list is empty; `milter = []` says the same."""
    assert parse_config("", FILE).milter == []
    assert parse_config("milter = []\n", FILE).milter == []


def test_every_milter_key_is_read() -> None:
    """Each key of a [[milter]] table lands in its attribute, with the value written."""
    milter = _one(
        "port = 1\n"
        "useTls = true\n"
        "allowInvalidCerts = true\n"
        'maxResponseSize = "2MiB"\n'
        "tempFailOnError = false\n"
        'protocolVersion = "v2"\n'
        'stages = ["rcpt", "connect", "data", "ehlo", "auth", "mail"]\n'
        'timeoutCommand = "500ms"\n'
        'timeoutConnect = "2m"\n'
        "timeoutData = 90\n"
        "flagsAction = 0x1FF\n"
        "flagsProtocol = 0x301FFFFF\n"
        'enable = { match = [], else = "false" }\n',
        head='name = "rspamd-1.main_x"\nhostname = "scanner.example.org"\n',
    )
    assert milter == MilterFilter(
        name="rspamd-1.main_x",
        hostname="scanner.example.org",
        port=1,
        use_tls=True,
        allow_invalid_certs=True,
        max_response_size=Size(2 * 1024 * 1024),
        temp_fail_on_error=False,
        protocol_version="v2",
        stages=["rcpt", "connect", "data", "ehlo", "auth", "mail"],
        timeout_command=Duration(0.5),
        timeout_connect=Duration(120),
        timeout_data=Duration(90),
        flags_action=0x1FF,
        flags_protocol=0x301FFFFF,
        enable=Expression(else_="false"),
    )
    assert milter.enable.evaluate({}) is False


def test_unix_path_replaces_hostname() -> None:
    """A milter on a Unix socket has unixPath and no hostname."""
    milter = _one('unixPath = "/run/opendkim/opendkim.sock"\n', head='name = "dkim"\n')
    assert milter.unix_path == "/run/opendkim/opendkim.sock"
    assert milter.hostname is None


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "::1", "fe80::1%eth0", "a.b-c.d_e."])
def test_hostname_accepts_names_and_addresses(host: str) -> None:
    """Host names, IPv4 and IPv6 addresses (without brackets) are accepted."""
    assert _one("", head=f'name = "a"\nhostname = "{host}"\n').hostname == host


def test_filters_keep_file_order() -> None:
    """[[milter]] tables are kept in file order, which is the merge order."""
    text = "".join(f'[[milter]]\nname = "{name}"\nhostname = "h"\n' for name in "cab")
    assert [milter.name for milter in parse_config(text, FILE).milter] == ["c", "a", "b"]


def test_stages_keep_their_order_and_sort_in_smtp_order() -> None:
    """`stages` is kept as written; stages_in_smtp_order() sorts it in session order."""
    milter = _one('stages = ["data", "mail", "connect"]\n')
    assert milter.stages == ["data", "mail", "connect"]
    assert milter.stages_in_smtp_order() == ("connect", "mail", "data")
    everything = _one(f"stages = {list(reversed(SMTP_STAGE_ORDER))!r}\n".replace("'", '"'))
    assert everything.stages_in_smtp_order() == SMTP_STAGE_ORDER
    assert SMTP_STAGE_ORDER == ("connect", "ehlo", "auth", "mail", "rcpt", "data")


def test_flag_masks() -> None:
    """The masks are libmilter's SMFI_CURR_ACTS and SMFI_CURR_PROT plus the two MDS bits."""
    assert ACTION_FLAGS_MASK == 0x1FF
    assert PROTOCOL_FLAGS_MASK == 0x1FFFFF | 0x10000000 | 0x20000000
    assert _one("flagsAction = 0\nflagsProtocol = 0\n").flags_action == 0
    assert _one("flagsProtocol = 0x10000000\n").flags_protocol == 0x10000000


# --- errors -------------------------------------------------------------------------------------

M = '[[milter]]\nname = "a"\nhostname = "h"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # name
        ('[[milter]]\nhostname = "h"\n', "milter[0]: Object missing required field `name`"),
        (
            '[[milter]]\nname = "a b"\nhostname = "h"\n',
            "milter[0].name: Expected `str` matching regex '^[A-Za-z0-9_.-]{1,64}$'",
        ),
        (
            f'[[milter]]\nname = "{"x" * 65}"\nhostname = "h"\n',
            "milter[0].name: Expected `str` matching regex",
        ),
        ('[[milter]]\nname = ""\nhostname = "h"\n', "milter[0].name: Expected `str` matching"),
        (
            M + M.replace('"a"', '"b"') + M,
            "milter[2].name: duplicate filter name 'a' (also milter[0])",
        ),
        # hostname / unixPath
        ('[[milter]]\nname = "a"\n', "milter[0]: missing hostname (or unixPath for a Unix socket)"),
        (M + 'unixPath = "/s"\n', "milter[0]: give hostname or unixPath, not both"),
        (
            '[[milter]]\nname = "a"\nhostname = "[::1]"\n',
            "milter[0].hostname: '[::1]' is not a host name or IP address",
        ),
        (
            '[[milter]]\nname = "a"\nhostname = ""\n',
            "milter[0].hostname: '' is not a host name or IP address",
        ),
        (
            '[[milter]]\nname = "a"\nhostname = "h:11332"\n',
            "milter[0].hostname: 'h:11332' is not a host name or IP address",
        ),
        ('[[milter]]\nname = "a"\nhostname = 1\n', "milter[0].hostname: Expected `str | null`"),
        (
            '[[milter]]\nname = "a"\nunixPath = "run/m.sock"\n',
            "milter[0].unixPath: 'run/m.sock': the path must be absolute",
        ),
        (
            f'[[milter]]\nname = "a"\nunixPath = "/{"x" * 107}"\n',
            "milter[0].unixPath: '/xxx",
        ),
        (
            '[[milter]]\nname = "a"\nunixPath = "/s\\u0000"\n',
            "milter[0].unixPath: '/s\\x00': contains a NUL character",
        ),
        (
            '[[milter]]\nname = "a"\nunixPath = "/s"\nuseTls = true\n',
            "milter[0].useTls: TLS is not available over a Unix socket (unixPath)",
        ),
        # port and booleans
        (M + "port = 0\n", "milter[0].port: Expected `int` >= 1"),
        (M + "port = 65536\n", "milter[0].port: Expected `int` <= 65535"),
        (M + 'port = "25"\n', "milter[0].port: Expected `int`, got `str`"),
        (M + 'useTls = "yes"\n', "milter[0].useTls: Expected `bool`, got `str`"),
        (M + "allowInvalidCerts = 1\n", "milter[0].allowInvalidCerts: Expected `bool`, got `int`"),
        (M + "tempFailOnError = 0\n", "milter[0].tempFailOnError: Expected `bool`, got `int`"),
        # protocolVersion and stages
        (M + 'protocolVersion = "v4"\n', "milter[0].protocolVersion: Invalid enum value 'v4'"),
        (M + "protocolVersion = 6\n", "milter[0].protocolVersion: Expected `str`, got `int`"),
        (M + "stages = []\n", "milter[0].stages: Expected `array` of length >= 1"),
        (M + 'stages = ["data", "helo"]\n', "milter[0].stages[1]: Invalid enum value 'helo'"),
        (M + 'stages = "data"\n', "milter[0].stages: Expected `array`, got `str`"),
        (
            M + 'stages = ["mail", "rcpt", "mail"]\n',
            "milter[0].stages[2]: stage 'mail' is listed twice",
        ),
        # durations and sizes
        (M + 'timeoutCommand = "30"\n', "milter[0].timeoutCommand: invalid duration '30'"),
        (
            M + 'timeoutConnect = "0s"\n',
            "milter[0].timeoutConnect: duration must be greater than 0, got '0s'",
        ),
        (M + "timeoutData = -1\n", "milter[0].timeoutData: duration must be a finite"),
        (M + "timeoutData = nan\n", "milter[0].timeoutData: duration must be a finite"),
        (
            M + "timeoutData = true\n",
            "milter[0].timeoutData: Expected a duration such as '30s' or a number of seconds, "
            "got `bool`",
        ),
        (M + 'maxResponseSize = "50 mb"\n', "milter[0].maxResponseSize: invalid size '50 mb'"),
        (M + "maxResponseSize = 0\n", "milter[0].maxResponseSize: size must be at least 1 byte"),
        (
            M + "maxResponseSize = 1.5\n",
            "milter[0].maxResponseSize: Expected a size such as '50MB' or a whole number of "
            "bytes, got `float`",
        ),
        # flags
        (
            M + "flagsAction = 1000\n",
            "milter[0].flagsAction: 1000 (0x3e8) has bits outside the SMFIF_* action flags "
            "(mask 0x1ff)",
        ),
        (M + "flagsAction = -1\n", "milter[0].flagsAction: -1: SMFIF_* action flags cannot be"),
        (
            M + "flagsProtocol = 0x40000000\n",
            "milter[0].flagsProtocol: 1073741824 (0x40000000) has bits outside the SMFIP_* "
            "protocol flags (mask 0x301fffff)",
        ),
        (M + 'flagsProtocol = "0x10"\n', "milter[0].flagsProtocol: Expected `int | null`"),
        # enable
        (M + "enable = {}\n", "milter[0].enable: Object missing required field `else`"),
        (M + "enable = true\n", "milter[0].enable: Expected `object`, got `bool`"),
        (M + "enable = { else = true }\n", "milter[0].enable.else: Expected `str`, got `bool`"),
        (
            M + 'enable = { else = "TRUE" }\n',
            "milter[0].enable.else: unknown variable 'TRUE'\n    TRUE\n    ~~~^",
        ),
        (
            M + 'enable = { match = [{ if = "is_tls &&", then = "true" }], else = "false" }\n',
            "milter[0].enable.match[0].if: expected a value at the end of the expression",
        ),
        (
            M + 'enable = { match = [{ if = "x" }], else = "false" }\n',
            "milter[0].enable.match[0]: Object missing required field `then`",
        ),
        (
            M + 'enable = { else = "true", when = "x" }\n',
            "milter[0].enable: Object contains unknown field `when`",
        ),
        # the table itself
        (M + "hostName = 'h'\n", "milter[0]: Object contains unknown field `hostName`"),
        (M + "pass = 0\n", "milter[0].pass: Expected `int` >= 1"),
        ('[milter]\nname = "a"\n', "milter: Expected `array`, got `object`"),
        (M + '[[milter]]\nname = "b"\nport = 1\n', "milter[1]: missing hostname"),
        ("[[filter]]\n", "(top level): Object contains unknown field `filter`"),
    ],
)
def test_milter_errors_name_the_key_path(text: str, message: str) -> None:
    """Each problem in a [[milter]] table is reported with its key path and a clear message."""
    assert _error(text).startswith(message)


# --- enable -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("false", False)])
def test_enable_constant(value: str, expected: bool) -> None:
    """`enable` takes the constants "true" and "false"."""
    milter = _one(f'enable = {{ else = "{value}" }}\n')
    assert milter.enable.evaluate({}) is expected
    assert milter.enable.match == []


def test_enable_rules_are_evaluated_against_session_variables() -> None:
    """The first matching `if` decides, else `else`; unknown variables are empty."""
    milter = _one(
        "enable = { match = ["
        '{ if = "is_ip_in_cidr(remote_ip, \'10.0.0.0/8\')", then = "false" }, '
        '{ if = "sender_domain == \'example.org\'", then = "true" }'
        '], else = "false" }\n'
    )
    assert (
        milter.enable.evaluate({"remote_ip": "10.1.2.3", "sender_domain": "example.org"}) is False
    )
    assert (
        milter.enable.evaluate({"remote_ip": "192.0.2.1", "sender_domain": "example.org"}) is True
    )
    assert milter.enable.evaluate({}) is False


def test_expression_errors_when_built_in_python() -> None:
    """Expressions built in code (e.g. by the admin API) are compiled and checked too."""
    with pytest.raises(ValueError, match="unknown variable"):
        Expression(else_="remote_adress == '1.2.3.4'")
    with pytest.raises(ValueError, match="unknown function"):
        Expression(else_="true", match=[ExpressionMatch(if_="is_spam()", then="false")])


def test_direct_construction_runs_the_same_checks() -> None:
    """MilterFilter built in code is validated like one read from the file."""
    with pytest.raises(ValueError, match="missing hostname"):
        MilterFilter(name="a")
    with pytest.raises(ValueError, match="listed twice"):
        MilterFilter(name="a", hostname="h", stages=["data", "data"])


# --- durations and sizes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds", "text"),
    [
        ("500ms", 0.5, "500ms"),
        ("1ms", 0.001, "1ms"),
        ("1001ms", 1.001, "1001ms"),
        ("30s", 30.0, "30s"),
        ("1.5s", 1.5, "1500ms"),
        ("30 s", 30.0, "30s"),
        ("2m", 120.0, "120s"),
        ("1h", 3600.0, "3600s"),
        ("0.25h", 900.0, "900s"),
        (30, 30.0, "30s"),
        (0.5, 0.5, "500ms"),
        (0.0001, 0.0001, "0.0001s"),
    ],
)
def test_duration_parse(value: str | float, seconds: float, text: str) -> None:
    """Durations take ms, s, m, h or a bare number of seconds; str() gives config notation."""
    duration = Duration.parse(value)
    assert isinstance(duration, Duration)
    assert math.isclose(duration, seconds)
    assert str(duration) == text
    assert Duration.parse(str(duration)) == duration


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("30", "invalid duration '30'"),
        ("30sec", "invalid duration"),
        ("1h30m", "invalid duration"),
        ("-1s", "invalid duration"),
        ("1e3s", "invalid duration"),
        ("", "invalid duration ''"),
        ("0ms", "greater than 0"),
        (0, "greater than 0"),
        (-0.5, "greater than 0"),
        (math.inf, "finite"),
        (math.nan, "finite"),
        (True, "got `bool`"),
        ([1], "got `list`"),
    ],
)
def test_duration_parse_refuses(value: object, error: str) -> None:
    """Anything but a positive finite duration is refused."""
    with pytest.raises((ValueError, TypeError), match=error.replace("(", r"\(")):
        Duration.parse(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (1, 1),
        (52428800, 52428800),
        ("100B", 100),
        ("512KB", 512_000),
        ("50MB", 50_000_000),
        ("1GB", 1_000_000_000),
        ("10KiB", 10 * 1024),
        ("1MiB", 1024 * 1024),
        ("1GiB", 1024**3),
        ("50 MB", 50_000_000),
    ],
)
def test_size_parse(value: str | int, size: int) -> None:
    """Sizes: KB/MB/GB are powers of 1000, KiB/MiB/GiB powers of 1024."""
    parsed = Size.parse(value)
    assert isinstance(parsed, Size)
    assert parsed == size


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("50mb", "invalid size '50mb'"),
        ("50M", "invalid size"),
        ("1.5MB", "invalid size"),
        ("MB", "invalid size"),
        ("", "invalid size"),
        ("0KB", "at least 1 byte"),
        (0, "at least 1 byte"),
        (-5, "at least 1 byte"),
        (1.0, "got `float`"),
        (False, "got `bool`"),
    ],
)
def test_size_parse_refuses(value: object, error: str) -> None:
    """Anything but a whole number of bytes >= 1 is refused."""
    with pytest.raises((ValueError, TypeError), match=error):
        Size.parse(value)


def test_duration_and_size_are_plain_numbers() -> None:
    """A Duration is float seconds and a Size int bytes, usable without conversion."""
    assert Duration(30) == 30.0
    assert Duration(2) * 2 == 4.0
    assert Size(10) + 1 == 11
    assert repr(Duration(0.5)) == "Duration('500ms')"
    assert repr(Size(7)) == "Size(7)"
    with pytest.raises(ValueError):
        Duration(0)
    with pytest.raises(TypeError):
        Size(True)


def test_filter_round_trips_through_json_with_the_hooks() -> None:
    """enc_hook writes durations in config notation and sizes as integers; dec_hook reads back."""
    milter = MilterFilter(
        name="a", unix_path="/s", timeout_command=Duration(0.25), max_response_size=Size(1000)
    )
    data = msgspec.json.encode(milter, enc_hook=enc_hook)
    document = msgspec.json.decode(data)
    assert document["timeoutCommand"] == "250ms"
    assert document["timeoutData"] == "60s"
    assert document["maxResponseSize"] == 1000
    assert document["enable"] == {"else": "true", "match": []}
    assert msgspec.json.decode(data, type=MilterFilter, dec_hook=dec_hook) == milter


# --- check-config and the shipped example -------------------------------------------------------


def test_check_config_lists_the_filters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config names the listeners and the milters, in file order."""
    path = tmp_path / "m.toml"
    path.write_text(
        '[[milter]]\nname = "rspamd"\nhostname = "h"\n'
        '[[milter]]\nname = "dkim"\nunixPath = "/run/dkim.sock"\n'
    )
    assert main(["check-config", str(path)]) == 0
    assert capsys.readouterr().out == (
        f"{path}: ok (listen: inet:127.0.0.1:8899; 2 milters: rspamd, dkim)\n"
    )
    path.write_text('[[milter]]\nname = "rspamd"\nhostname = "h"\n')
    assert main(["check-config", str(path)]) == 0
    assert "; 1 milter: rspamd)" in capsys.readouterr().out
    path.write_text("")
    assert main(["check-config", str(path)]) == 0
    assert "; 0 milters)" in capsys.readouterr().out


def test_check_config_reports_filter_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad [[milter]] table makes check-config exit 2 with the key path on stderr."""
    path = tmp_path / "m.toml"
    path.write_text(M + 'timeoutData = "soon"\n')
    assert main(["check-config", str(path)]) == 2
    assert f"milterbridge: {path}: milter[0].timeoutData: invalid duration 'soon'" in (
        capsys.readouterr().err
    )


def test_deploy_example_loads_with_and_without_its_milters(tmp_path: Path) -> None:
    """The shipped example is valid as is and with its commented [[milter]] tables enabled."""
    assert load_config(DEPLOY_EXAMPLE).milter == []
    lines = DEPLOY_EXAMPLE.read_text().splitlines()
    enabled = [
        line[2:] if line.startswith("# ") and ("=" in line or line.startswith("# [[")) else line
        for line in lines
    ]
    path = tmp_path / "enabled.toml"
    path.write_text("\n".join(enabled) + "\n")
    config = load_config(path)
    assert [milter.name for milter in config.milter] == ["rspamd", "opendkim"]
    assert config.milter[1].max_response_size == 1024 * 1024


def test_configuration_reference_covers_every_key(tmp_path: Path) -> None:
    """The README's configuration reference has a row for every key, and its example loads."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    doc = readme.split("## Configuration file", 1)[1].split("\n## ", 1)[0]
    for struct in (ServerConfig, MilterFilter):
        for field in msgspec.structs.fields(struct):
            assert f"| `{field.encode_name}` |" in doc, field.encode_name
    blocks = [block.split("```", 1)[0] for block in doc.split("```toml\n")[1:]]
    (example,) = [block for block in blocks if "[[milter]]" in block]
    path = tmp_path / "example.toml"
    path.write_text(example)
    assert [milter.name for milter in load_config(path).milter] == ["rspamd", "opendkim"]
    (rules,) = [block for block in blocks if block.startswith("enable")]
    path.write_text(f'[[milter]]\nname = "x"\nhostname = "h"\n{rules}')
    assert load_config(path).milter[0].enable.evaluate({"sender_domain": "vip.example"})


def _toml_escaped(text: str) -> str:
    return "".join(c if c.isprintable() and c != '"' else f"\\u{ord(c):04x}" for c in text)


@pytest.mark.parametrize("token", ["tok en ", " token", "tok\nen", "tok\x00en", "tok\x7fen"])
def test_a_bearer_token_no_header_can_carry_is_a_config_error_that_does_not_show_it(
    token: str,
) -> None:
    """Caught at load: at the first call h11 would refuse it with the header, token included,
    in its error text."""
    text = (
        '[[hook]]\nname = "h"\nurl = "http://127.0.0.1:1/"\n'
        f'httpAuth = {{ "@type" = "Bearer", bearerToken = '
        f'{{ "@type" = "Value", secret = "{_toml_escaped(token)}" }} }}\n'
    )
    error = _error(text)
    assert error.startswith("hook[0].httpAuth.bearerToken: holds a control character")
    assert "tok" not in error


def test_a_bearer_token_with_inner_spaces_and_utf8_loads() -> None:
    text = (
        '[[hook]]\nname = "h"\nurl = "http://127.0.0.1:1/"\n'
        'httpAuth = { "@type" = "Bearer", '
        'bearerToken = { "@type" = "Value", secret = "a b\\tç" } }\n'
    )
    assert parse_config(text, FILE).hook[0].http_auth is not None
