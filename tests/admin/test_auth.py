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
from milterbridge.admin.auth import Authenticator, bearer_token, method_permissions
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
    store = FilterStore.open(Config(), state_file=tmp_path / "filters.json")
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
    return httpx.AsyncClient(verify=TLS, base_url=f"http://{address}")


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
        assert [entry["event"] for entry in logs if entry["log_level"] == "warning"] == [
            "admin_api_unauthorized"
        ]
        assert "wrong" not in repr(logs)


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
