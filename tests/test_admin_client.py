"""The CLI verbs get, create, query, update, delete against a real admin listener."""

from __future__ import annotations

import argparse
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from milterbridge.admin import Readiness, serve_admin
from milterbridge.admin.store import FilterStore
from milterbridge.admin_client import (
    ADMIN_COMMANDS,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    add_admin_commands,
    admin_command,
    build_object,
    build_patch,
    parse_fields,
    run_admin_command,
)
from milterbridge.config import AdminToken, SecretValue, parse_config

TOKEN_ENV = "MILTERBRIDGE_ADMIN_TOKEN"


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(prog="milterbridge")
    add_admin_commands(result.add_subparsers(dest="command", required=True))
    return result


# --- arguments ----------------------------------------------------------------------------------


def test_the_five_verbs_are_registered() -> None:
    for verb in ADMIN_COMMANDS:
        args = parser().parse_args(
            [verb, "mta-milter", *(["x"] if verb == "update" else [])]
            + (["--ids", "a"] if verb == "delete" else [])
        )
        assert args.admin_verb == verb
        assert args.url == "http://127.0.0.1:8900/api"
        assert args.token_env == TOKEN_ENV
    with pytest.raises(SystemExit):
        parser().parse_args(["get", "mta-mailbox"])


def test_field_values_are_json_when_they_parse() -> None:
    fields = parse_fields(
        [
            "port=11332",
            "useTls=false",
            "protocolVersion=v6",
            "timeoutData=60s",
            'stages=["data"]',
            'enable={"else":"true"}',
            'name="123"',
            "flagsAction=null",
            "hostname=a=b",
        ]
    )
    assert build_object(fields) == {
        "port": 11332,
        "useTls": False,
        "protocolVersion": "v6",
        "timeoutData": "60s",
        "stages": ["data"],
        "enable": {"else": "true"},
        "name": "123",
        "flagsAction": None,
        "hostname": "a=b",
    }


def test_dotted_keys_nest_for_create_and_are_paths_for_update() -> None:
    fields = parse_fields(
        [
            "httpAuth.@type=Bearer",
            "httpAuth.bearerToken.@type=Value",
            "httpAuth.bearerToken.secret=s",
        ]
    )
    assert build_object(fields) == {
        "httpAuth": {"@type": "Bearer", "bearerToken": {"@type": "Value", "secret": "s"}}
    }
    assert build_patch(fields) == {
        "httpAuth/@type": "Bearer",
        "httpAuth/bearerToken/@type": "Value",
        "httpAuth/bearerToken/secret": "s",
    }
    assert build_patch(parse_fields(["httpHeaders.a/b=1"])) == {"httpHeaders/a~1b": 1}


@pytest.mark.parametrize(
    "items",
    [["port"], ["=1"], ["a..b=1"], ["a=1", "a=2"], ["a=1", "a.b=2"], ["a.b=2", "a=1"]],
)
def test_unusable_fields(items: list[str]) -> None:
    with pytest.raises(UsageError):
        build_object(parse_fields(items))


# --- against the listener -----------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> FilterStore:
    config = parse_config(
        '[[milter]]\nname = "rspamd"\nhostname = "127.0.0.1"\n', Path("/etc/milterbridge.toml")
    )
    return FilterStore.open(config, state_file=tmp_path / "filters.json")


