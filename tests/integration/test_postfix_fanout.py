"""End to end: Postfix -> the bridge -> several real libmilter filters -> smtp-sink.

The filters (pymilter over Debian's libmilter) between them add, insert, change and delete
headers, change the sender, add and delete recipients, replace a body over 64 KiB, quarantine,
reject one recipient, tempfail a sender and answer with custom reply codes. What reaches the
sink, and what the SMTP client is told, must be exactly what one MTA talking to all of them
would produce.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from tests.fixtures.filter_process import FilterProcess, generated_body

from .bridge_process import BridgeProcess
from .postfix_harness import PostfixInstance, make_message, require_postfix

HEADERS = [
    ("From", "a@sender.test"),
    ("To", "b@rcpt.test"),
    ("Subject", "original"),
    ("X-Drop", "remove me"),
    ("Message-Id", "<fan@sender.test>"),
    ("Date", "Sun, 22 Nov 2026 06:00:00 +0000"),
]

SCANNER: dict[str, Any] = {
    "replies": {
        "mail": {"<spam@sender.test>": ["tempfail", "451", "4.7.1", "greylisted"]},
        "rcpt": {"<bad@rcpt.test>": ["reject", "550", "5.1.1", "no such user"]},
    },
    "eom_edits": [
        ["insheader", 1, "X-First", "1"],
        ["addheader", "X-Scanner", "clean"],
        ["chgheader", "Subject", 1, "scanned"],
    ],
}
REWRITER: dict[str, Any] = {
    "eom_edits": [
        ["chgheader", "X-Drop", 1, ""],
        ["addheader", "X-Rewriter", "yes"],
        ["chgfrom", "<bounce@sender.test>", None],
        ["addrcpt", "<archive@rcpt.test>"],
        ["delrcpt", "<c@rcpt.test>"],
        ["replacebody_bytes", 70000, "B"],
    ],
}


def _toml(filters: list[tuple[str, FilterProcess, list[str]]]) -> str:
    lines = []
    for name, process, stages in filters:
        lines += [
            "[[milter]]",
            f'name = "{name}"',
            f'hostname = "{process.host}"',
            f"port = {process.port}",
            f"stages = {json.dumps(stages)}",
            'timeoutConnect = "5s"',
            'timeoutCommand = "5s"',
            'timeoutData = "10s"',
            "",
        ]
    return "\n".join(lines)


@contextmanager
def chain(
    tmp_path: Path, scripts: list[tuple[str, dict[str, Any], list[str]]]
) -> Iterator[tuple[PostfixInstance, BridgeProcess, list[FilterProcess]]]:
    """Filters, the bridge configured with them, and Postfix in front of the bridge."""
    require_postfix()
    with ExitStack() as stack:
        processes = [
            stack.enter_context(FilterProcess(script, tmp_path / name, name=name))
            for name, script, _ in scripts
        ]
        config = tmp_path / "milterbridge.toml"
        config.write_text(
            _toml(
                [(name, p, stages) for (name, _, stages), p in zip(scripts, processes, strict=True)]
            )
        )
        bridge = stack.enter_context(
            BridgeProcess(tmp_path / "bridge", args=["--config", str(config)])
        )
        postfix = stack.enter_context(
            PostfixInstance(
                tmp_path / "pf",
                milters=[bridge.listen],
                main_cf={"milter_default_action": "accept"},
            )
        )
        yield postfix, bridge, processes


@contextmanager
def chain_with_config(
    tmp_path: Path, scripts: list[dict[str, Any]], toml: str
) -> Iterator[tuple[PostfixInstance, BridgeProcess, list[FilterProcess]]]:
    """Like chain(), with the [[milter]] tables written by the test; {ports[i]} is filter i."""
    require_postfix()
    with ExitStack() as stack:
        processes = [
            stack.enter_context(FilterProcess(script, tmp_path / f"f{i}", name=f"f{i}"))
            for i, script in enumerate(scripts)
        ]
        config = tmp_path / "milterbridge.toml"
        config.write_text(toml.format(ports=[p.port for p in processes]))
        bridge = stack.enter_context(
            BridgeProcess(tmp_path / "bridge", args=["--config", str(config)])
        )
        postfix = stack.enter_context(PostfixInstance(tmp_path / "pf", milters=[bridge.listen]))
        yield postfix, bridge, processes


ALL_STAGES = ["connect", "ehlo", "mail", "rcpt", "data"]


def test_two_filters_edit_one_message(tmp_path: Path) -> None:
    """Both filters' header, envelope and body edits arrive merged; one recipient is refused."""
    with chain(tmp_path, [("scanner", SCANNER, ALL_STAGES), ("rewriter", REWRITER, ["data"])]) as (
        postfix,
        bridge,
        _,
    ):
        result = postfix.send(
            "a@sender.test",
            ["b@rcpt.test", "bad@rcpt.test", "c@rcpt.test"],
            make_message(HEADERS, b"original body\r\n"),
        )
        assert [r.code for r in result.rcpts] == [250, 550, 250]
        assert "5.1.1 no such user" in result.rcpts[1].text
        assert result.accepted, result
        (delivered,) = postfix.wait_delivered(1)
        bridge.wait_for("session_end")
    assert delivered.sender == "bounce@sender.test"
    assert sorted(delivered.recipients) == ["archive@rcpt.test", "b@rcpt.test"]
    assert [name for name, _ in delivered.headers] == [
        "Received",
        "X-First",
        "From",
        "To",
        "Subject",
        "Message-Id",
        "Date",
        "X-Scanner",
        "X-Rewriter",
    ]
    assert delivered.header("Subject") == "scanned"
    assert delivered.body == generated_body(70000, "B")


