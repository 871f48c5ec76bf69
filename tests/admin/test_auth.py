"""Admin tokens: the [[admin.token]] tables, bearer authentication, per-method permissions."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from milterbridge.admin import Readiness, serve_admin
from milterbridge.admin.auth import (
    AUTH_FAILURE_WINDOW,
    MAX_AUTH_FAILURES,
    MAX_TRACKED_CLIENTS,
    Authenticator,
    AuthFailures,
    bearer_token,
    method_permissions,
)
from milterbridge.admin.store import FilterStore
from milterbridge.config import AdminToken, Config, ConfigError, SecretValue, parse_config

TLS = ssl.create_default_context()
FILE = Path("/etc/milterbridge.toml")
USING = ["urn:ietf:params:jmap:core", "urn:stalwart:jmap"]


@pytest.fixture
async def time_limit() -> AsyncIterator[None]:
    with trio.fail_after(10):
        yield


#: For the tests that talk HTTP (a pytest-trio fixture cannot serve the synchronous ones).
over_http = pytest.mark.usefixtures("time_limit")


def token(name: str, secret: str, *permissions: Any) -> AdminToken:
    return AdminToken(name=name, secret=SecretValue(secret=secret), permissions=list(permissions))


# --- the config tables ----------------------------------------------------------------------------


def test_tokens_decode_with_every_secret_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Value, EnvironmentVariable and File, each read at load; permissions as listed."""
    monkeypatch.setenv("MILTERBRIDGE_TEST_TOKEN", "from-env")
    secret_file = tmp_path / "token"
    secret_file.write_text("from-file\n")
    config = parse_config(
        f"""
[admin]
stateFile = "{tmp_path / "filters.json"}"
[[admin.token]]
name = "value"
secret = {{ "@type" = "Value", secret = "inline" }}
permissions = ["sysMtaMilterGet", "sysMtaHookQuery"]
[[admin.token]]
name = "env"
secret = {{ "@type" = "EnvironmentVariable", variableName = "MILTERBRIDGE_TEST_TOKEN" }}
permissions = ["sysMtaMilterCreate"]
[[admin.token]]
name = "file"
secret = {{ "@type" = "File", filePath = "{secret_file}" }}
""",
        FILE,
    )
    tokens = config.admin.token
    assert [t.name for t in tokens] == ["value", "env", "file"]
    assert [t.secret.reveal() for t in tokens] == ["inline", "from-env", "from-file"]
    assert tokens[0].permissions == ["sysMtaMilterGet", "sysMtaHookQuery"]
    assert tokens[2].permissions == []
    assert config.admin.state_file == str(tmp_path / "filters.json")


def test_defaults_have_no_tokens_and_no_state_file() -> None:
    admin = Config().admin
    assert (admin.token, admin.state_file) == ([], None)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            '[[admin.token]]\nname = "a"\n'
            'secret = { "@type" = "EnvironmentVariable", variableName = "MILTERBRIDGE_NOT_SET" }',
            "admin.token[0].secret.variableName: environment variable MILTERBRIDGE_NOT_SET "
            "is not set",
        ),
        (
            '[[admin.token]]\nname = "a"\nsecret = { "@type" = "Value", secret = "" }',
            "admin.token[0].secret: the token is empty",
        ),
        (
            '[[admin.token]]\nname = "a"\nsecret = { "@type" = "Value", secret = "x" }\n'
            '[[admin.token]]\nname = "a"\nsecret = { "@type" = "Value", secret = "y" }',
            "admin.token[1].name: duplicate token name 'a' (also token[0])",
        ),
        (
            '[[admin.token]]\nname = "a"\nsecret = { "@type" = "Value", secret = "x" }\n'
            '[[admin.token]]\nname = "b"\nsecret = { "@type" = "Value", secret = "x" }',
            "admin.token[1].secret: the same secret as token[0]",
        ),
        (
            '[[admin.token]]\nname = "a"\nsecret = { "@type" = "Value", secret = "x" }\n'
            'permissions = ["sysMtaMilterEverything"]',
            "admin.token[0].permissions[0]: Invalid enum value 'sysMtaMilterEverything'",
        ),
        (
            '[[admin.token]]\nname = "a"\nsecret = { "@type" = "Value", secret = "x" }\n'
            'permissions = ["sysMtaHookGet", "sysMtaHookDestroy"]',
            "admin.token[0].permissions: sysMtaHookDestroy needs admin.stateFile",
        ),
        (
            '[[admin.token]]\nname = "a b"\nsecret = { "@type" = "Value", secret = "x" }',
            "admin.token[0].name: Expected `str` matching regex",
        ),
        ('stateFile = ""', "admin.stateFile: empty path"),
    ],
)
def test_bad_token_tables_are_config_errors(body: str, message: str) -> None:
    """Each names the key; a secret's value never appears in the message."""
    text = body if body.startswith("[[") else f"[admin]\n{body}"
    with pytest.raises(ConfigError) as info:
        parse_config(text, FILE)
    assert message in str(info.value)
    assert '"x"' not in str(info.value)


