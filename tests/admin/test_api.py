"""POST /api: JMAP requests over real HTTP against the admin listener on a free port."""

from __future__ import annotations

import json
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
from milterbridge.admin.api import MAX_CALLS_IN_REQUEST, apply_patch
from milterbridge.admin.store import FilterStore, SetFailure
from milterbridge.config import AdminToken, Config, SecretValue, parse_config

pytestmark = pytest.mark.usefixtures("time_limit")

TLS = ssl.create_default_context()
USING = ["urn:ietf:params:jmap:core", "urn:stalwart:jmap"]
ALL = [
    f"sys{kind}{operation}"
    for kind in ("MtaMilter", "MtaHook")
    for operation in ("Get", "Create", "Update", "Destroy", "Query")
]
SECRET_ENV = "MILTERBRIDGE_TEST_HOOK_SECRET"
CONFIG_SECRET = "config-secret"

CONFIG = f"""
[[milter]]
name = "rspamd"
hostname = "127.0.0.1"
port = 11332

[[milter]]
name = "clam.av"
unixPath = "/run/clamav/milter.sock"
enable = {{ else = "false" }}

[[hook]]
name = "policy"
url = "https://policy.example/hook"
[hook.httpAuth]
"@type" = "Basic"
username = "u"
secret = {{ "@type" = "Value", secret = "{CONFIG_SECRET}" }}

[[hook]]
name = "scanner"
url = "http://scanner.example/hook"
[hook.httpAuth]
"@type" = "Bearer"
bearerToken = {{ "@type" = "EnvironmentVariable", variableName = "{SECRET_ENV}" }}
"""


@pytest.fixture
async def time_limit() -> AsyncIterator[None]:
    with trio.fail_after(10):
        yield


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FilterStore:
    monkeypatch.setenv(SECRET_ENV, "env-secret")
    config = parse_config(CONFIG, Path("/etc/milterbridge.toml"))
    return FilterStore.open(config, state_file=tmp_path / "filters.json")


@pytest.fixture
async def client(nursery: trio.Nursery, store: FilterStore) -> AsyncIterator[httpx.AsyncClient]:
    tokens = [AdminToken(name="ops", secret=SecretValue(secret="t0ken"), permissions=ALL)]  # type: ignore[arg-type]
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
    headers = {"Authorization": "Bearer t0ken"}
    async with httpx.AsyncClient(verify=TLS, base_url=f"http://{address}", headers=headers) as http:
        yield http


Answers = dict[str, tuple[str, dict[str, Any]]]


async def jmap(client: httpx.AsyncClient, *method_calls: list[Any], **extra: Any) -> Answers:
    """Post the calls; the answers by call id (call ids are unique in these tests)."""
    body = await post(client, {"using": USING, "methodCalls": list(method_calls), **extra})
    return {call_id: (name, arguments) for name, arguments, call_id in body["methodResponses"]}


