"""The hook client against a real HTTP server on loopback (tests/fixtures/hook_server.py).

What arrives (method, headers, authentication, the streamed document), what each answer becomes,
and every way a call fails, each as its FailureKind. Timeouts run in virtual time
(``autojump_clock``): the server is in-process on a numeric loopback address, so every task is
blocked exactly when the clock may jump.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import resource
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from structlog.testing import capture_logs

from milterbridge.config import (
    HookFilter,
    HttpAuthBasic,
    HttpAuthBearer,
    SecretEnvironmentVariable,
    SecretFile,
    SecretValue,
)
from milterbridge.durations import Duration, Size
from milterbridge.milter import (
    AddHeader,
    AddRcpt,
    AddRcptPar,
    ChangeFrom,
    ChangeHeader,
    Continue,
    DelRcpt,
    Discard,
    InsertHeader,
    Quarantine,
    Reject,
    ReplaceBody,
    ReplyCode,
)
from milterbridge.upstream import (
    FailureKind,
    HookAnswer,
    HookClient,
    HookInput,
    UpstreamFailure,
    encode_request,
)
from tests.fixtures.hook_server import Answer, HookServer, hook_server

SECRET = "s3cr3t-Pa55w0rd-never-logged"
HEADERS = [(b"From", b"alice@example.org"), (b"Subject", b"hello"), (b"X-Mailer", b"mutt")]
BODY = b"Hello, World!\r\n"


@pytest.fixture
async def server() -> AsyncIterator[HookServer]:
    async with hook_server() as running:
        yield running


@pytest.fixture
async def client() -> AsyncIterator[HookClient]:
    async with HookClient() as hooks:
        yield hooks


def hook(server: HookServer | str, **extra: Any) -> HookFilter:
    url = server if isinstance(server, str) else server.url
    return HookFilter(name="policy", url=url, **extra)


def data_input(body: bytes = BODY, **extra: Any) -> HookInput:
    values: dict[str, Any] = {
        "stage": "data",
        "macros": {"i": "QID1", "j": "mx.example"},
        "client_address": "192.0.2.10",
        "client_port": 40000,
        "client_hostname": "client.example",
        "helo": "client.example",
        "sender": (b"<alice@example.org>", [b"SIZE=100"]),
        "recipients": [(b"<bob@example.net>", [])],
        "headers": HEADERS,
        "body": io.BytesIO(body),
        "body_size": len(body),
        "active_connections": 1,
    }
    values.update(extra)
    return HookInput(**values)


async def fails(
    client: HookClient, hook_: HookFilter, request: HookInput | None = None
) -> UpstreamFailure:
    with pytest.raises(UpstreamFailure) as caught:
        await client.call(hook_, request or data_input())
    failure = caught.value
    assert failure.filter_name == hook_.name
    assert failure.stage == (request or data_input()).stage
    return failure


# --- the request ---------------------------------------------------------------------------------


async def test_the_request(server: HookServer, client: HookClient) -> None:
    request = data_input()
    answer = await client.call(hook(server), request)
    assert answer == HookAnswer(Continue(), (), ())
    [seen] = server.requests
    assert seen.method == "POST"
    assert seen.path == "/hook"
    assert seen.header("content-type") == "application/json"
    assert seen.header("accept-encoding") == "identity"
    assert seen.header("content-length") == str(len(seen.body))
    assert seen.header("transfer-encoding") is None
    assert seen.header("authorization") is None
    assert seen.body == encode_request(request)
    assert seen.json["context"]["stage"] == "DATA"
    assert seen.json["message"]["contents"] == BODY.decode()


async def test_an_envelope_stage_request(server: HookServer, client: HookClient) -> None:
    request = HookInput(stage="rcpt", macros={}, sender=(b"<a@x>", []), recipients=[(b"<b@y>", [])])
    await client.call(hook(server), request)
    assert server.requests[0].json["message"] is None
    assert server.requests[0].json["envelope"]["to"] == [{"address": "b@y", "parameters": None}]


async def test_custom_headers_are_sent_but_cannot_replace_ours(
    server: HookServer, client: HookClient
) -> None:
    headers = {"X-My-Header": "my-value", "Content-Type": "text/plain", "X-Other": "2"}
    await client.call(hook(server, http_headers=headers), data_input())
    seen = server.requests[0]
    assert seen.header("x-my-header") == "my-value"
    assert seen.header("x-other") == "2"
    assert [v for k, v in seen.headers if k.lower() == "content-type"] == ["application/json"]


async def test_a_large_body_is_streamed_and_arrives_whole(
    server: HookServer, client: HookClient
) -> None:
    piece = "caf\u00e9 \u20ac \U0001f4e7 \u65e5\u672c plain ascii text\r\n".encode()
    body = (piece * (5 * 1024 * 1024 // len(piece)))[: 5 * 1024 * 1024]
    await client.call(hook(server), data_input(body))
    document = server.requests[0].json
    assert document["message"]["contents"] == body.decode("utf-8", errors="replace")
    assert document["message"]["size"] > len(body)


async def test_connections_are_kept_alive(server: HookServer, client: HookClient) -> None:
    await client.call(hook(server), data_input())
    await client.call(hook(server), data_input())
    assert server.requests[0].client == server.requests[1].client


# --- authentication ------------------------------------------------------------------------------


async def test_basic_auth(server: HookServer, client: HookClient) -> None:
    auth = HttpAuthBasic(username="bridge", secret=SecretValue(secret=SECRET))
    await client.call(hook(server, http_auth=auth), data_input())
    expected = base64.b64encode(f"bridge:{SECRET}".encode()).decode()
    assert server.requests[0].header("authorization") == f"Basic {expected}"


async def test_bearer_auth_replaces_an_authorization_header(
    server: HookServer, client: HookClient
) -> None:
    auth = HttpAuthBearer(bearer_token=SecretValue(secret=SECRET))
    headers = {"authorization": "Token other"}
    await client.call(hook(server, http_auth=auth, http_headers=headers), data_input())
    seen = server.requests[0]
    assert [v for k, v in seen.headers if k.lower() == "authorization"] == [f"Bearer {SECRET}"]


async def test_without_http_auth_an_authorization_header_is_sent_as_given(
    server: HookServer, client: HookClient
) -> None:
    await client.call(hook(server, http_headers={"Authorization": "Token abc"}), data_input())
    assert server.requests[0].header("authorization") == "Token abc"


async def test_secrets_from_the_environment_and_files(
    server: HookServer, client: HookClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_TOKEN", SECRET)
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    env = HttpAuthBearer(bearer_token=SecretEnvironmentVariable(variable_name="HOOK_TOKEN"))
    file = HttpAuthBasic(username="u", secret=SecretFile(file_path=str(path)))
    await client.call(hook(server, http_auth=env), data_input())
    await client.call(hook(server, http_auth=file), data_input())
    assert server.requests[0].header("authorization") == f"Bearer {SECRET}"
    expected = base64.b64encode(f"u:{SECRET}".encode()).decode()
    assert server.requests[1].header("authorization") == f"Basic {expected}"


async def test_a_secret_that_is_gone_fails_the_call(
    server: HookServer, client: HookClient, tmp_path: Path
) -> None:
    path = tmp_path / "secret"
    path.write_text(SECRET)
    configured = hook(
        server, http_auth=HttpAuthBearer(bearer_token=SecretFile(file_path=str(path)))
    )
    path.unlink()
    failure = await fails(client, configured)
    assert failure.kind is FailureKind.REFUSED
    assert "cannot resolve the httpAuth secret" in failure.cause
    assert server.requests == []


async def test_secrets_are_resolved_once_per_hook(
    server: HookServer, client: HookClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_TOKEN", "first")
    configured = hook(
        server,
        http_auth=HttpAuthBearer(
            bearer_token=SecretEnvironmentVariable(variable_name="HOOK_TOKEN")
        ),
    )
    await client.call(configured, data_input())
    monkeypatch.setenv("HOOK_TOKEN", "second")
    await client.call(configured, data_input())
    reloaded = hook(
        server,
        http_auth=HttpAuthBearer(
            bearer_token=SecretEnvironmentVariable(variable_name="HOOK_TOKEN")
        ),
    )
    await client.call(reloaded, data_input())
    assert [r.header("authorization") for r in server.requests] == [
        "Bearer first",
        "Bearer first",
        "Bearer second",
    ]


async def test_secrets_never_appear_in_failures_or_logs(
    server: HookServer,
    client: HookClient,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every failure text, every log record (httpx's and httpcore's debug traces included) and
    every structlog event of a series of failing calls with each kind of authentication."""
    caplog.set_level(logging.DEBUG)
    basic = HttpAuthBasic(username="bridge", secret=SecretValue(secret=SECRET))
    bearer = HttpAuthBearer(bearer_token=SecretValue(secret=SECRET))
    texts: list[str] = []
    with capture_logs() as events:
        for auth in (basic, bearer):
            configured = hook(server, http_auth=auth)
            texts += [repr(configured), repr(auth)]
            for answer in (Answer(status=500), Answer(body=b"garbage"), Answer(status=401)):
                server.answer(answer)
                failure = await fails(client, configured)
                texts += [str(failure), repr(failure), failure.cause]
        closed = hook(f"http://127.0.0.1:{_free_port()}/hook", http_auth=basic)
        failure = await fails(client, closed)
        texts += [str(failure), failure.cause]
    assert caplog.records  # httpx and httpcore did log
    texts += [str(event) for event in events]
    texts += [record.getMessage() for record in caplog.records]
    texts += [caplog.text, *capsys.readouterr()]
    encoded = base64.b64encode(f"bridge:{SECRET}".encode()).decode()
    assert [text for text in texts if SECRET in text or encoded in text] == []


