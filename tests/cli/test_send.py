"""`milterbridge send` against a real libmilter filter and against the bridge itself."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from milterbridge.cli import main
from milterbridge.send import Envelope, Verdict, parse_message, send_main
from tests.fixtures.filter_process import running_filter
from tests.integration.bridge_process import BridgeProcess

MESSAGE = b"From: a@sender.test\nTo: b@rcpt.test\nSubject: hello\n folded\n\nline one\nline two\n"


def test_parse_message_gives_milter_headers_and_a_crlf_body() -> None:
    """Folded lines are joined by LF and one leading space is removed, as Postfix sends them."""
    headers, body = parse_message(MESSAGE)
    assert headers == [
        (b"From", b"a@sender.test"),
        (b"To", b"b@rcpt.test"),
        (b"Subject", b"hello\n folded"),
    ]
    assert body == b"line one\r\nline two\r\n"


def _send(spec: str, recipients: list[bytes]) -> tuple[int, str]:
    out = io.StringIO()
    envelope = Envelope(sender=b"a@sender.test", recipients=recipients)
    return send_main(spec, envelope, MESSAGE, 10.0, out), out.getvalue()


def test_send_prints_steps_edits_and_the_diff(tmp_path: Path) -> None:
    """Each step's answer, each edit, and the edited message as a diff; a refused rcpt is gone."""
    script = {
        "eom_edits": [
            ["insheader", 1, "X-Top", "t"],
            ["chgheader", "Subject", 1, "changed"],
            ["chgfrom", "<new@sender.test>", None],
        ],
        "replies": {"rcpt": {"<bad@rcpt.test>": ["reject", "550", "5.1.1", "no such user"]}},
    }
    with running_filter(script, tmp_path) as proc:
        status, out = _send(proc.spec, [b"b@rcpt.test", b"bad@rcpt.test"])
    assert status == Verdict.ACCEPTED
    assert "rcpt      reply 550 5.1.1 no such user" in out
    assert "  edit      insheader #1 X-Top: t" in out
    assert "\n+X-Top: t\n From: a@sender.test\n" in out
    assert "-Subject: hello\n- folded\n+Subject: changed\n" in out
    assert "-MAIL FROM:<a@sender.test>\n+MAIL FROM:<new@sender.test>\n" in out
    assert "RCPT TO:<bad@rcpt.test>" not in out
    assert out.endswith("verdict   accepted\n")


@pytest.mark.parametrize(
    ("replies", "verdict"),
    [
        ({"mail": "tempfail"}, Verdict.TEMPFAILED),
        ({"eoh": ["reject", "554", "5.7.1", "spam"]}, Verdict.REJECTED),
        ({"eom": "discard"}, Verdict.DISCARDED),
        ({"rcpt": "reject"}, Verdict.REJECTED),
    ],
)
def test_exit_status_is_the_verdict(
    tmp_path: Path, replies: dict[str, object], verdict: Verdict
) -> None:
    """tempfail 3, reject 4, discard 5: scripts can branch on the exit status."""
    with running_filter({"replies": replies}, tmp_path) as proc:
        status, _ = _send(proc.spec, [b"b@rcpt.test"])
    assert status == verdict


def test_quarantine_is_reported_as_held(tmp_path: Path) -> None:
    """A quarantined message is accepted but held: exit status 6 and the reason printed."""
    with running_filter({"eom_edits": [["quarantine", "suspicious"]]}, tmp_path) as proc:
        status, out = _send(proc.spec, [b"b@rcpt.test"])
    assert status == Verdict.HELD
    assert "held      suspicious" in out


def test_send_through_the_pass_through_bridge(tmp_path: Path) -> None:
    """Through the bridge the message is unchanged and accepted."""
    with BridgeProcess(tmp_path) as bridge:
        status, out = _send(bridge.listen, [b"b@rcpt.test"])
    assert status == Verdict.ACCEPTED
    assert "(message unchanged)" in out
    assert "eom       continue" in out


def test_unreachable_milter_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing listening: exit status 1 and the reason on stderr."""
    status, _ = _send("inet:127.0.0.1:1", [b"b@rcpt.test"])
    assert status == 1
    assert "inet:127.0.0.1:1" in capsys.readouterr().err


def test_cli_send_checks_its_arguments(tmp_path: Path) -> None:
    """A missing file or a malformed --macro is a usage error (exit 2)."""
    assert main(["send", str(tmp_path / "missing.eml")]) == 2
    eml = tmp_path / "m.eml"
    eml.write_bytes(MESSAGE)
    assert main(["send", "--macro", "novalue", str(eml)]) == 2
