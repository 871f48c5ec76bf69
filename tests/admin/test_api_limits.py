"""POST /api against what a client may send to hurt it: oversize bodies, deep nesting.

Each refusal must be an answer (a problem document), one log line, and a connection that goes
on serving -- never a 500, a traceback or a dropped connection.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from milterbridge.admin.api import MAX_JSON_DEPTH
from milterbridge.admin.http import MAX_REQUEST_BODY, REQUEST_TIMEOUT
from milterbridge.config import AdminToken, SecretValue

from .test_auth import serve

pytestmark = pytest.mark.usefixtures("time_limit")

TLS = ssl.create_default_context()
USING = ["urn:ietf:params:jmap:core", "urn:stalwart:jmap"]
PROBLEM = "application/problem+json"


@pytest.fixture
async def time_limit() -> AsyncIterator[None]:
    with trio.fail_after(20):
        yield


@pytest.fixture
async def address(nursery: trio.Nursery, tmp_path: Path) -> str:
    tokens = [
        AdminToken(
            name="ops",
            secret=SecretValue(secret="t0ken"),
            permissions=["sysMtaMilterGet", "sysMtaMilterQuery"],
        )
    ]
    return await serve(nursery, tmp_path, tokens)


@pytest.fixture
async def client(address: str) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": "Bearer t0ken", "Content-Type": "application/json"}
    async with httpx.AsyncClient(verify=TLS, base_url=f"http://{address}", headers=headers) as http:
        yield http


def request(*method_calls: list[Any]) -> bytes:
    return json.dumps({"using": USING, "methodCalls": list(method_calls)}).encode()


def nested_arrays(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested_nots(depth: int) -> str:
    """A query filter of ``depth`` NOT operators around one condition (2 levels each)."""
    return '{"operator": "NOT", "conditions": [' * depth + '{"name": "x"}' + "]}" * depth


def refusals(logs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The lines above debug; a refusal must leave exactly one."""
    return [line for line in logs if line["log_level"] != "debug"]


# --- oversize bodies ------------------------------------------------------------------------------


async def chunked(data: bytes) -> AsyncIterator[bytes]:
    """A body without a declared length: httpx sends it chunked."""
    for start in range(0, len(data), 8192):
        yield data[start : start + 8192]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_an_oversize_body_is_a_413_limit_problem(
    client: httpx.AsyncClient, framing: str
) -> None:
    """RFC 8620 §3.6.1's ``limit`` problem, with ``maxSizeRequest``, under HTTP's own status
    for the case (413), whether the size was declared or only counted; the connection closes."""
    body = b'{"pad": "' + b"x" * MAX_REQUEST_BODY + b'"}'
    content: bytes | AsyncIterator[bytes] = body if framing == "content-length" else chunked(body)
    with capture_logs() as logs:
        response = await client.post("/api", content=content)
    assert response.status_code == 413
    assert response.headers["content-type"] == PROBLEM
    assert response.headers["connection"] == "close"
    assert response.json() == {
        "type": "urn:ietf:params:jmap:error:limit",
        "status": 413,
        "detail": f"the request body is over {MAX_REQUEST_BODY} bytes",
        "limit": "maxSizeRequest",
    }
    (line,) = refusals(logs)
    assert (line["event"], line["type"], line["token"]) == (
        "admin_api_request_refused",
        "limit",
        "ops",
    )
    assert (await client.post("/api", content=request())).status_code == 200


async def test_an_oversize_body_without_a_token_is_401(address: str) -> None:
    """The size limit is only told to a caller that authenticates."""
    async with httpx.AsyncClient(verify=TLS, base_url=f"http://{address}") as anonymous:
        response = await anonymous.post("/api", content=b"[" * (MAX_REQUEST_BODY + 1))
    assert response.status_code == 401
    assert "limit" not in response.text