# --- answers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "reply", "edits"),
    [
        ({"action": "accept"}, Continue(), ()),
        ({"action": "discard"}, Discard(), ()),
        ({"action": "reject"}, Reject(), ()),
        (
            {
                "action": "reject",
                "response": {"status": 550, "enhancedStatus": "5.7.1", "message": "spam"},
            },
            ReplyCode(b"550 5.7.1 spam"),
            (),
        ),
        (
            {
                "action": "reject",
                "response": {"status": 451, "enhanced_status": "4.7.1", "message": "later"},
            },
            ReplyCode(b"451 4.7.1 later"),
            (),
        ),
        (
            {"action": "quarantine", "response": {"message": "held"}},
            Continue(),
            (Quarantine(b"held"),),
        ),
        (
            {"action": "accept", "response": {"disconnect": True}},
            ReplyCode(b"421 4.7.0 closing connection"),
            (),
        ),
    ],
)
async def test_actions(
    server: HookServer, client: HookClient, document: dict[str, Any], reply: Any, edits: Any
) -> None:
    server.answer(Answer(json=document))
    assert await client.call(hook(server), data_input()) == HookAnswer(reply, edits, ())


async def test_every_modification_in_both_spellings(server: HookServer, client: HookClient) -> None:
    modifications = [
        {"type": "changeFrom", "value": "bounce@example.org", "parameters": {"size": 5}},
        {"type": "addRcpt", "value": "c@example.net"},
        {"type": "addRecipient", "value": "d@example.net", "parameters": {"notify": "NEVER"}},
        {"type": "deleteRcpt", "value": "bob@example.net"},
        {"type": "deleteRecipient", "value": "e@example.net"},
        {"type": "replaceContents", "value": "new body\r\n"},
        {"type": "addHeader", "name": "X-Spam", "value": "No"},
        {"type": "insertHeader", "index": 0, "name": "X-Top", "value": "1"},
        {"type": "changeHeader", "index": 2, "name": "Subject", "value": "[ok] hello"},
        {"type": "deleteHeader", "index": 3, "name": "X-Mailer"},
    ]
    server.answer(Answer(json={"action": "accept", "modifications": modifications}))
    answer = await client.call(hook(server), data_input())
    assert answer.reply == Continue()
    assert answer.edits == (
        ReplaceBody(b"new body\r\n"),
        ChangeHeader(1, b"Subject", b"[ok] hello"),
        ChangeHeader(1, b"X-Mailer", b""),
        InsertHeader(1, b"X-Top", b"1"),
        AddHeader(b"X-Spam", b"No"),
        ChangeFrom(b"<bounce@example.org>", b"SIZE=5"),
        AddRcpt(b"<c@example.net>"),
        AddRcptPar(b"<d@example.net>", b"NOTIFY=NEVER"),
        DelRcpt(b"<bob@example.net>"),
        DelRcpt(b"<e@example.net>"),
    )


