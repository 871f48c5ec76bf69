"""End to end: real Postfix -> the bridge -> an HTTP hook and a real libmilter filter together.

The hook endpoint is the test fixture's hypercorn server, running in this test's event loop; the
synchronous Postfix, bridge and filter harnesses run in a worker thread meanwhile.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from tests.fixtures.filter_process import FilterProcess
from tests.fixtures.hook_server import Answer, HookServer, Recorded, hook_server

from .bridge_process import BridgeProcess
from .postfix_harness import PostfixInstance, SinkMessage, make_message, require_postfix

T = TypeVar("T")

HEADERS = [
    ("From", "a@sender.test"),
    ("To", "b@rcpt.test"),
    ("Subject", "original"),
    ("X-Mailer", "test"),
    ("Message-Id", "<hook@sender.test>"),
]

CONFIG = """
[[milter]]
name = "stamp"
hostname = "127.0.0.1"
port = {milter_port}

[[hook]]
name = "policy"
url = "{url}"
stages = ["connect", "ehlo", "mail", "rcpt", "data"]
timeout = "10s"
httpHeaders = {{ "X-Test" = "e2e" }}
httpAuth = {{ "@type" = "Bearer", bearerToken = {{ "@type" = "Value", secret = "t0ken" }} }}
"""

MILTER_SCRIPT: dict[str, Any] = {"eom_edits": [["addheader", "X-Milter", "stamped"]]}


def policy(record: Recorded) -> Answer:
    """Refuses one recipient; at data adds, changes and deletes headers and adds a recipient."""
    request = record.json
    stage = request["context"]["stage"]
    if stage == "RCPT" and request["envelope"]["to"][-1]["address"] == "bad@rcpt.test":
        return Answer(
            {
                "action": "reject",
                "response": {"status": 550, "enhancedStatus": "5.1.1", "message": "unknown user"},
            }
        )
    if stage != "DATA":
        return Answer({"action": "accept"})
    names = [name for name, _ in request["message"]["headers"]]
    return Answer(
        {
            "action": "accept",
            "modifications": [
                {"type": "addHeader", "name": "X-Hook", "value": "checked"},
                {
                    "type": "changeHeader",
                    "index": names.index("Subject"),
                    "name": "Subject",
                    "value": "[hooked] original",
                },
                {"type": "deleteHeader", "index": names.index("X-Mailer"), "name": "X-Mailer"},
                {"type": "addRecipient", "value": "archive@rcpt.test", "parameters": None},
                {"type": "replaceContents", "value": "replaced by the hook\r\n"},
            ],
        }
    )


async def in_thread(function: Callable[..., T], *args: Any) -> T:
    return await trio.to_thread.run_sync(functools.partial(function, *args))


def run_chain(tmp_path: Path, server: HookServer) -> tuple[list[Any], list[SinkMessage]]:
    """Postfix -> bridge -> (filter + hook): one message with a good and a bad recipient."""
    with FilterProcess(MILTER_SCRIPT, tmp_path / "milter", name="stamp") as milter:
        config = tmp_path / "bridge.toml"
        config.write_text(CONFIG.format(milter_port=milter.port, url=server.url))
        with (
            BridgeProcess(tmp_path / "bridge", args=["--config", str(config)]) as bridge,
            PostfixInstance(tmp_path / "pf", milters=[bridge.listen]) as postfix,
        ):
            result = postfix.send(
                "a@sender.test",
                ["b@rcpt.test", "bad@rcpt.test"],
                make_message(HEADERS, b"original body\r\n"),
            )
            delivered = postfix.wait_delivered(1)
            bridge.wait_for("session_end")
            return [result], delivered


async def test_postfix_bridge_hook_and_milter_together(tmp_path: Path) -> None:
    require_postfix()
    async with hook_server() as server:
        server.responder = policy
        (result,), delivered = await in_thread(run_chain, tmp_path, server)
    assert [r.code for r in result.rcpts] == [250, 550]
    assert "5.1.1 unknown user" in result.rcpts[1].text
    assert result.accepted, result
    (message,) = delivered
    assert sorted(message.recipients) == ["archive@rcpt.test", "b@rcpt.test"]
    assert message.header("X-Hook") == "checked"
    assert message.header("X-Milter") == "stamped"
    assert message.header("Subject") == "[hooked] original"
    assert message.header("X-Mailer") is None
    assert message.body == b"replaced by the hook\r\n"

    stages = [record.json["context"]["stage"] for record in server.requests]
    assert stages == ["CONNECT", "EHLO", "MAIL", "RCPT", "RCPT", "DATA"]
    for record in server.requests:
        assert record.header("Authorization") == "Bearer t0ken"
        assert record.header("X-Test") == "e2e"
        assert record.header("Content-Type") == "application/json"
    data = server.requests[-1].json
    context = data["context"]
    assert context["client"]["ip"] == "127.0.0.1"
    assert context["client"]["ehlo"] == "client.test"
    assert context["client"]["activeConnections"] == 1
    assert context["server"]["name"]  # Postfix's myhostname, from the j macro
    assert context["server"]["ip"] == "127.0.0.1"
    assert isinstance(context["server"]["port"], int)
    assert context["queue"]["id"]  # the queue id, from the i macro
    assert data["envelope"]["from"]["address"] == "a@sender.test"
    assert [to["address"] for to in data["envelope"]["to"]] == ["b@rcpt.test"]
    names = [name for name, _ in data["message"]["headers"]]
    assert names[: len(HEADERS)] == [name for name, _ in HEADERS]  # Postfix appends a Date
    assert data["message"]["contents"] == "original body\r\n"