def test_a_token_repr_hides_its_secret() -> None:
    assert "sekrit" not in repr(token("a", "sekrit"))


# --- authentication -------------------------------------------------------------------------------


def test_authenticate_finds_the_token_and_nothing_else() -> None:
    auth = Authenticator(
        [token("reader", "r-secret", "sysMtaMilterGet"), token("writer", "w-secret")]
    )
    assert bool(auth)
    principal = auth.authenticate("Bearer r-secret")
    assert principal is not None
    assert principal.name == "reader"
    assert principal.permissions == frozenset({"sysMtaMilterGet"})
    found = auth.authenticate("bearer   w-secret ")
    assert found is not None
    assert found.name == "writer"
    for header in [None, "", "Bearer", "Bearer ", "Basic r-secret", "Bearer r-secre", "r-secret"]:
        assert auth.authenticate(header) is None, header
    assert not Authenticator([])


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("BEARER abc") == "abc"
    assert bearer_token("Token abc") is None


def test_method_permissions() -> None:
    """get and query need their own; set one per kind of operation it carries."""
    assert method_permissions("MtaMilter", "get") == ["sysMtaMilterGet"]
    assert method_permissions("MtaHook", "query") == ["sysMtaHookQuery"]
    assert method_permissions("MtaHook", "set", ["create", "destroy"]) == [
        "sysMtaHookCreate",
        "sysMtaHookDestroy",
    ]
    with pytest.raises(ValueError):
        method_permissions("MtaHook", "changes")


# --- over HTTP ------------------------------------------------------------------------------------


async def start(
    nursery: trio.Nursery, tmp_path: Path, tokens: list[AdminToken]
) -> httpx.AsyncClient:
    address = await serve(nursery, tmp_path, tokens)
    return httpx.AsyncClient(verify=TLS, base_url=f"http://{address}")


async def serve(nursery: trio.Nursery, tmp_path: Path, tokens: list[AdminToken]) -> str:
    """An admin listener with ``tokens`` and an empty state file; its address."""
    store = FilterStore.open(Config(), state_file=tmp_path / "filters.json")
    address: str = await nursery.start(
        lambda task_status: serve_admin(
            "127.0.0.1:0",
            CollectorRegistry(),
            Readiness(),
            store=store,
            tokens=tokens,
            task_status=task_status,
        )
    )
    return address


def calls(*method_calls: list[Any]) -> dict[str, Any]:
    return {"using": USING, "methodCalls": list(method_calls)}