async def test_any_2xx_status_is_an_answer(server: HookServer, client: HookClient) -> None:
    server.answer(Answer(status=202, json={"action": "discard"}))
    assert (await client.call(hook(server), data_input())).reply == Discard()


# --- failures ------------------------------------------------------------------------------------


async def test_timeout(
    server: HookServer, client: HookClient, autojump_clock: trio.testing.MockClock
) -> None:
    server.answer(Answer(delay=60))
    start = trio.current_time()
    configured = hook(server, timeout=Duration(5))
    failure = await fails(client, configured, HookInput(stage="rcpt", macros={}))
    assert failure.kind is FailureKind.COMMAND_TIMEOUT
    assert trio.current_time() - start == pytest.approx(5)
    server.answer(Answer(delay=60))
    assert (await fails(client, configured)).kind is FailureKind.DATA_TIMEOUT


async def test_a_slow_drip_times_out_as_a_whole(
    server: HookServer, client: HookClient, autojump_clock: trio.testing.MockClock
) -> None:
    server.answer(Answer.drip(interval=1.0))
    start = trio.current_time()
    failure = await fails(client, hook(server, timeout=Duration(10)))
    assert failure.kind is FailureKind.DATA_TIMEOUT
    assert trio.current_time() - start == pytest.approx(10)
    record = server.requests[0]
    with trio.fail_after(5):
        await record.finished.wait()
    assert 5 <= record.sent <= 11  # bytes kept arriving; the deadline still held