def test_a_sender_tempfailed_with_a_custom_code(tmp_path: Path) -> None:
    """The scanner's 451 4.7.1 for one sender reaches the SMTP client at MAIL."""
    with chain(tmp_path, [("scanner", SCANNER, ALL_STAGES), ("rewriter", REWRITER, ["data"])]) as (
        postfix,
        _,
        processes,
    ):
        result = postfix.send("spam@sender.test", ["b@rcpt.test"], make_message(HEADERS, b"x\r\n"))
        assert result.mail.code == 451
        assert "4.7.1 greylisted" in result.mail.text
        assert processes[1].events("connect") == []


def test_quarantine_puts_the_message_on_hold(tmp_path: Path) -> None:
    """A quarantine from one filter holds the message; the other filter's edits still apply."""
    holder = {"eom_edits": [["quarantine", "held for review"]]}
    with chain(tmp_path, [("holder", holder, ["data"]), ("rewriter", REWRITER, ["data"])]) as (
        postfix,
        _,
        _,
    ):
        result = postfix.send("a@sender.test", ["b@rcpt.test"], make_message(HEADERS, b"x\r\n"))
        assert result.accepted, result
        postfix.wait_queue_idle(10)
        queue = postfix.queue()
    assert [entry["queue_name"] for entry in queue] == ["hold"]


def test_reject_at_end_of_headers_with_custom_code(tmp_path: Path) -> None:
    """One filter's 554 at end-of-headers is what the client gets after the final dot."""
    rejecter = {"replies": {"eoh": ["reject", "554", "5.7.1", "content rejected"]}}
    with chain(tmp_path, [("rewriter", REWRITER, ["data"]), ("rejecter", rejecter, ["data"])]) as (
        postfix,
        _,
        _,
    ):
        result = postfix.send("a@sender.test", ["b@rcpt.test"], make_message(HEADERS, b"x\r\n"))
        assert result.data is not None
        assert result.data.code == 554
        assert "5.7.1 content rejected" in result.data.text


def test_several_messages_and_rset_in_one_session(tmp_path: Path) -> None:
    """Two messages and an RSET on one SMTP connection: each message gets every filter's edits
    once, and the milters' connections are reused for the second message."""
    adder = {"eom_edits": [["addheader", "X-Seen", "yes"]]}
    with chain(tmp_path, [("adder", adder, ALL_STAGES), ("rewriter", REWRITER, ["data"])]) as (
        postfix,
        bridge,
        processes,
    ):
        with postfix.session() as smtp:
            for number in range(2):
                headers = [*HEADERS[:4], ("Message-Id", f"<m{number}@sender.test>"), HEADERS[5]]
                result = smtp.send(
                    "a@sender.test", ["b@rcpt.test"], make_message(headers, b"x\r\n")
                )
                assert result.accepted, result
                assert smtp.command("MAIL", "FROM:<a@sender.test>").ok
                assert smtp.rset().ok
            smtp.quit()
        delivered = postfix.wait_delivered(2)
        (end,) = bridge.wait_for("session_end")
        adder_connections = {r["conn"] for r in processes[0].events("connect")}
    assert end["messages"] == 2
    assert len(adder_connections) == 1
    for message in delivered:
        assert [v for n, v in message.headers if n == "X-Seen"] == ["yes"]
        assert [v for n, v in message.headers if n == "X-Rewriter"] == ["yes"]
        assert message.body == generated_body(70000, "B")


def test_late_joiner_refusing_a_replayed_recipient_removes_it(tmp_path: Path) -> None:
    """A milter joining at DATA refuses one replayed recipient: it is deleted at end-of-message
    and the others are delivered (design §8: a replayed command's reply counts now)."""
    picky = {"replies": {"rcpt": {"<c@rcpt.test>": "reject"}}}
    with chain(tmp_path, [("picky", picky, ["data"])]) as (postfix, _, processes):
        result = postfix.send(
            "a@sender.test", ["b@rcpt.test", "c@rcpt.test"], make_message(HEADERS, b"x\r\n")
        )
        assert [r.code for r in result.rcpts] == [250, 250]
        assert result.accepted, result
        (delivered,) = postfix.wait_delivered(1)
        replayed = [r["rcpt"] for r in processes[0].events("rcpt")]
    assert replayed == ["<b@rcpt.test>", "<c@rcpt.test>"]
    assert list(delivered.recipients) == ["b@rcpt.test"]


DEFERRED = """
[server]
deferMessageVerdicts = true

[[milter]]
name = "rewriter"
hostname = "127.0.0.1"
port = {ports[0]}

[[milter]]
name = "rejecter"
hostname = "127.0.0.1"
port = {ports[1]}
"""


def test_deferred_verdicts_reach_postfix_at_end_of_message(tmp_path: Path) -> None:
    """With deferMessageVerdicts, Postfix streams headers and body without waiting (it was asked
    for no replies there); a filter's refusal of one header is the answer after the final dot,
    and a message nobody refuses arrives with every edit."""
    rejecter = {"replies": {"header": {"X-Drop": ["reject", "554", "5.7.1", "header refused"]}}}
    with chain_with_config(tmp_path, [REWRITER, rejecter], DEFERRED) as (postfix, bridge, _):
        result = postfix.send("a@sender.test", ["b@rcpt.test"], make_message(HEADERS, b"x\r\n"))
        assert result.data is not None
        assert result.data.code == 554
        assert "5.7.1 header refused" in result.data.text
        clean = [(name, value) for name, value in HEADERS if name != "X-Drop"]
        result = postfix.send("a@sender.test", ["b@rcpt.test"], make_message(clean, b"x\r\n"))
        assert result.accepted, result
        (delivered,) = postfix.wait_delivered(1)
        bridge.wait_for("session_end")
    assert delivered.header("X-Rewriter") == "yes"
    assert delivered.body == generated_body(70000, "B")
