"""Self-test of the Postfix harness: mail through Postfix without any milter."""

from __future__ import annotations

import os
import pwd
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .postfix_harness import (
    POSTFIX_HOSTNAME,
    PostfixInstance,
    make_message,
    parse_sink_file,
    require_postfix,
)

HEADERS = [
    ("From", "Alice <a@sender.test>"),
    ("To", "b@rcpt.test, c@rcpt.test"),
    ("Subject", "harness self-test"),
    ("Message-Id", "<selftest-1@sender.test>"),
    ("Date", "Mon, 01 Jan 2024 00:00:00 +0000"),
    ("X-Folded", "first part\r\n\tsecond part"),
]
BODY = (
    b"Hello,\r\n"
    b"\r\n"
    b".a line starting with a dot\r\n"
    b"  indented line with trailing space \r\n"
    b"\r\n"
    b"-- \r\n"
    b"sig\r\n"
)


@pytest.fixture
def postfix(tmp_path: Path) -> Iterator[PostfixInstance]:
    require_postfix()
    with PostfixInstance(tmp_path, milters=[]) as pf:
        yield pf
    assert pf.leftover_processes() == []


def test_message_arrives_unchanged(postfix: PostfixInstance) -> None:
    message = make_message(HEADERS, BODY)
    t0 = time.monotonic()
    result = postfix.send("a@sender.test", ["b@rcpt.test", "c@rcpt.test"], message)
    assert result.mail.code == 250, result
    assert [r.code for r in result.rcpts] == [250, 250], result
    assert result.data_command is not None and result.data_command.code == 354, result
    assert result.accepted, result
    assert result.queue_id is not None

    [msg] = postfix.wait_delivered(1)
    print(f"send+deliver: {time.monotonic() - t0:.3f}s, start: {postfix.timings['start']:.3f}s")

    assert msg.sender == "a@sender.test"
    assert msg.recipients == ("b@rcpt.test", "c@rcpt.test")
    assert msg.helo == POSTFIX_HOSTNAME
    # Exactly one header added: Postfix's Received, on top.
    assert msg.header_names[0] == "Received"
    assert msg.headers[1:] == tuple(HEADERS), msg.headers
    received = msg.headers[0][1]
    assert received.startswith("from client.test (unknown [127.0.0.1])"), received
    assert f"by {POSTFIX_HOSTNAME} (Postfix) with ESMTP id {result.queue_id}" in received
    assert msg.body == BODY
    assert msg.content.endswith(b"\r\n\r\n" + BODY)
    assert postfix.queue() == []


def test_two_messages_one_session(postfix: PostfixInstance) -> None:
    with postfix.session(helo="multi.test") as session:
        assert session.greeting.code == 220
        assert session.ehlo_reply is not None and session.ehlo_reply.code == 250
        results = [
            session.send(
                f"s{i}@sender.test",
                [f"r{i}@rcpt.test"],
                make_message(
                    [
                        ("From", f"s{i}@sender.test"),
                        ("Subject", f"message {i}"),
                        ("Message-Id", f"<multi-{i}@sender.test>"),
                        ("Date", "Mon, 01 Jan 2024 00:00:00 +0000"),
                    ],
                    f"body {i}\n",
                ),
            )
            for i in (1, 2)
        ]
    assert all(r.accepted for r in results), results
    assert len({r.queue_id for r in results}) == 2

    messages = postfix.wait_delivered(2)
    by_subject = {m.header("Subject"): m for m in messages}
    assert set(by_subject) == {"message 1", "message 2"}
    for i in (1, 2):
        m = by_subject[f"message {i}"]
        assert m.sender == f"s{i}@sender.test"
        assert m.recipients == (f"r{i}@rcpt.test",)
        assert m.body == f"body {i}\r\n".encode()
        assert "from multi.test (unknown [127.0.0.1])" in (m.header("Received") or "")


