"""End to end: a pass-2 "signer" sees what the pass-1 filters made of the message (Postfix ->
bridge -> two real libmilter filters), and Postfix delivers both passes' edits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .postfix_harness import make_message
from .test_postfix_fanout import HEADERS, chain_with_config

PASSES = """
[[milter]]
name = "disclaimer"
hostname = "127.0.0.1"
port = {ports[0]}

[[milter]]
name = "signer"
hostname = "127.0.0.1"
port = {ports[1]}
pass = 2
"""

DISCLAIMER: dict[str, Any] = {
    "eom_edits": [
        ["chgheader", "Subject", 1, "[external] original"],
        ["addheader", "X-Disclaimer", "added"],
        ["replacebody", "original body\r\n-- \r\nsent from outside\r\n"],
    ]
}
SIGNER: dict[str, Any] = {"eom_edits": [["addheader", "X-Signed", "yes"]]}


def test_a_second_pass_signs_what_the_first_pass_produced(tmp_path: Path) -> None:
    with chain_with_config(tmp_path, [DISCLAIMER, SIGNER], PASSES) as (postfix, bridge, filters):
        result = postfix.send(
            "a@sender.test", ["b@rcpt.test"], make_message(HEADERS, b"original body\r\n")
        )
        assert result.accepted, result
        (delivered,) = postfix.wait_delivered(1)
        bridge.wait_for("session_end")
        signer_saw = {(e["name"], e["value"]) for e in filters[1].events("header")}
        (signer_eom,) = filters[1].events("eom")
    assert ("Subject", "[external] original") in signer_saw
    assert ("X-Disclaimer", "added") in signer_saw
    assert signer_eom.get("body") == "original body\r\n-- \r\nsent from outside\r\n"
    assert delivered.header("Subject") == "[external] original"
    assert delivered.header("X-Disclaimer") == "added"
    assert delivered.header("X-Signed") == "yes"
    assert delivered.body == b"original body\r\n-- \r\nsent from outside\r\n"