async def test_http_500(server: HookServer, client: HookClient) -> None:
    server.answer(Answer(status=500, json={"action": "accept"}))
    failure = await fails(client, hook(server))
    assert failure.kind is FailureKind.HTTP_STATUS
    assert failure.cause == "HTTP 500 Internal Server Error"


async def test_redirects_are_not_followed(server: HookServer, client: HookClient) -> None:
    server.answer(Answer(status=302, headers=[("location", server.url + "/elsewhere")]))
    failure = await fails(client, hook(server))
    assert failure.kind is FailureKind.HTTP_STATUS
    assert failure.cause == "HTTP 302 Found (redirects are not followed)"
    assert len(server.requests) == 1


async def test_invalid_json(server: HookServer, client: HookClient) -> None:
    server.answer(Answer(body=b"<html>oops</html>"))
    failure = await fails(client, hook(server))
    assert failure.kind is FailureKind.INVALID_RESPONSE
    assert "not JSON" in failure.cause


async def test_an_answer_that_cannot_be_carried_out(server: HookServer, client: HookClient) -> None:
    server.answer(
        Answer(json={"action": "maybe"}),
        Answer(
            json={
                "action": "accept",
                "modifications": [{"type": "deleteHeader", "index": 9, "name": "X"}],
            }
        ),
    )
    assert "`$.action`" in (await fails(client, hook(server))).cause
    failure = await fails(client, hook(server))
    assert failure.kind is FailureKind.INVALID_RESPONSE
    assert "deleteHeader index 9 is out of range" in failure.cause


async def test_an_oversize_answer_is_abandoned_early(
    server: HookServer, client: HookClient
) -> None:
    total = 256 * 1024 * 1024
    server.answer(Answer.oversize(total))
    failure = await fails(client, hook(server, max_response_size=Size(1024 * 1024)))
    assert failure.kind is FailureKind.OVERSIZE
    record = server.requests[0]
    with trio.fail_after(10):
        await record.finished.wait()
    assert record.sent < 32 * 1024 * 1024  # socket buffers hold a few MB; the rest was never sent