# --- deep nesting ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        # 200,000 bytes: over the size limit before any JSON is looked at.
        pytest.param(nested_arrays(100_000), 413, "limit", id="100000-deep-arrays"),
        # Not an object: msgspec stops at the first "[".
        pytest.param(nested_arrays(30_000), 400, "notRequest", id="30000-deep-arrays"),
        # An unknown member is skipped, but msgspec still recurses into it.
        pytest.param(
            '{"x": ' + '{"a": ' * 8_000 + "1" + "}" * 8_000 + ', "using": [], "methodCalls": []}',
            400,
            "notJSON",
            id="8000-deep-unknown-member",
        ),
        # Inside a valid request: msgspec's RecursionError (was a 500).
        pytest.param(
            request(["Core/echo", {"a": "PLACEHOLDER"}, "c"])
            .decode()
            .replace('"PLACEHOLDER"', nested_arrays(30_000)),
            400,
            "notJSON",
            id="30000-deep-arguments",
        ),
        # Decodes, but the query filter's recursion failed on it (was a 500).
        pytest.param(
            request(["x:MtaMilter/query", {"filter": "PLACEHOLDER"}, "c"])
            .decode()
            .replace('"PLACEHOLDER"', nested_nots(400)),
            400,
            "notJSON",
            id="400-nested-NOT-filters",
        ),
        # One level over the limit.
        pytest.param(
            request(["Core/echo", {"a": "PLACEHOLDER"}, "c"])
            .decode()
            .replace('"PLACEHOLDER"', nested_arrays(MAX_JSON_DEPTH - 3)),
            400,
            "notJSON",
            id="one-level-too-deep",
        ),
    ],
)
async def test_deep_nesting_is_refused_as_a_problem_document(
    client: httpx.AsyncClient, body: str | bytes, status: int, kind: str
) -> None:
    with capture_logs() as logs:
        response = await client.post("/api", content=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["type"] == f"urn:ietf:params:jmap:error:{kind}"
    if kind == "notJSON":
        assert problem["detail"] == (
            f"the body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep"
        )
    (line,) = refusals(logs)
    assert (line["event"], line["type"]) == ("admin_api_request_refused", kind)
    # The server lives on, on the same connection unless the refusal closed it (413).
    assert ("connection" in response.headers) is (status == 413)
    assert (await client.post("/api", content=request())).status_code == 200


@pytest.mark.parametrize(
    ("call", "nest"),
    [
        # The request, methodCalls, the call, the arguments: four levels above the arrays.
        (["Core/echo", {"a": "PLACEHOLDER"}, "c"], lambda: nested_arrays(MAX_JSON_DEPTH - 4)),
        (["x:MtaMilter/query", {"filter": "PLACEHOLDER"}, "c"], lambda: nested_nots(29)),
    ],
    ids=["arrays-at-the-limit", "29-nested-NOT-filters"],
)
async def test_nesting_within_the_limit_is_served(
    client: httpx.AsyncClient, call: list[Any], nest: Callable[[], str]
) -> None:
    """The limit leaves room for every real request: the deepest allowed echo comes back, and
    a query filter nested 29 operators deep runs."""
    body = request(call).decode().replace('"PLACEHOLDER"', nest())
    response = await client.post("/api", content=body)
    assert response.status_code == 200, response.text
    name, answer, _ = response.json()["methodResponses"][0]
    assert name == call[0], answer
    if name == "Core/echo":
        assert json.dumps(answer["a"]).replace(" ", "") == nest()


async def test_a_refusal_keeps_the_connection(address: str) -> None:
    """The same socket answers a notJSON and then a good request: nothing was dropped."""
    head = (
        b"POST /api HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    )
    deep = request(["Core/echo", {"a": "PLACEHOLDER"}, "c"]).replace(
        b'"PLACEHOLDER"', nested_arrays(30_000).encode()
    )
    host, _, port = address.rpartition(":")
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        for body, status in ((deep, b"400"), (request(), b"200")):
            await stream.send_all(head % len(body) + body)
            assert (await read_one(stream)).startswith(b"HTTP/1.1 " + status)


async def read_one(stream: trio.SocketStream) -> bytes:
    """One response, by its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    fields = dict(line.split(b":", 1) for line in head.lower().split(b"\r\n")[1:])
    while len(body) < int(fields[b"content-length"]):
        body += await stream.receive_some(65536)
    return head + b"\r\n\r\n" + body


# --- slow requests --------------------------------------------------------------------------------


async def test_a_slow_body_is_a_408_problem_at_the_deadline(
    address: str, autojump_clock: trio.testing.MockClock
) -> None:
    """A token holder whose body trickles in is answered 408 (a problem document) when
    REQUEST_TIMEOUT is up; one without a valid token gets the 401 instead."""
    host, _, port = address.rpartition(":")
    for token, status in ((b"t0ken", 408), (b"wrong", 401)):
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            await stream.send_all(
                b"POST /api HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token + b"\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
            )
            started = trio.current_time()
            response = await read_one(stream)
            assert trio.current_time() - started == pytest.approx(REQUEST_TIMEOUT, abs=0.1)
        assert response.startswith(b"HTTP/1.1 %d " % status)
        assert b"content-type: application/problem+json" in response.lower()
        assert b'"status":%d' % status in response