async def post(client: httpx.AsyncClient, request: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/api", json=request)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    return body


async def one(client: httpx.AsyncClient, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """One call's answer arguments, which must not be an error."""
    answers = await jmap(client, [name, arguments, "c"])
    answer_name, answer = answers["c"]
    assert answer_name == name, answer
    return answer


async def error(client: httpx.AsyncClient, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """One call's method error."""
    answers = await jmap(client, [name, arguments, "c"])
    answer_name, answer = answers["c"]
    assert answer_name == "error", answer
    return answer


# --- the request ----------------------------------------------------------------------------------


async def request_error(
    client: httpx.AsyncClient, content: bytes, content_type: str = "application/json"
) -> dict[str, Any]:
    response = await client.post("/api", content=content, headers={"Content-Type": content_type})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == 400
    return body


async def test_answers_come_in_order_with_the_session_state(client: httpx.AsyncClient) -> None:
    body = await post(
        client,
        {
            "using": USING,
            "methodCalls": [
                ["Core/echo", {"hello": [1, 2]}, "first"],
                ["x:MtaHook/get", {"ids": []}, "second"],
                ["x:MtaMilter/get", {"ids": []}, "third"],
            ],
        },
    )
    assert [(name, call_id) for name, _, call_id in body["methodResponses"]] == [
        ("Core/echo", "first"),
        ("x:MtaHook/get", "second"),
        ("x:MtaMilter/get", "third"),
    ]
    assert body["methodResponses"][0][1] == {"hello": [1, 2]}
    assert isinstance(body["sessionState"], str)
    assert "createdIds" not in body


@pytest.mark.parametrize(
    ("content", "content_type", "kind", "detail"),
    [
        (b"{", "application/json", "notJSON", "not JSON"),
        (b"\xff\xfe", "application/json", "notJSON", "not JSON"),
        (b'{"using": [], "methodCalls": []}', "text/plain", "notJSON", "Content-Type"),
        (b"[]", "application/json", "notRequest", "Expected `object`"),
        (b'{"using": []}', "application/json", "notRequest", "methodCalls"),
        (b'{"using": [], "methodCalls": [["x", [], "c"]]}', "application/json", "notRequest", ""),
        (
            b'{"using": ["urn:ietf:params:jmap:mail"], "methodCalls": []}',
            "application/json; charset=utf-8",
            "unknownCapability",
            "urn:ietf:params:jmap:mail",
        ),
    ],
)
async def test_request_level_errors(
    client: httpx.AsyncClient, content: bytes, content_type: str, kind: str, detail: str
) -> None:
    """RFC 8620 §3.6.1: 400 with a problem document whose type is the JMAP error URN."""
    body = await request_error(client, content, content_type)
    assert body["type"] == f"urn:ietf:params:jmap:error:{kind}"
    assert detail in body["detail"]


async def test_too_many_calls_is_a_limit_error(client: httpx.AsyncClient) -> None:
    request = {
        "using": USING,
        "methodCalls": [["Core/echo", {}, str(i)] for i in range(MAX_CALLS_IN_REQUEST + 1)],
    }
    body = await request_error(client, json.dumps(request).encode())
    assert body["type"] == "urn:ietf:params:jmap:error:limit"
    assert body["limit"] == "maxCallsInRequest"


async def test_only_post(client: httpx.AsyncClient) -> None:
    response = await client.get("/api")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert (await client.post("/api/session", json={})).status_code == 404


@pytest.mark.parametrize(
    ("name", "arguments", "kind", "text"),
    [
        ("x:MtaMilter/changes", {}, "unknownMethod", "x:MtaMilter/changes"),
        ("Mailbox/get", {}, "unknownMethod", "Mailbox/get"),
        ("x:MtaMilter/get", {"ids": "all"}, "invalidArguments", "Expected `array"),
        ("x:MtaMilter/get", {"idz": None}, "invalidArguments", "unknown field `idz`"),
        ("x:MtaMilter/get", {"properties": ["colour"]}, "invalidArguments", "colour"),
        ("x:MtaMilter/set", {"create": []}, "invalidArguments", "Expected `object"),
        ("x:MtaMilter/query", {"limit": -1}, "invalidArguments", ">= 0"),
    ],
)
async def test_method_errors(
    client: httpx.AsyncClient, name: str, arguments: dict[str, Any], kind: str, text: str
) -> None:
    """RFC 8620 §3.6.2: an error answer for that call only, the request itself is fine."""
    answer = await error(client, name, arguments)
    assert answer["type"] == kind
    assert text in answer["description"]


async def test_methods_need_the_management_capability(client: httpx.AsyncClient) -> None:
    """As in the reference's examples, the x: methods belong to urn:stalwart:jmap."""
    body = await post(
        client,
        {"using": ["urn:ietf:params:jmap:core"], "methodCalls": [["x:MtaMilter/get", {}, "c"]]},
    )
    name, answer, _ = body["methodResponses"][0]
    assert (name, answer["type"]) == ("error", "unknownMethod")
    assert "urn:stalwart:jmap" in answer["description"]


# --- get ------------------------------------------------------------------------------------------


async def test_get_all_returns_config_filters_read_only_and_without_secret_values(
    client: httpx.AsyncClient,
) -> None:
    """A Value secret's text is null; where an EnvironmentVariable secret comes from shows."""
    answer = await one(client, "x:MtaHook/get", {"ids": None})
    assert answer["notFound"] == []
    assert answer["accountId"] is None
    policy, scanner = answer["list"]
    assert policy["id"] == "config-policy"
    assert policy["readOnly"] is True
    assert policy["httpAuth"] == {
        "@type": "Basic",
        "username": "u",
        "secret": {"@type": "Value", "secret": None},
    }
    assert scanner["httpAuth"]["bearerToken"] == {
        "@type": "EnvironmentVariable",
        "variableName": SECRET_ENV,
    }
    assert policy["timeout"] == "30s"
    assert policy["maxResponseSize"] == 52428800
    response = await client.post(
        "/api", json={"using": USING, "methodCalls": [["x:MtaHook/get", {}, "c"]]}
    )
    assert "config-secret" not in response.text
    assert "env-secret" not in response.text


async def test_get_by_ids_with_properties_and_not_found(client: httpx.AsyncClient) -> None:
    """Duplicates once, unknown ids in notFound, id always included."""
    answer = await one(
        client,
        "x:MtaMilter/get",
        {
            "accountId": "whatever",
            "ids": ["config-clam_2Eav", "nope", "config-clam_2Eav", "config-policy"],
            "properties": ["unixPath", "readOnly"],
        },
    )
    assert answer["list"] == [
        {"id": "config-clam_2Eav", "unixPath": "/run/clamav/milter.sock", "readOnly": True}
    ]
    assert answer["notFound"] == ["nope", "config-policy"]
    assert answer["accountId"] == "whatever"


# --- set ------------------------------------------------------------------------------------------


REFERENCE_CREATE = {
    "allowInvalidCerts": False,
    "enable": {"else": "true"},
    "flagsAction": 1,
    "flagsProtocol": 2,
    "hostname": "mail.example.com",
    "maxResponseSize": 52428800,
    "port": 11332,
    "protocolVersion": "v6",
    "stages": ["data"],
    "tempFailOnError": True,
    "timeoutCommand": "30s",
    "timeoutConnect": "30s",
    "timeoutData": "60s",
    "useTls": False,
}


async def test_the_reference_create_example_works(
    client: httpx.AsyncClient, store: FilterStore
) -> None:
    """The reference's own create body (no name: the id serves); persisted; the new filter is
    in the store's filter list at once."""
    changes: list[list[str]] = []
    store.on_change.append(lambda: changes.append([m.name for m in store.filters()[0]]))
    answer = await one(client, "x:MtaMilter/set", {"create": {"new1": REFERENCE_CREATE}})
    created = answer["created"]["new1"]
    id_ = created["id"]
    assert id_.startswith("api-")
    assert created["name"] == id_
    assert created["readOnly"] is False
    assert created["hostname"] == "mail.example.com"
    assert answer["notCreated"] is None
    assert answer["oldState"] != answer["newState"]
    assert changes == [["rspamd", "clam.av", id_]]
    state = json.loads(await trio.Path(str(store.state_file)).read_text())
    assert [entry["id"] for entry in state["milters"]] == [id_]
    got = await one(client, "x:MtaMilter/get", {"ids": [id_]})
    assert got["list"] == [created]
    assert got["state"] == answer["newState"]


async def test_create_update_destroy_in_one_call(client: httpx.AsyncClient) -> None:
    """Creates first, then updates, then destroys; each failure in its own not* map."""
    setup = await one(
        client,
        "x:MtaMilter/set",
        {
            "create": {
                "a": {"name": "a", "hostname": "10.0.0.1"},
                "b": {"name": "b", "hostname": "10.0.0.2"},
            }
        },
    )
    a, b = setup["created"]["a"]["id"], setup["created"]["b"]["id"]
    answer = await one(
        client,
        "x:MtaMilter/set",
        {
            "create": {
                "c": {"name": "c", "hostname": "10.0.0.3"},
                "bad": {"name": "d", "hostname": "10.0.0.4", "port": 70000},
                "dup": {"name": "rspamd", "hostname": "10.0.0.5"},
            },
            "update": {
                a: {"port": 2525, "timeoutCommand": "5s"},
                b: {"port": 1},
                "config-rspamd": {"port": 1},
                "api-ffffffff": {"port": 1},
            },
            "destroy": [b, "config-rspamd", "api-ffffffff"],
        },
    )
    assert set(answer["created"]) == {"c"}
    assert answer["notCreated"]["bad"]["type"] == "invalidProperties"
    assert answer["notCreated"]["bad"]["properties"] == ["port"]
    assert answer["notCreated"]["dup"]["properties"] == ["name"]
    assert answer["updated"] == {a: None}
    assert answer["notUpdated"][b]["type"] == "willDestroy"
    assert answer["notUpdated"]["config-rspamd"]["type"] == "forbidden"
    assert answer["notUpdated"]["api-ffffffff"]["type"] == "notFound"
    assert answer["destroyed"] == [b]
    assert answer["notDestroyed"]["config-rspamd"]["type"] == "forbidden"
    assert answer["notDestroyed"]["api-ffffffff"]["type"] == "notFound"
    listed = await one(
        client, "x:MtaMilter/get", {"properties": ["name", "port", "timeoutCommand"]}
    )
    assert [(m["name"], m["port"], m["timeoutCommand"]) for m in listed["list"]] == [
        ("rspamd", 11332, "30s"),
        ("clam.av", 11332, "30s"),
        ("a", 2525, "5s"),
        ("c", 11332, "30s"),
    ]


async def test_update_is_a_patch(client: httpx.AsyncClient) -> None:
    """Only the given properties change; a path reaches into an object; null restores the
    default; the secret of an untouched Value survives though get never shows it."""
    created = await one(
        client,
        "x:MtaHook/set",
        {
            "create": {
                "h": {
                    "name": "h",
                    "url": "https://h.example/x",
                    "timeout": "5s",
                    "httpHeaders": {"X-A": "1"},
                    "httpAuth": {
                        "@type": "Basic",
                        "username": "u",
                        "secret": {"@type": "Value", "secret": "kept"},
                    },
                }
            }
        },
    )
    id_ = created["created"]["h"]["id"]
    answer = await one(
        client,
        "x:MtaHook/set",
        {
            "update": {
                id_: {
                    "httpHeaders/X-B": "2",
                    "httpAuth/username": "v",
                    "timeout": None,
                    "enable/else": "false",
                }
            }
        },
    )
    assert answer["updated"] == {id_: None}
    [hook] = (await one(client, "x:MtaHook/get", {"ids": [id_]}))["list"]
    assert hook["httpHeaders"] == {"X-A": "1", "X-B": "2"}
    assert hook["httpAuth"]["username"] == "v"
    assert hook["httpAuth"]["secret"] == {"@type": "Value", "secret": None}
    assert hook["timeout"] == "30s"
    assert hook["enable"] == {"else": "false", "match": []}
    assert hook["url"] == "https://h.example/x"
    filters = await one(client, "x:MtaHook/query", {"filter": {"enable": False}})
    assert filters["ids"] == [id_]


@pytest.mark.parametrize(
    ("patch", "kind", "properties"),
    [
        ({"nothere/x": 1}, "invalidPatch", None),
        ({"stages/0": "rcpt"}, "invalidPatch", None),
        ({"httpAuth": {"@type": "Basic"}, "httpAuth/username": "x"}, "invalidPatch", None),
        ({"/url": "http://x"}, "invalidPatch", None),
        ({"url": "gopher://x"}, "invalidProperties", ["url"]),
        ({"url": None}, "invalidProperties", ["url"]),
        ({"id": "api-other"}, "invalidProperties", ["id"]),
        ({"readOnly": True}, "invalidProperties", ["readOnly"]),
        ({"colour": "red"}, "invalidProperties", ["colour"]),
    ],
)
async def test_bad_patches(
    client: httpx.AsyncClient, patch: dict[str, Any], kind: str, properties: list[str] | None
) -> None:
    created = await one(
        client, "x:MtaHook/set", {"create": {"h": {"name": "h", "url": "http://h.example/"}}}
    )
    id_ = created["created"]["h"]["id"]
    answer = await one(client, "x:MtaHook/set", {"update": {id_: patch}})
    failure = answer["notUpdated"][id_]
    assert failure["type"] == kind
    assert failure.get("properties") == properties
    [hook] = (await one(client, "x:MtaHook/get", {"ids": [id_]}))["list"]
    assert hook["url"] == "http://h.example/"


async def test_an_object_from_get_can_be_sent_back(client: httpx.AsyncClient) -> None:
    """id and readOnly may repeat what they are; a masked secret cannot be written back."""
    created = await one(
        client, "x:MtaHook/set", {"create": {"h": {"name": "h", "url": "http://h.example/"}}}
    )
    document = created["created"]["h"]
    id_ = document["id"]
    answer = await one(
        client, "x:MtaHook/set", {"update": {id_: {**document, "url": "http://other.example/"}}}
    )
    assert answer["updated"] == {id_: None}
    copy = {key: value for key, value in document.items() if key != "id"}
    answer = await one(client, "x:MtaHook/set", {"create": {"copy": {**copy, "name": "h2"}}})
    assert answer["created"]["copy"]["name"] == "h2"
    answer = await one(client, "x:MtaHook/set", {"create": {"again": {**document, "name": "h3"}}})
    assert answer["notCreated"]["again"]["properties"] == ["id"]
    masked = {"@type": "Bearer", "bearerToken": {"@type": "Value", "secret": None}}
    answer = await one(client, "x:MtaHook/set", {"update": {id_: {"httpAuth": masked}}})
    assert answer["notUpdated"][id_]["properties"] == ["httpAuth/bearerToken/secret"]


async def test_creation_ids_and_result_references(client: httpx.AsyncClient) -> None:
    """#creationId in a later call's ids; createdIds echoed; #ids from a query's result."""
    body = await post(
        client,
        {
            "using": USING,
            "createdIds": {},
            "methodCalls": [
                ["x:MtaMilter/set", {"create": {"k": {"name": "k", "hostname": "h"}}}, "c1"],
                ["x:MtaMilter/set", {"update": {"#k": {"port": 26}}}, "c2"],
                ["x:MtaMilter/get", {"ids": ["#k"], "properties": ["port"]}, "c3"],
                ["x:MtaMilter/query", {"filter": {"name": "k"}}, "c4"],
                [
                    "x:MtaMilter/get",
                    {
                        "#ids": {"resultOf": "c4", "name": "x:MtaMilter/query", "path": "/ids"},
                        "properties": ["name"],
                    },
                    "c5",
                ],
                [
                    "x:MtaMilter/get",
                    {"#ids": {"resultOf": "c9", "name": "x:MtaMilter/query", "path": "/ids"}},
                    "c6",
                ],
                [
                    "x:MtaMilter/get",
                    {
                        "ids": [],
                        "#ids": {"resultOf": "c4", "name": "x:MtaMilter/query", "path": "/ids"},
                    },
                    "c7",
                ],
                [
                    "x:MtaMilter/get",
                    {"#ids": {"resultOf": "c4", "name": "x:MtaMilter/query", "path": "/nope"}},
                    "c8",
                ],
            ],
        },
    )
    answers = {call_id: (name, args) for name, args, call_id in body["methodResponses"]}
    id_ = answers["c1"][1]["created"]["k"]["id"]
    assert body["createdIds"] == {"k": id_}
    assert answers["c2"][1]["updated"] == {id_: None}
    assert answers["c3"][1]["list"] == [{"id": id_, "port": 26}]
    assert answers["c5"][1]["list"] == [{"id": id_, "name": "k"}]
    assert answers["c6"][1]["type"] == "invalidResultReference"
    assert answers["c7"][1]["type"] == "invalidArguments"
    assert answers["c8"][1]["type"] == "invalidResultReference"


async def test_if_in_state(client: httpx.AsyncClient) -> None:
    state = (await one(client, "x:MtaMilter/get", {"ids": []}))["state"]
    answer = await error(client, "x:MtaMilter/set", {"ifInState": "stale", "destroy": []})
    assert answer["type"] == "stateMismatch"
    answer = await one(
        client,
        "x:MtaMilter/set",
        {"ifInState": state, "create": {"a": {"name": "a", "hostname": "h"}}},
    )
    assert answer["oldState"] == state


async def test_a_failed_write_is_a_server_fail_and_changes_nothing(
    client: httpx.AsyncClient, store: FilterStore
) -> None:
    assert store.state_file is not None
    store.state_file.parent.rmdir()
    with capture_logs() as logs:
        answer = await error(
            client, "x:MtaMilter/set", {"create": {"a": {"name": "a", "hostname": "h"}}}
        )
    assert answer["type"] == "serverFail"
    assert "nothing was changed" in answer["description"]
    assert "admin_state_write_failed" in [entry["event"] for entry in logs]
    assert [m.name for m in store.filters()[0]] == ["rspamd", "clam.av"]


async def test_concurrent_sets_both_land(client: httpx.AsyncClient, store: FilterStore) -> None:
    """Two /api calls at once: neither write is lost, both are in the file."""

    async def create(name: str) -> None:
        answer = await one(
            client, "x:MtaMilter/set", {"create": {name: {"name": name, "hostname": "h"}}}
        )
        assert name in answer["created"]

    async with trio.open_nursery() as nursery:
        for name in ("x", "y", "z"):
            nursery.start_soon(create, name)
    assert sorted(m.name for m in store.filters()[0][2:]) == ["x", "y", "z"]
    state = json.loads(await trio.Path(str(store.state_file)).read_text())
    assert sorted(entry["filter"]["name"] for entry in state["milters"]) == ["x", "y", "z"]


async def test_changes_are_logged_without_secrets(client: httpx.AsyncClient) -> None:
    with capture_logs() as logs:
        await one(
            client,
            "x:MtaHook/set",
            {
                "create": {
                    "h": {
                        "name": "h",
                        "url": "http://h.example/",
                        "httpAuth": {
                            "@type": "Bearer",
                            "bearerToken": {"@type": "Value", "secret": "do-not-log"},
                        },
                    }
                }
            },
        )
    [line] = [entry for entry in logs if entry["event"] == "admin_filters_changed"]
    assert line["token"] == "ops"
    assert line["type"] == "x:MtaHook"
    assert len(line["created"]) == 1
    assert "do-not-log" not in repr(logs)


# --- query ----------------------------------------------------------------------------------------


@pytest.fixture
async def many(client: httpx.AsyncClient) -> dict[str, str]:
    """Three API milters next to the two config ones: name -> id."""
    answer = await one(
        client,
        "x:MtaMilter/set",
        {
            "create": {
                "Zeta": {"name": "Zeta", "hostname": "zeta.example", "port": 3},
                "alpha": {"name": "alpha", "hostname": "alpha.example", "port": 2},
                "mid": {"name": "mid", "hostname": "10.1.1.1", "port": 1},
            }
        },
    )
    ids = {name: created["id"] for name, created in answer["created"].items()}
    ids["rspamd"], ids["clam.av"] = "config-rspamd", "config-clam_2Eav"
    return ids


async def query(client: httpx.AsyncClient, **arguments: Any) -> dict[str, Any]:
    return await one(client, "x:MtaMilter/query", arguments)


async def names(client: httpx.AsyncClient, many: dict[str, str], **arguments: Any) -> list[str]:
    by_id = {id_: name for name, id_ in many.items()}
    return [by_id[id_] for id_ in (await query(client, **arguments))["ids"]]


async def test_query_without_arguments_is_merge_order(
    client: httpx.AsyncClient, many: dict[str, str]
) -> None:
    answer = await query(client)
    assert answer["position"] == 0
    assert answer["canCalculateChanges"] is False
    assert "total" not in answer
    assert await names(client, many) == ["rspamd", "clam.av", "Zeta", "alpha", "mid"]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"filter": {"name": "A"}}, ["rspamd", "clam.av", "Zeta", "alpha"]),
        ({"filter": {"hostname": "EXAMPLE"}}, ["Zeta", "alpha"]),
        ({"filter": {"readOnly": True}}, ["rspamd", "clam.av"]),
        ({"filter": {"enable": False}}, ["clam.av"]),
        ({"filter": {"enable": True, "readOnly": False}}, ["Zeta", "alpha", "mid"]),
        (
            {"filter": {"operator": "OR", "conditions": [{"name": "mid"}, {"name": "rsp"}]}},
            ["rspamd", "mid"],
        ),
        (
            {"filter": {"operator": "NOT", "conditions": [{"readOnly": True}, {"name": "mid"}]}},
            ["Zeta", "alpha"],
        ),
        (
            {"filter": {"operator": "AND", "conditions": [{"name": "a"}, {"readOnly": False}]}},
            ["Zeta", "alpha"],
        ),
        ({"sort": [{"property": "name"}]}, ["alpha", "clam.av", "mid", "rspamd", "Zeta"]),
        (
            {"sort": [{"property": "name", "collation": "i;octet"}]},
            ["Zeta", "alpha", "clam.av", "mid", "rspamd"],
        ),
        (
            {"sort": [{"property": "port", "isAscending": False}, {"property": "name"}]},
            ["clam.av", "rspamd", "Zeta", "alpha", "mid"],
        ),
        ({"sort": [{"property": "hostname"}]}, ["mid", "rspamd", "alpha", "Zeta", "clam.av"]),
        ({"position": 1, "limit": 2}, ["clam.av", "Zeta"]),
        ({"position": -2}, ["alpha", "mid"]),
        ({"position": -20, "limit": 1}, ["rspamd"]),
        ({"position": 9}, []),
        ({"limit": 0}, []),
        ({"anchor": "config-clam_2Eav", "anchorOffset": 1, "limit": 1}, ["Zeta"]),
        (
            {"anchor": "config-clam_2Eav", "anchorOffset": -5},
            ["rspamd", "clam.av", "Zeta", "alpha", "mid"],
        ),
    ],
)
async def test_query_filter_sort_window(
    client: httpx.AsyncClient,
    many: dict[str, str],
    arguments: dict[str, Any],
    expected: list[str],
) -> None:
    assert await names(client, many, **arguments) == expected