def test_rejects_are_captured_not_raised(postfix: PostfixInstance) -> None:
    with postfix.session() as session:
        bad_mail = session.send("not an address", ["b@rcpt.test"], b"Subject: x\r\n\r\nx\r\n")
        assert bad_mail.mail.code == 501 and not bad_mail.accepted and not bad_mail.rcpts
        bad_rcpt = session.send("a@sender.test", ["<>"], b"Subject: x\r\n\r\nx\r\n")
        assert bad_rcpt.rcpts[0].code // 100 == 5 and bad_rcpt.data is None
        # The session is still usable afterwards.
        ok = session.send("a@sender.test", ["b@rcpt.test"], b"Subject: ok\r\n\r\nok\r\n")
        assert ok.accepted, ok
    [msg] = postfix.wait_delivered(1)
    # Postfix adds what the message lacks.
    assert {"Message-Id", "Date", "From"} <= {n for n, _ in msg.headers}


def test_held_message_shows_in_queue(tmp_path: Path) -> None:
    require_postfix()
    hold = {"smtpd_sender_restrictions": "check_sender_access inline:{hold@sender.test=HOLD}"}
    with PostfixInstance(tmp_path, main_cf=hold) as pf:
        held = pf.send("hold@sender.test", ["b@rcpt.test"], b"Subject: held\r\n\r\nx\r\n")
        sent = pf.send("a@sender.test", ["b@rcpt.test"], b"Subject: sent\r\n\r\nx\r\n")
        assert held.accepted and sent.accepted
        [msg] = pf.wait_delivered(1)
        assert msg.header("Subject") == "sent"
        [entry] = pf.queue()
        assert entry["queue_name"] == "hold"
        assert entry["queue_id"] == held.queue_id
        assert entry["sender"] == "hold@sender.test"


def test_layout_passes_postfix_check(postfix: PostfixInstance) -> None:
    assert postfix.check() == ""
    # ...and check() does report problems.
    os.chown(postfix.queue_dir / "pid", pwd.getpwnam("postfix").pw_uid, -1)
    assert "warning: not owned by root" in postfix.check()


def test_no_processes_left_after_close(tmp_path: Path) -> None:
    require_postfix()
    pf = PostfixInstance(tmp_path, main_cf={"milter_default_action": "accept"})
    with pf:
        assert pf.running
        assert pf.leftover_processes() != []
        assert "milter_default_action = accept" in (pf.config_dir / "main.cf").read_text()
    assert not pf.running
    assert pf.leftover_processes() == []
    print(f"start {pf.timings['start']:.3f}s stop {pf.timings['stop']:.3f}s")
    # Diagnostics are kept under the test's base dir.
    assert "daemon started" in (tmp_path / "postfix" / "maillog").read_text()
    pf.close()  # idempotent


def test_wait_delivered_failure_includes_maillog(postfix: PostfixInstance) -> None:
    with pytest.raises(AssertionError, match=r"(?s)expected 1 delivered.*maillog tail"):
        postfix.wait_delivered(1, timeout=5, settle=0.2)


def test_parse_sink_file() -> None:
    raw = (
        b"X-Client-Addr: 127.0.0.1\n"
        b"X-Client-Proto: ESMTP\n"
        b"X-Helo-Args: mta.test\n"
        b"X-Mail-Args: <> BODY=8BITMIME\n"
        b"X-Rcpt-Args: <b@x.test> ORCPT=rfc822;b@x.test\n"
        b"Received: from mta.test ([127.0.0.1])\n"
        b"\tby smtp-sink (smtp-sink) with ESMTP id 372acb5b;\n"
        b"\tSun, 22 Nov 2026 06:05:47 +0000 (UTC)\n"
        b"Received: from client.test (unknown [127.0.0.1])\n"
        b"\tby mta.test (Postfix) with ESMTP id 8B84020C8E1;\n"
        b"\tSun, 22 Nov 2026 05:55:42 +0000 (UTC)\n"
        b"Subject: hi\n"
        b"X-A:1\n"
        b" folded\n"
        b"\n"
        b"line1\n"
        b".dot\n"
        b"\n"
    )
    m = parse_sink_file(raw)
    assert m.sender == ""
    assert m.mail_args == "<> BODY=8BITMIME"
    assert m.recipients == ("b@x.test",)
    assert m.rcpt_args == ("<b@x.test> ORCPT=rfc822;b@x.test",)
    assert m.header_names == ["Received", "Subject", "X-A"]
    assert m.header("x-a") == "1\r\n folded"
    assert m.headers_except("Received") == [("Subject", "hi"), ("X-A", "1\r\n folded")]
    assert m.body == b"line1\r\n.dot\r\n"
    with pytest.raises(ValueError, match="incomplete"):
        parse_sink_file(raw[:-3])