@pytest.fixture
async def url(
    nursery: trio.Nursery, store: FilterStore, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[str]:
    permissions: Any = [
        f"sys{kind}{operation}"
        for kind in ("MtaMilter", "MtaHook")
        for operation in ("Get", "Create", "Update", "Destroy", "Query")
    ]
    tokens = [
        AdminToken(name="ops", secret=SecretValue(secret="cli-token"), permissions=permissions),
        AdminToken(
            name="reader", secret=SecretValue(secret="read-only"), permissions=["sysMtaMilterGet"]
        ),
    ]
    monkeypatch.setenv(TOKEN_ENV, "cli-token")
    # The listener's log lines would otherwise go to the stdout the verbs print JSON on.
    with trio.fail_after(10), capture_logs():
        address = await nursery.start(
            lambda task_status: serve_admin(
                "127.0.0.1:0",
                CollectorRegistry(),
                Readiness(),
                store=store,
                tokens=tokens,
                task_status=task_status,
            )
        )
        yield f"http://{address}/api"


async def cli(url: str, *argv: str) -> int:
    verb, rest = argv[0], list(argv[1:])
    return await admin_command(parser().parse_args([verb, *rest, "--url", url]))


def output(capsys: pytest.CaptureFixture[str]) -> tuple[Any, str]:
    captured = capsys.readouterr()
    return (json.loads(captured.out) if captured.out else None), captured.err


async def test_create_get_query_update_delete(
    url: str, store: FilterStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reference's create example, then each verb on the new filter."""
    status = await cli(
        url,
        "create",
        "mta-milter",
        "--field",
        "allowInvalidCerts=false",
        "--field",
        'enable={"else":"true"}',
        "--field",
        "hostname=mail.example.com",
        "--field",
        "maxResponseSize=52428800",
        "--field",
        "tempFailOnError=true",
        "--field",
        "protocolVersion=v6",
        "--field",
        "port=11332",
        "--field",
        'stages=["data"]',
        "--field",
        "timeoutCommand=30s",
        "--field",
        "timeoutConnect=30s",
        "--field",
        "timeoutData=60s",
        "--field",
        "useTls=false",
        "--field",
        "flagsAction=1",
        "--field",
        "flagsProtocol=2",
    )
    created, err = output(capsys)
    assert (status, err) == (EXIT_OK, "")
    id_ = created["id"]
    assert created["hostname"] == "mail.example.com"
    assert [m.hostname for m in store.filters()[0]] == ["127.0.0.1", "mail.example.com"]

    assert await cli(url, "get", "mta-milter", id_) == EXIT_OK
    got, _ = output(capsys)
    assert got == [created]

    assert await cli(url, "get", "mta-milter", "--properties", "name,port") == EXIT_OK
    got, _ = output(capsys)
    assert got == [
        {"id": "config-rspamd", "name": "rspamd", "port": 11332},
        {"id": id_, "name": id_, "port": 11332},
    ]

    assert await cli(url, "query", "mta-milter", "--filter", "readOnly=false") == EXIT_OK
    found, _ = output(capsys)
    assert [item["id"] for item in found] == [id_]

    assert await cli(url, "query", "mta-milter", "--sort", "name:desc", "--ids-only") == EXIT_OK
    ids, _ = output(capsys)
    assert ids == ["config-rspamd", id_]

    status = await cli(
        url, "update", "mta-milter", id_, "--field", "port=2525", "--field", "name=renamed"
    )
    updated, err = output(capsys)
    assert (status, updated, err) == (EXIT_OK, [id_], "")
    assert [m.name for m in store.filters()[0]] == ["rspamd", "renamed"]
    assert store.filters()[0][1].port == 2525

    assert await cli(url, "delete", "mta-milter", "--ids", id_) == EXIT_OK
    deleted, _ = output(capsys)
    assert deleted == [id_]
    assert [m.name for m in store.filters()[0]] == ["rspamd"]


async def test_hooks_with_nested_fields(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Dotted keys build httpAuth; the secret is not printed back."""
    status = await cli(
        url,
        "create",
        "mta-hook",
        "--field",
        "name=policy",
        "--field",
        "url=https://policy.example/hook",
        "--field",
        "httpAuth.@type=Bearer",
        "--field",
        "httpAuth.bearerToken.@type=Value",
        "--field",
        "httpAuth.bearerToken.secret=hunter2",
    )
    created, _ = output(capsys)
    assert status == EXIT_OK
    assert created["httpAuth"]["bearerToken"] == {"@type": "Value", "secret": None}
    status = await cli(url, "update", "mta-hook", created["id"], "--field", "httpHeaders.X-A=1")
    _, err = output(capsys)
    assert status == EXIT_FAILURE  # a header value must be a string
    assert "invalidProperties (httpHeaders)" in err
    assert (
        await cli(url, "update", "mta-hook", created["id"], "--field", 'httpHeaders.X-A="1"') == 0
    )
    output(capsys)
    assert await cli(url, "get", "mta-hook") == EXIT_OK
    [hook], _ = output(capsys)
    assert hook["httpHeaders"] == {"X-A": "1"}


async def test_refusals_exit_1_with_the_reason(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    status = await cli(url, "create", "mta-milter", "--field", "hostname=h", "--field", "port=0")
    out, err = output(capsys)
    assert (status, out) == (EXIT_FAILURE, None)
    assert err.startswith("milterbridge: create mta-milter: invalidProperties (port): port: ")

    assert await cli(url, "update", "mta-milter", "config-rspamd", "--field", "port=1") == 1
    _, err = output(capsys)
    assert "forbidden" in err and "config file" in err

    assert await cli(url, "delete", "mta-milter", "--ids", "config-rspamd,api-nope") == 1
    out, err = output(capsys)
    assert out == []
    assert "config-rspamd: forbidden" in err and "api-nope: notFound" in err

    assert await cli(url, "get", "mta-milter", "api-nope") == EXIT_FAILURE
    out, err = output(capsys)
    assert out == []
    assert "not found: api-nope" in err

    monkeypatch.setenv(TOKEN_ENV, "read-only")
    assert await cli(url, "query", "mta-milter") == EXIT_FAILURE
    _, err = output(capsys)
    assert "forbidden: token 'reader' lacks the permission sysMtaMilterQuery" in err

    monkeypatch.setenv(TOKEN_ENV, "wrong")
    assert await cli(url, "get", "mta-milter") == EXIT_FAILURE
    _, err = output(capsys)
    assert "HTTP 401: a valid bearer token is needed" in err


async def test_usage_errors_exit_2(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await cli(url, "create", "mta-milter", "--field", "hostname") == EXIT_USAGE
    _, err = output(capsys)
    assert "expected KEY=VALUE" in err
    assert await cli(url, "update", "mta-milter", "x") == EXIT_USAGE
    assert await cli(url, "query", "mta-milter", "--sort", "name:sideways") == EXIT_USAGE
    assert await cli(url, "query", "mta-milter", "--limit", "-1") == EXIT_USAGE
    output(capsys)
    monkeypatch.delenv(TOKEN_ENV)
    assert await cli(url, "get", "mta-milter") == EXIT_USAGE
    _, err = output(capsys)
    assert f"set {TOKEN_ENV} to the admin API token" in err


async def test_an_unreachable_api_exits_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "x")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with trio.fail_after(10):
        status = await cli(f"http://127.0.0.1:{port}/api", "get", "mta-hook")
    _, err = output(capsys)
    assert status == EXIT_FAILURE
    assert f"cannot call http://127.0.0.1:{port}/api" in err


async def test_not_the_api_exits_1(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A URL answering something else (here /metrics, 405 to a POST) is reported as such."""
    assert await cli(url.replace("/api", "/metrics"), "get", "mta-milter") == EXIT_FAILURE
    _, err = output(capsys)
    assert "HTTP 405: method not allowed" in err


async def test_run_admin_command_runs_its_own_loop(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The synchronous entry point the CLI calls (here from a thread: this test has a loop)."""
    args = parser().parse_args(["get", "mta-milter", "--url", url, "--properties", "name"])
    status = await trio.to_thread.run_sync(run_admin_command, args)
    got, _ = output(capsys)
    assert (status, got) == (EXIT_OK, [{"id": "config-rspamd", "name": "rspamd"}])