@over_http
async def test_without_tokens_the_api_is_404(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A store alone does not turn /api on: management is off without a token."""
    async with await start(nursery, tmp_path, []) as client:
        response = await client.post("/api", json=calls(["x:MtaMilter/get", {}, "c"]))
        assert response.status_code == 404
        assert "admin API is off" in response.text


@over_http
@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({}, None),
        ({"Authorization": "Bearer wrong"}, "invalid_token"),
        ({"Authorization": "Basic b3BzOnNlY3JldA=="}, "invalid_token"),
    ],
)
async def test_no_or_a_wrong_token_is_401(
    nursery: trio.Nursery, tmp_path: Path, headers: dict[str, str], error: str | None
) -> None:
    """401 with a Bearer challenge (RFC 6750); logged without the presented value."""
    async with await start(nursery, tmp_path, [token("ops", "right")]) as client:
        with capture_logs() as logs:
            response = await client.post(
                "/api", json=calls(["x:MtaMilter/get", {}, "c"]), headers=headers
            )
        assert response.status_code == 401
        challenge = response.headers["www-authenticate"]
        assert challenge.startswith('Bearer realm="milterbridge"')
        assert (error in challenge) if error else ("error=" not in challenge)
        assert response.headers["content-type"] == "application/problem+json"
        (line,) = [entry for entry in logs if entry["log_level"] == "warning"]
        assert line["event"] == "admin_auth_failed"
        assert line["reason"] == ("unknown token" if headers else "no bearer token")
        assert (line["client"], line["count"], line["limited"]) == ("127.0.0.1", 1, False)
        assert "wrong" not in repr(logs)
        assert "b3BzOnNlY3JldA" not in repr(logs)


@over_http
async def test_401_comes_before_anything_else(nursery: trio.Nursery, tmp_path: Path) -> None:
    """An unauthenticated GET or garbage body learns nothing but 401."""
    async with await start(nursery, tmp_path, [token("ops", "right")]) as client:
        assert (await client.get("/api")).status_code == 401
        assert (await client.post("/api", content=b"{")).status_code == 401


@over_http
async def test_a_missing_permission_is_a_forbidden_method_error(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Each call is checked on its own: the permitted ones run, the others answer forbidden."""
    reader = token("reader", "r", "sysMtaMilterGet", "sysMtaHookCreate")
    async with await start(nursery, tmp_path, [reader]) as client:
        response = await client.post(
            "/api",
            headers={"Authorization": "Bearer r"},
            json=calls(
                ["x:MtaMilter/get", {}, "get"],
                ["x:MtaMilter/query", {}, "query"],
                ["x:MtaHook/get", {}, "hook-get"],
                ["x:MtaMilter/set", {"create": {"a": {"hostname": "h"}}}, "create"],
                ["x:MtaMilter/set", {}, "empty-set"],
                [
                    "x:MtaHook/set",
                    {"create": {"a": {"url": "http://h"}}, "destroy": ["x"]},
                    "create-and-destroy",
                ],
                ["x:MtaHook/set", {"create": {"a": {"url": "http://h"}}}, "hook-create"],
            ),
        )
    assert response.status_code == 200
    answers = {call_id: (name, body) for name, body, call_id in response.json()["methodResponses"]}
    assert answers["get"][0] == "x:MtaMilter/get"
    assert answers["hook-create"][0] == "x:MtaHook/set"
    assert answers["hook-create"][1]["created"]["a"]["url"] == "http://h"
    for call_id, missing in [
        ("query", "sysMtaMilterQuery"),
        ("hook-get", "sysMtaHookGet"),
        ("create", "sysMtaMilterCreate"),
        ("create-and-destroy", "sysMtaHookDestroy"),
    ]:
        name, body = answers[call_id]
        assert (name, body["type"]) == ("error", "forbidden"), call_id
        assert missing in body["description"]
        assert "reader" in body["description"]
    assert answers["empty-set"][1]["type"] == "forbidden"


# --- repeated failures ----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_limit_is_per_address_and_slides_with_the_window() -> None:
    """MAX_AUTH_FAILURES within the window: limited until the oldest of them is a window old;
    another address is not affected; unchecked (429) attempts do not extend the block."""
    clock = FakeClock()
    failures = AuthFailures(clock)
    for _ in range(MAX_AUTH_FAILURES - 1):
        failures.refused("10.0.0.1", failed=True)
        clock.now += 1
    assert failures.retry_after("10.0.0.1") is None
    failures.refused("10.0.0.1", failed=True)  # the 10th, 9 s after the first
    assert failures.retry_after("10.0.0.1") == AUTH_FAILURE_WINDOW - (MAX_AUTH_FAILURES - 1)
    assert failures.retry_after("10.0.0.2") is None
    for _ in range(100):
        failures.refused("10.0.0.1", failed=False)
    clock.now += AUTH_FAILURE_WINDOW - (MAX_AUTH_FAILURES - 1)
    assert failures.retry_after("10.0.0.1") is None  # the first failure left the window
    failures.refused("10.0.0.1", failed=True)  # ... and one more fills it again
    assert failures.retry_after("10.0.0.1") == 1.0


def test_lines_are_due_at_most_once_a_second_per_address_with_a_count() -> None:
    clock = FakeClock()
    failures = AuthFailures(clock)
    assert failures.refused("a", failed=True) == 1
    assert failures.refused("b", failed=True) == 1  # another address has its own line
    assert [failures.refused("a", failed=True) for _ in range(5)] == [None] * 5
    clock.now += 0.999
    assert failures.refused("a", failed=False) is None
    clock.now += 0.001
    assert failures.refused("a", failed=True) == 7  # the six unlogged and this one
    assert failures.refused("a", failed=True) is None


def test_the_table_of_addresses_is_bounded() -> None:
    """A flood from many addresses costs at most MAX_TRACKED_CLIENTS entries: the stale go
    first, then the least recently refused."""
    clock = FakeClock()
    failures = AuthFailures(clock)
    for _ in range(MAX_AUTH_FAILURES):
        failures.refused("first", failed=True)
    for index in range(MAX_TRACKED_CLIENTS - 1):
        failures.refused(f"10.{index}", failed=True)
    assert failures.retry_after("first") is not None
    failures.refused("one too many", failed=True)  # nothing is stale: the oldest goes
    assert failures.retry_after("first") is None
    assert len(failures._clients) == MAX_TRACKED_CLIENTS
    clock.now += AUTH_FAILURE_WINDOW
    failures.refused("after a window", failed=True)  # every entry is stale now
    assert len(failures._clients) == 1


@pytest.fixture
async def limited_api(
    nursery: trio.Nursery, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A client that opens a connection per request: the clock jumps past the keep-alive."""
    async with await start(nursery, tmp_path, [token("ops", "right", "sysMtaMilterGet")]) as first:
        url = str(first.base_url)
    fresh = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(verify=TLS, base_url=url, limits=fresh) as client:
        yield client, url


@over_http
async def test_repeated_failures_from_an_address_are_answered_429(
    limited_api: tuple[httpx.AsyncClient, str], mock_clock: trio.testing.MockClock
) -> None:
    """After MAX_AUTH_FAILURES wrong tokens in a minute, even the right token gets 429 with
    Retry-After, until the first failure is a minute old; another address is served all along.
    One warning line a second per address, with the count of refusals it stands for."""
    client, url = limited_api
    request = calls(["x:MtaMilter/get", {"ids": []}, "c"])
    wrong, right = {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer right"}
    with capture_logs() as logs:
        for _ in range(MAX_AUTH_FAILURES):
            assert (await client.post("/api", json=request, headers=wrong)).status_code == 401
        limited = await client.post("/api", json=request, headers=right)
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == str(int(AUTH_FAILURE_WINDOW))
        assert limited.headers["content-type"] == "application/problem+json"
        assert limited.json()["status"] == 429
        elsewhere = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        async with httpx.AsyncClient(verify=TLS, base_url=url, transport=elsewhere) as other:
            assert (await other.post("/api", json=request, headers=right)).status_code == 200
        mock_clock.jump(1.0)
        assert (await client.post("/api", json=request, headers=wrong)).status_code == 429
        mock_clock.jump(AUTH_FAILURE_WINDOW - 1.5)
        almost = await client.post("/api", json=request, headers=right)
        assert (almost.status_code, almost.headers["retry-after"]) == (429, "1")
        mock_clock.jump(0.5)
        assert (await client.post("/api", json=request, headers=right)).status_code == 200
    lines = [entry for entry in logs if entry["event"] == "admin_auth_failed"]
    assert [(line["count"], line["limited"], line["client"]) for line in lines] == [
        (1, False, "127.0.0.1"),  # the first failure; the next nine and the first 429 are counted
        (11, True, "127.0.0.1"),  # a second later: the ten unlogged and this 429
        (1, True, "127.0.0.1"),  # the 429 just before the minute is up
    ]
    assert lines[1]["reason"] == "too many failed authentications"
    assert "wrong" not in repr(logs)
    assert "right" not in repr(logs)