async def test_a_declared_oversize_answer_is_not_read(
    server: HookServer, client: HookClient
) -> None:
    server.answer(Answer(chunk=b" " * 1000, repeat=20, content_length=20_000))
    failure = await fails(client, hook(server, max_response_size=Size(10_000)))
    assert failure.kind is FailureKind.OVERSIZE
    assert "declared a 20000-byte answer" in failure.cause


async def test_an_answer_of_exactly_the_limit_is_fine(
    server: HookServer, client: HookClient
) -> None:
    document = b'{"action":"discard"}'
    server.answer(Answer(body=document))
    answer = await client.call(hook(server, max_response_size=Size(len(document))), data_input())
    assert answer.reply == Discard()


async def test_a_connection_dropped_mid_answer(server: HookServer, client: HookClient) -> None:
    server.answer(Answer(chunk=b'{"action":', repeat=1, content_length=100, abort=True))
    failure = await fails(client, hook(server))
    assert failure.kind is FailureKind.CLOSED


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_connection_refused(client: HookClient) -> None:
    failure = await fails(client, hook(f"http://127.0.0.1:{_free_port()}/hook"))
    assert failure.kind is FailureKind.REFUSED
    assert "Connection refused" in failure.cause


async def test_no_descriptor_left_is_the_bridges_shortage_not_the_hooks(
    client: HookClient,
) -> None:
    """With the process at its descriptor limit the connect fails with EMFILE: kind
    local_resources (no strike against the hook's circuit), not refused."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    url = f"http://127.0.0.1:{_free_port()}/hook"
    # The limit bounds descriptor numbers: set it at the lowest free one, and none is left.
    lowest_free = os.open(os.devnull, os.O_RDONLY)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        failure = await fails(client, hook(url))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert failure.kind is FailureKind.LOCAL_RESOURCES
    assert "Too many open files" in failure.cause


async def test_cancellation_from_outside_is_not_a_failure(
    server: HookServer, client: HookClient, autojump_clock: trio.testing.MockClock
) -> None:
    server.answer(Answer(delay=60))
    with trio.move_on_after(1) as scope:
        await client.call(hook(server, timeout=Duration(30)), data_input())
    assert scope.cancelled_caught


async def test_a_closed_client_refuses_calls(server: HookServer) -> None:
    hooks = HookClient()
    await hooks.call(hook(server), data_input())
    await hooks.aclose()
    with pytest.raises(RuntimeError):
        await hooks.call(hook(server), data_input())


# --- TLS -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_tls_with_a_valid_certificate(ca: trustme.CA) -> None:
    async with (
        hook_server(ca.issue_cert("127.0.0.1")) as tls,
        HookClient(ssl_context=trusting(ca)) as hooks,
    ):
        assert tls.url.startswith("https://")
        assert (await hooks.call(hook(tls), data_input())).reply == Continue()


async def test_tls_with_the_wrong_name_is_refused(ca: trustme.CA) -> None:
    async with (
        hook_server(ca.issue_cert("other.example")) as tls,
        HookClient(ssl_context=trusting(ca)) as hooks,
    ):
        failure = await fails(hooks, hook(tls))
        assert failure.kind is FailureKind.TLS
        assert "mismatch" in failure.cause
        assert tls.requests == []


async def test_tls_from_an_unknown_ca_is_refused(ca: trustme.CA) -> None:
    async with hook_server(ca.issue_cert("127.0.0.1")) as tls, HookClient() as hooks:
        failure = await fails(hooks, hook(tls))
        assert failure.kind is FailureKind.TLS
        assert "certificate verify failed" in failure.cause


async def test_allow_invalid_certs_accepts_both(ca: trustme.CA) -> None:
    async with HookClient() as hooks:
        for cert in (ca.issue_cert("other.example"), ca.issue_cert("127.0.0.1")):
            async with hook_server(cert) as tls:
                answer = await hooks.call(hook(tls, allow_invalid_certs=True), data_input())
                assert answer.reply == Continue()
                assert len(tls.requests) == 1
