"""SMFIR_REPLYCODE validation, as the stricter of Postfix and Sendmail applies it."""

from __future__ import annotations

import pytest

from milterbridge.milter import client_text, reply_code_problem


@pytest.mark.parametrize(
    "text",
    [
        b"550 5.7.1 Rejected",
        b"451 4.3.2 Try later",
        b"550 Rejected without enhanced code",
        b"421 4.7.0 closing",
        b"550 ",
        b"554 5.7.1 100%% sure",
        b"550-5.7.1 first line\r\n550-5.7.1 second\r\n550 5.7.1 last",
        b"450 4.2.0",
    ],
)
def test_valid_reply_codes(text: bytes) -> None:
    """Replies both MTAs would send to the client unchanged."""
    assert reply_code_problem(text) is None


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (b"250 2.0.0 ok", "4xx/5xx"),
        (b"650 x", "4xx/5xx"),
        (b"55 x", "4xx/5xx"),
        (b"550", "4xx/5xx"),
        (b"550x", "4xx/5xx"),
        (b"550 4.7.1 class mismatch", "class differs"),
        (b"451 5.7.1 class mismatch", "class differs"),
        (b"550 5.7 short", "malformed enhanced"),
        (b"550 5.1234.1 long", "malformed enhanced"),
        (b"550 Totally 100% sure", "lone '%'"),
        (b"550 100 percent", "enhanced"),
        (b"550-first\r\n550-second", "' '"),
        (b"550 first\r\n550 second", "'-'"),
        (b"550-first\r\n450 second", "has code 450"),
        (b"550-first\r\n550 second\r\n", "ends with CRLF"),
        (b"550 bare\nLF", "bare CR or LF"),
        (b"550 a\x00b", "NUL"),
    ],
)
def test_invalid_reply_codes(text: bytes, why: str) -> None:
    """Each malformed reply is refused with a reason naming the broken rule."""
    problem = reply_code_problem(text)
    assert problem is not None
    assert why in problem


def test_client_sees_percent_unescaped() -> None:
    """A literal percent sign is written %% and reaches the client as %."""
    assert client_text(b"550 5.7.1 100%% sure") == b"550 5.7.1 100% sure"
