"""Secrets -- hook credentials and admin tokens, given as Value, EnvironmentVariable or File --
never appear in a log line (any level, ours or httpx's), the text of an error, a ``get``
answer (over /api and from ``milterbridge get``) or the repr of the configuration.

One running service does everything a secret passes through: it loads the file, calls three
hooks that fail (each with its secret in its Authorization header), answers the admin API with
each token, refuses bad calls and bad tokens, and reloads the file (a good one and a broken one).
"""

from __future__ import annotations

import argparse
import base64
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from structlog.testing import capture_logs

from milterbridge.admin_client import add_admin_commands, admin_command
from milterbridge.app import ConfigSource, Service
from milterbridge.config import ConfigError, load_config
from milterbridge.milter import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    Connect,
    Connection,
    Family,
    OptNeg,
    Quit,
    Role,
)
from milterbridge.transport import MilterStream
from tests.fixtures.hook_server import Answer, Recorded, hook_server

HOOK_VALUE = "hookValue-S3CR3T-a1"
HOOK_ENV = "hookEnv-S3CR3T-b2"
HOOK_FILE = "hookFile-S3CR3T-c3"
TOKEN_VALUE = "tokenValue-S3CR3T-d4"
TOKEN_ENV = "tokenEnv-S3CR3T-e5"
TOKEN_FILE = "tokenFile-S3CR3T-f6"
API_VALUE = "apiValue-S3CR3T-g7"
SECRETS = [HOOK_VALUE, HOOK_ENV, HOOK_FILE, TOKEN_VALUE, TOKEN_ENV, TOKEN_FILE, API_VALUE]
#: The Basic hook's header holds its secret base64-encoded: that must not show either.
ENCODED = [base64.b64encode(f"u:{secret}".encode()).decode() for secret in SECRETS]
HOOK_ENV_VARIABLE = "MILTERBRIDGE_TEST_HOOK_SECRET"
TOKEN_ENV_VARIABLE = "MILTERBRIDGE_TEST_TOKEN_SECRET"
USING = ["urn:ietf:params:jmap:core", "urn:stalwart:jmap"]
ALL_HOOK = [f"sysMtaHook{op}" for op in ("Get", "Create", "Update", "Destroy", "Query")]


def assert_no_secret(text: str) -> None:
    for secret in [*SECRETS, *ENCODED]:
        assert secret not in text, f"{secret} leaked"


def config_text(tmp_path: Path, hook_url: str, *, timeout: str = "5s") -> str:
    return f"""
[server]
listen = ["inet:127.0.0.1:0"]

[admin]
listen = "127.0.0.1:0"
stateFile = "{tmp_path}/filters.json"

[[admin.token]]
name = "by-value"
secret = {{ "@type" = "Value", secret = "{TOKEN_VALUE}" }}
permissions = {ALL_HOOK}

[[admin.token]]
name = "by-env"
secret = {{ "@type" = "EnvironmentVariable", variableName = "{TOKEN_ENV_VARIABLE}" }}
permissions = ["sysMtaHookGet"]

[[admin.token]]
name = "by-file"
secret = {{ "@type" = "File", filePath = "{tmp_path}/token" }}
permissions = ["sysMtaHookGet"]

[[hook]]
name = "bearer-value"
url = "{hook_url}"
stages = ["connect"]
tempFailOnError = false
timeout = "{timeout}"
httpAuth = {{ "@type" = "Bearer", bearerToken = {{ "@type" = "Value", secret = "{HOOK_VALUE}" }} }}

[[hook]]
name = "basic-env"
url = "{hook_url}"
stages = ["connect"]
tempFailOnError = false
[hook.httpAuth]
"@type" = "Basic"
username = "u"
secret = {{ "@type" = "EnvironmentVariable", variableName = "{HOOK_ENV_VARIABLE}" }}

[[hook]]
name = "bearer-file"
url = "{hook_url}"
stages = ["connect"]
tempFailOnError = false
[hook.httpAuth]
"@type" = "Bearer"
bearerToken = {{ "@type" = "File", filePath = "{tmp_path}/hook" }}
"""


