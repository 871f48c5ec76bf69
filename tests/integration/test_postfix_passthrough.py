"""End to end: real Postfix -> the bridge (pass-through) -> smtp-sink.

Each message must reach the sink exactly as sent, apart from Postfix's own Received header,
whatever the size of its body and however many messages share one SMTP session.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .bridge_process import BridgeProcess
from .postfix_harness import PostfixInstance, make_message, require_postfix

HEADERS = [
    ("From", "Alice <a@sender.test>"),
    ("To", "b@rcpt.test"),
    ("Subject", "pass-through\r\n\tfolded line"),
    ("Message-Id", "<1@sender.test>"),
    ("Date", "Sun, 22 Nov 2026 06:00:00 +0000"),
    ("X-Spacing", "  two leading spaces"),
]


@pytest.fixture
def bridge(tmp_path: Path) -> Iterator[BridgeProcess]:
    with BridgeProcess(tmp_path / "bridge") as process:
        yield process


@pytest.fixture
def postfix(tmp_path: Path, bridge: BridgeProcess) -> Iterator[PostfixInstance]:
    require_postfix()
    settings = {"milter_default_action": "reject", "milter_protocol": 6}
    with PostfixInstance(tmp_path, milters=[bridge.listen], main_cf=settings) as instance:
        yield instance


def test_message_passes_unchanged(postfix: PostfixInstance, bridge: BridgeProcess) -> None:
    """Headers, folding, spacing and a body over 64 KiB arrive exactly as sent."""
    body = b"".join(b"body line %05d with some text to fill it up\r\n" % i for i in range(3000))
    result = postfix.send(
        "a@sender.test", ["b@rcpt.test", "c@rcpt.test"], make_message(HEADERS, body)
    )
    assert result.accepted, result
    (delivered,) = postfix.wait_delivered(1)
    assert delivered.sender == "a@sender.test"
    assert sorted(delivered.recipients) == ["b@rcpt.test", "c@rcpt.test"]
    assert delivered.headers[0][0] == "Received"
    assert list(delivered.headers_except("Received")) == HEADERS
    assert delivered.body == body
    (end,) = bridge.wait_for("session_end")
    assert end["messages"] == 1
    assert end["outcome"] in ("quit", "closed")
    assert end["error"] is None


def test_several_messages_and_rset_on_one_connection(
    postfix: PostfixInstance, bridge: BridgeProcess
) -> None:
    """Three messages and an RSET in one SMTP session: one milter session, all delivered."""
    with postfix.session() as smtp:
        for number in range(2):
            headers = [*HEADERS[:3], ("Message-Id", f"<m{number}@sender.test>"), HEADERS[4]]
            assert smtp.send(
                "a@sender.test", ["b@rcpt.test"], make_message(headers, b"hi\r\n")
            ).accepted
        assert smtp.command("MAIL", "FROM:<a@sender.test>").ok
        assert smtp.rset().ok
        third = [*HEADERS[:3], ("Message-Id", "<m2@sender.test>"), HEADERS[4]]
        assert smtp.send("a@sender.test", ["b@rcpt.test"], make_message(third, b"")).accepted
        smtp.quit()
    delivered = postfix.wait_delivered(3)
    assert sorted(m.header("Message-Id") or "" for m in delivered) == [
        "<m0@sender.test>",
        "<m1@sender.test>",
        "<m2@sender.test>",
    ]
    (end,) = bridge.wait_for("session_end")
    assert end["messages"] == 3
    assert end["aborts"] >= 4


def test_eight_bit_headers_and_body_pass_unchanged(
    postfix: PostfixInstance, bridge: BridgeProcess
) -> None:
    """Raw 8-bit bytes in headers and body are bytes to the codec, never decoded."""
    message = make_message(HEADERS[:2], b"").replace(b"\r\n\r\n", b"\r\nX-Latin: caf\xe9\r\n\r\n")
    message += "Grüße\r\n".encode()
    result = postfix.send("a@sender.test", ["b@rcpt.test"], message)
    assert result.accepted, result
    (delivered,) = postfix.wait_delivered(1)
    assert delivered.body == "Grüße\r\n".encode()
    assert b"X-Latin: caf\xe9" in delivered.raw


@pytest.mark.parametrize("protocol", [2, 4])
def test_older_protocol_versions_negotiate_and_pass(tmp_path: Path, protocol: int) -> None:
    """Postfix with milter_protocol 2 or 4 negotiates that version and mail still passes."""
    require_postfix()
    settings = {"milter_default_action": "reject", "milter_protocol": protocol}
    with (
        BridgeProcess(tmp_path / "bridge") as bridge,
        PostfixInstance(tmp_path, milters=[bridge.listen], main_cf=settings) as postfix,
    ):
        result = postfix.send("a@sender.test", ["b@rcpt.test"], make_message(HEADERS, b"v2\r\n"))
        assert result.accepted, result
        (delivered,) = postfix.wait_delivered(1)
        assert list(delivered.headers_except("Received")) == HEADERS
        (end,) = bridge.wait_for("session_end")
        assert end["messages"] == 1


def test_unix_socket_listener(tmp_path: Path) -> None:
    """Postfix reaches the bridge over a Unix socket created with the configured mode."""
    require_postfix()
    socket_dir = Path(tempfile.mkdtemp(prefix="mb-"))
    try:
        socket_dir.chmod(0o755)
        config = tmp_path / "milterbridge.toml"
        config.write_text('[server]\nsocketMode = "0666"\n')
        spec = f"unix:{socket_dir}/milter.sock"
        with (
            BridgeProcess(
                tmp_path / "bridge", listen=spec, args=["--config", str(config)]
            ) as bridge,
            PostfixInstance(
                tmp_path, milters=[spec], main_cf={"milter_default_action": "reject"}
            ) as postfix,
        ):
            result = postfix.send("a@sender.test", ["b@rcpt.test"], make_message(HEADERS, b"x\r\n"))
            assert result.accepted, result
            assert len(postfix.wait_delivered(1)) == 1
            assert bridge.wait_for("session_end")[0]["messages"] == 1
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