async def test_query_total_and_position(client: httpx.AsyncClient, many: dict[str, str]) -> None:
    answer = await query(client, position=-2, limit=1, calculateTotal=True)
    assert (answer["position"], answer["total"], len(answer["ids"])) == (3, 5, 1)
    assert answer["queryState"] == (await one(client, "x:MtaMilter/get", {"ids": []}))["state"]


async def test_query_on_hooks_filters_by_url(client: httpx.AsyncClient) -> None:
    answer = await one(client, "x:MtaHook/query", {"filter": {"url": "https://"}})
    assert answer["ids"] == ["config-policy"]


@pytest.mark.parametrize(
    ("arguments", "kind"),
    [
        ({"filter": {"url": "x"}}, "unsupportedFilter"),
        ({"filter": {"operator": "XOR", "conditions": []}}, "unsupportedFilter"),
        ({"filter": {"operator": "AND"}}, "invalidArguments"),
        ({"filter": {"name": 3}}, "invalidArguments"),
        ({"filter": {"enable": "yes"}}, "invalidArguments"),
        ({"filter": {"operator": "OR", "conditions": [3]}}, "invalidArguments"),
        ({"sort": [{"property": "url"}]}, "unsupportedSort"),
        ({"sort": [{"property": "name", "collation": "i;klingon"}]}, "unsupportedSort"),
        ({"anchor": "nope"}, "anchorNotFound"),
    ],
)
async def test_query_errors(
    client: httpx.AsyncClient, arguments: dict[str, Any], kind: str
) -> None:
    assert (await error(client, "x:MtaMilter/query", arguments))["type"] == kind


# --- patches without HTTP -------------------------------------------------------------------------


async def test_apply_patch_leaves_the_original_alone() -> None:
    original = {"a": {"b": 1}, "c": [1]}
    patched = apply_patch(original, {"a/b": 2, "a/x~1y": 3, "c": None})
    assert patched == {"a": {"b": 2, "x/y": 3}}
    assert original == {"a": {"b": 1}, "c": [1]}
    with pytest.raises(SetFailure, match="overlap"):
        apply_patch(original, {"a": {}, "a/b": 1})


async def test_a_store_without_tokens_serves_no_api() -> None:
    """AdminApp keeps /api off without tokens even when given a store (checked over HTTP in
    test_auth); here: the constructor's defaults keep the old callers working."""
    from milterbridge.admin import AdminApp

    app = AdminApp(CollectorRegistry(), Readiness())
    assert app.api is None
    app = AdminApp(CollectorRegistry(), Readiness(), store=FilterStore.open(Config()))
    assert app.api is None