@pytest.fixture
def secret_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(HOOK_ENV_VARIABLE, HOOK_ENV)
    monkeypatch.setenv(TOKEN_ENV_VARIABLE, TOKEN_ENV)
    (tmp_path / "hook").write_text(HOOK_FILE + "\n")
    (tmp_path / "token").write_text(TOKEN_FILE + "\n")
    yield


class EchoAndFail:
    """Fails every call, echoing its Authorization header in the body (which must not be
    logged): with a 500 for the first three calls, then with a body that is not JSON."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, record: Recorded) -> Answer:
        self.calls += 1
        authorization = (record.header("authorization") or "").encode()
        if self.calls <= 3:
            return Answer(status=500, body=authorization)
        return Answer(body=b"not json: " + authorization)


async def mta_connect(address: str) -> None:
    """One MTA session that reaches CONNECT (where the three hooks are called) and quits."""
    host, _, port = address.removeprefix("inet:").rpartition(":")
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        mta = MilterStream(stream, Connection(Role.MTA))
        await mta.send(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
        await mta.receive()
        await mta.send(Connect(b"client.test", Family.INET, 4000, b"192.0.2.1"))
        while mta.connection.awaiting is not None:
            await mta.receive()
        await mta.send(Quit())


async def api(admin: str, token: str, *method_calls: list[Any]) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.post(
            f"http://{admin}/api",
            json={"using": USING, "methodCalls": list(method_calls)},
            headers={"Authorization": f"Bearer {token}"},
        )


async def cli_get(admin: str, token_variable: str, capsys: pytest.CaptureFixture[str]) -> str:
    parser = argparse.ArgumentParser()
    add_admin_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["get", "mta-hook", "--url", f"http://{admin}/api", "--token-env", token_variable]
    )
    assert await admin_command(args) == 0
    out, err = capsys.readouterr()
    return out + err


@pytest.mark.usefixtures("secret_sources")
async def test_secrets_never_leave_the_service(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []  # every answer and output the test reads
    with trio.fail_after(30), capture_logs() as logs:
        async with hook_server() as hooks, trio.open_nursery() as nursery:
            hooks.responder = EchoAndFail()
            path = tmp_path / "milterbridge.toml"
            path.write_text(config_text(tmp_path, hooks.url))
            source = ConfigSource(path=path)
            service = Service(source.load(), source=source)
            addresses = await nursery.start(service.run)
            admin = addresses.admin
            # Failing calls: a 500 from each hook, then answers that are not JSON.
            await mta_connect(addresses[0])
            await mta_connect(addresses[0])
            assert len(hooks.requests) == 6
            headers = " ".join(record.header("authorization") or "" for record in hooks.requests)
            assert HOOK_VALUE in headers  # the secrets did go where they belong
            assert HOOK_FILE in headers
            assert ENCODED[SECRETS.index(HOOK_ENV)] in headers
            # The API, with each token: get, a create that fails, one that works.
            for token in (TOKEN_VALUE, TOKEN_ENV, TOKEN_FILE):
                answer = await api(admin, token, ["x:MtaHook/get", {}, "g"])
                assert answer.status_code == 200
                seen.append(answer.text)
            bearer = {"@type": "Bearer", "bearerToken": {"@type": "Value", "secret": API_VALUE}}
            created = await api(
                admin,
                TOKEN_VALUE,
                [
                    "x:MtaHook/set",
                    {
                        "create": {
                            "bad": {"name": "bad", "url": "http://h/", "httpAuth": bearer, "x": 1},
                            "ok": {"name": "ok", "url": "http://h/", "httpAuth": bearer},
                        }
                    },
                    "s",
                ],
                ["x:MtaHook/get", {}, "g"],
            )
            answers = created.json()["methodResponses"]
            assert set(answers[0][1]["created"]) == {"ok"}
            assert answers[0][1]["notCreated"]["bad"]["type"] == "invalidProperties"
            seen.append(created.text)
            seen.append(await cli_get(admin, TOKEN_ENV_VARIABLE, capsys))
            # Refused: a wrong token (a secret of another kind), a token lacking a permission.
            wrong = await api(admin, HOOK_VALUE, ["x:MtaHook/get", {}, "g"])
            assert wrong.status_code == 401
            lacking = await api(admin, TOKEN_ENV, ["x:MtaHook/set", {"destroy": ["x"]}, "s"])
            seen += [wrong.text, lacking.text]
            # Reloads: a changed file, then a broken one (a token sharing a hook's secret
            # would be fine; two tokens sharing one is an error).
            path.write_text(config_text(tmp_path, hooks.url, timeout="6s"))
            assert service.reload()
            broken = config_text(tmp_path, hooks.url).replace(
                f'"{TOKEN_ENV_VARIABLE}"', f'"{TOKEN_ENV_VARIABLE}_UNSET"'
            )
            path.write_text(broken + '\n[[admin.token]]\nname = "twin"\n' + _value(TOKEN_VALUE))
            assert not service.reload()
            await mta_connect(addresses[0])
            nursery.cancel_scope.cancel()
    events = {line["event"] for line in logs}
    assert {"filter_error", "config_reloaded", "config_reload_failed", "listening"} <= events
    assert {"admin_auth_failed", "admin_filters_changed"} <= events
    assert any(line["log_level"] == "debug" for line in logs)  # every level was captured
    assert_no_secret(repr(logs))
    assert_no_secret("\n".join(record.getMessage() for record in caplog.records))
    for text in seen:
        assert_no_secret(text)
    # The state file does hold the API's Value secret: it is the only place it is kept.
    assert API_VALUE in (tmp_path / "filters.json").read_text()


def _value(secret: str) -> str:
    return f'secret = {{ "@type" = "Value", secret = "{secret}" }}\n'


@pytest.mark.usefixtures("secret_sources")
@pytest.mark.parametrize(
    "addition",
    [
        # Two tokens with one secret.
        '[[admin.token]]\nname = "twin"\n' + _value(TOKEN_VALUE),
        # A secret table with a stray key, and one with a wrong type next to a secret.
        '[[admin.token]]\nname = "x"\n'
        f'secret = {{ "@type" = "Value", secret = "{API_VALUE}", extra = 1 }}\n',
        '[[hook]]\nname = "h"\nurl = "http://h/"\n'
        f'httpAuth = {{ "@type" = "Basic", username = 5, secret = {{ "@type" = "Value", '
        f'secret = "{API_VALUE}" }} }}\n',
        # The secret written where its table belongs.
        f'[[hook]]\nname = "h"\nurl = "http://h/"\n'
        f'httpAuth = {{ "@type" = "Bearer", bearerToken = "{API_VALUE}" }}\n',
        # A secret whose source is gone.
        '[[admin.token]]\nname = "x"\n'
        'secret = { "@type" = "File", filePath = "/nonexistent/token" }\n',
        # A bad hook next to good secrets.
        f'[[hook]]\nname = "bearer-value"\nurl = "http://h/"\n{_value(API_VALUE)}',
    ],
)
def test_config_errors_never_hold_a_secret(tmp_path: Path, addition: str) -> None:
    path = tmp_path / "milterbridge.toml"
    path.write_text(config_text(tmp_path, "http://127.0.0.1:9/hook") + addition)
    with capture_logs() as logs, pytest.raises(ConfigError) as error:
        load_config(path)
    assert_no_secret(str(error.value))
    assert_no_secret(repr(logs))


@pytest.mark.usefixtures("secret_sources")
def test_the_config_repr_holds_no_secret(tmp_path: Path) -> None:
    path = tmp_path / "milterbridge.toml"
    path.write_text(config_text(tmp_path, "http://127.0.0.1:9/hook"))
    config = load_config(path)
    for text in (repr(config), str(config), repr(config.hook), repr(config.admin.token)):
        assert_no_secret(text)
    assert "bearer-value" in repr(config)  # the repr is a real one
