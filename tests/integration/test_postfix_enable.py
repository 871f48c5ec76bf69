"""End to end: `enable` expressions decide which milters see which mail, through real Postfix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .postfix_harness import make_message
from .test_postfix_fanout import HEADERS, chain_with_config

DOMAIN_RULES = """
[[milter]]
name = "for-a"
hostname = "127.0.0.1"
port = {ports[0]}
stages = ["rcpt"]
enable = {{ else = "rcpt_domain == 'a.test'" }}

[[milter]]
name = "for-b"
hostname = "127.0.0.1"
port = {ports[1]}
stages = ["rcpt"]
enable = {{ else = "rcpt_domain == 'b.test'" }}
"""

AUTH_RULES = """
[[milter]]
name = "authenticated-only"
hostname = "127.0.0.1"
port = {ports[0]}
stages = ["auth"]
"""

EDIT: dict[str, Any] = {"eom_edits": [["addheader", "X-Filtered", "yes"]]}


def test_filters_per_recipient_domain_see_only_their_mail(tmp_path: Path) -> None:
    """Mail to a.test reaches only the a.test filter, mail to b.test only the b.test one."""
    with chain_with_config(tmp_path, [EDIT, EDIT], DOMAIN_RULES) as (postfix, _, filters):
        for rcpt in ("x@a.test", "y@b.test"):
            result = postfix.send("s@sender.test", [rcpt], make_message(HEADERS, b"x\r\n"))
            assert result.accepted, result
        delivered = postfix.wait_delivered(2)
        seen = [[r["rcpt"] for r in process.events("rcpt")] for process in filters]
    assert seen == [["<x@a.test>"], ["<y@b.test>"]]
    for message in delivered:
        assert [v for n, v in message.headers if n == "X-Filtered"] == ["yes"]


def test_filter_for_authenticated_senders_only(tmp_path: Path) -> None:
    """The `auth` stage: only a session with a SASL login (XCLIENT LOGIN=) reaches the filter."""
    with chain_with_config(tmp_path, [EDIT], AUTH_RULES) as (postfix, _, filters):
        with postfix.session() as smtp:
            result = smtp.send("s@sender.test", ["x@a.test"], make_message(HEADERS, b"x\r\n"))
            assert result.accepted, result
            smtp.quit()
        with postfix.session() as smtp:
            assert smtp.xclient(LOGIN="alice").code == 220
            result = smtp.send("s@sender.test", ["y@a.test"], make_message(HEADERS, b"x\r\n"))
            assert result.accepted, result
            smtp.quit()
        postfix.wait_delivered(2)
        mails = filters[0].events("mail")
    assert len(mails) == 1
    assert mails[0]["macros"].get("{auth_authen}") == "alice"
