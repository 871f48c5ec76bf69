"""The upstream milter client against a real libmilter filter (pymilter, a subprocess).

These prove the happy paths on the reference implementation of the filter side: negotiation at
version 6 and 2, macro filtering, disabled and no-reply steps, body splitting, SKIP, edits,
a Unix socket and the flags overrides. Faults are in test_milter_client_faults.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import trio

from milterbridge.milter import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    CHUNK_SIZE,
    Accept,
    Action,
    AddHeader,
    Connect,
    Continue,
    Data,
    EndOfHeaders,
    EndOfMessage,
    Family,
    Header,
    Helo,
    Macro,
    Mail,
    OptNeg,
    Progress,
    Protocol,
    Rcpt,
    ReplaceBody,
    Skip,
    Tempfail,
    Unknown,
)
from milterbridge.upstream import UpstreamEndpoint, UpstreamMilter, connect_upstream
from tests.fixtures.filter_process import FilterProcess, generated_body, running_filter

POSTFIX_OFFER = OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL)
CONNECT = Connect(b"client.test", Family.INET, 40000, b"192.0.2.10")
BIG_BODY = b"".join(b"line %05d of a body that is longer than 64 KiB\r\n" % i for i in range(2000))


def endpoint_for(proc: FilterProcess, **overrides: Any) -> UpstreamEndpoint:
    fields: dict[str, Any] = {
        "name": "pymilter",
        "hostname": proc.host,
        "port": proc.port,
        "unix_path": str(proc.path) if proc.path is not None else None,
        "timeout_connect": 10.0,
        "timeout_command": 10.0,
        "timeout_data": 10.0,
    }
    fields.update(overrides)
    return UpstreamEndpoint(**fields)


async def envelope(upstream: UpstreamMilter) -> None:
    """Connect, HELO, MAIL, RCPT: each answered CONTINUE."""
    assert await upstream.command(Macro(b"C", ((b"j", b"mx.test"),)), CONNECT) == [Continue()]
    assert await upstream.command(Macro(b"H"), Helo(b"client.test")) == [Continue()]
    assert await upstream.command(Macro(b"M", ((b"i", b"QID1"),)), Mail(b"<a@x.test>")) == [
        Continue()
    ]
    assert await upstream.command(Macro(b"R"), Rcpt(b"<b@y.test>")) == [Continue()]


async def test_v6_message_with_a_big_body_and_edits(tmp_path: Path) -> None:
    """A whole v6 message: the body goes out as 2 chunks from one call, EOM edits come back."""
    script = {
        "eom_edits": [
            ["addheader", "X-Seen", "yes"],
            ["progress"],
            ["replacebody_bytes", 100, "Z"],
        ],
        "replies": {"eom": "accept"},
    }
    with running_filter(script, tmp_path) as proc:
        upstream = await connect_upstream(endpoint_for(proc), POSTFIX_OFFER)
        assert upstream.negotiated.version == 6
        await envelope(upstream)
        assert await upstream.command(Macro(b"T"), Data()) == [Continue()]
        assert await upstream.command(Macro(b"L"), Header(b"Subject", b"hi")) == [Continue()]
        assert await upstream.command(Macro(b"N"), EndOfHeaders()) == [Continue()]
        assert await upstream.body(Macro(b"B"), BIG_BODY) == [Continue(), Continue()]
        assert await upstream.command(Macro(b"E"), EndOfMessage()) == [
            AddHeader(b"X-Seen", b"yes"),
            Progress(),
            ReplaceBody(generated_body(100, "Z")),
            Accept(),
        ]
        await upstream.quit()
        assert upstream.closed
        proc.wait_for("close")
        seen = proc.events()
    assert [r["len"] for r in seen if r["event"] == "body"] == [
        CHUNK_SIZE,
        len(BIG_BODY) - CHUNK_SIZE,
    ]
    (eom,) = [r for r in seen if r["event"] == "eom"]
    assert eom["body_sha256"] == hashlib.sha256(BIG_BODY).hexdigest()
    assert [r["event"] for r in seen][:2] == ["negotiate", "connect"]


async def test_v2_session_gets_no_data_and_no_unknown(tmp_path: Path) -> None:
    """protocol_version=2 negotiates version 2: DATA and UNKNOWN (and their macros) are not sent."""
    with running_filter({}, tmp_path) as proc:
        upstream = await connect_upstream(endpoint_for(proc, protocol_version=2), POSTFIX_OFFER)
        negotiated = upstream.negotiated
        assert negotiated.version == 2
        assert not int(negotiated.actions) & ~0x3F
        assert await upstream.command(Macro(b"C"), CONNECT) == [Continue()]
        assert await upstream.command(Macro(b"U"), Unknown(b"XYZZY")) == []
        assert await upstream.command(Macro(b"H"), Helo(b"client.test")) == [Continue()]
        assert await upstream.command(None, Mail(b"<a@x.test>")) == [Continue()]
        assert await upstream.command(None, Rcpt(b"<b@y.test>")) == [Continue()]
        assert await upstream.command(Macro(b"T", ((b"i", b"QID"),)), Data()) == []
        assert await upstream.command(None, Header(b"Subject", b"v2")) == [Continue()]
        assert await upstream.command(None, EndOfHeaders()) == [Continue()]
        assert await upstream.command(None, EndOfMessage()) == [Continue()]
        await upstream.quit()
        proc.wait_for("close")
        (negotiate,) = proc.events("negotiate")
        events = [r["event"] for r in proc.events()]
    assert negotiate["offered"][0] == 0x3F  # SMFI_V2_ACTS only
    assert "data" not in events
    assert "unknown" not in events
    assert "eom" in events


async def test_macros_are_filtered_to_the_requested_names(tmp_path: Path) -> None:
    """A stage with a SETSYMLIST list gets only those names (braces or not); others get all."""
    script = {
        "macros": {"connect": "j {client_addr}", "mail": "{i}"},
        "macro_names": ["j", "{client_addr}", "{daemon_name}", "i", "{tls_version}"],
    }
    with running_filter(script, tmp_path) as proc:
        upstream = await connect_upstream(endpoint_for(proc), POSTFIX_OFFER)
        connect_macros = (
            (b"j", b"mx.test"),
            (b"{daemon_name}", b"smtpd"),
            (b"{client_addr}", b"192.0.2.10"),
        )
        assert await upstream.command(Macro(b"C", connect_macros), CONNECT) == [Continue()]
        helo_macros = ((b"{tls_version}", b"TLSv1.3"),)
        assert await upstream.command(Macro(b"H", helo_macros), Helo(b"c.test")) == [Continue()]
        mail_macros = ((b"i", b"QID1"), (b"{daemon_name}", b"at-mail"))
        assert await upstream.command(Macro(b"M", mail_macros), Mail(b"<a@x.test>")) == [Continue()]
        await upstream.quit()
        proc.wait_for("close")
        (connect,) = proc.events("connect")
        (helo,) = proc.events("helo")
        (mail,) = proc.events("mail")
    assert connect["macros"] == {"j": "mx.test", "{client_addr}": "192.0.2.10"}
    assert helo["macros"]["{tls_version}"] == "TLSv1.3"
    assert mail["macros"]["i"] == "QID1"
    assert "{daemon_name}" not in mail["macros"]


async def test_no_reply_header_is_not_waited_for(tmp_path: Path) -> None:
    """A header negotiated NR returns [] at once, even while the filter is still busy with it."""
    script = {"protocol": {"noreply": ["header"]}, "sleep_ms": {"header": 800}}
    with running_filter(script, tmp_path) as proc:
        upstream = await connect_upstream(endpoint_for(proc), POSTFIX_OFFER)
        assert upstream.negotiated.no_reply(Header)
        await envelope(upstream)
        assert await upstream.command(None, Data()) == [Continue()]
        with trio.fail_after(0.4):
            assert await upstream.command(Macro(b"L"), Header(b"A", b"1")) == []
            assert await upstream.command(Macro(b"L"), Header(b"B", b"2")) == []
        assert await upstream.command(Macro(b"N"), EndOfHeaders()) == [Continue()]
        assert await upstream.command(None, EndOfMessage()) == [Continue()]
        await upstream.quit()
        proc.wait_for("close")
        assert [r["name"] for r in proc.events("header")] == ["A", "B"]


async def test_disabled_step_gets_only_its_macros(tmp_path: Path) -> None:
    """A step disabled with SMFIP_NO* is not sent; its macro packet still is, as Postfix does."""
    script = {"protocol": {"disable": ["helo"]}, "macro_names": ["{tls_version}"]}
    with running_filter(script, tmp_path) as proc:
        upstream = await connect_upstream(endpoint_for(proc), POSTFIX_OFFER)
        assert not upstream.negotiated.sends(Helo)
        assert await upstream.command(None, CONNECT) == [Continue()]
        helo_macros = Macro(b"H", ((b"{tls_version}", b"TLSv1.3"),))
        assert await upstream.command(helo_macros, Helo(b"client.test")) == []
        assert await upstream.command(None, Mail(b"<a@x.test>")) == [Continue()]
        await upstream.quit()
        proc.wait_for("close")
        events = [r["event"] for r in proc.events()]
        (mail,) = proc.events("mail")
    assert "helo" not in events
    assert mail["macros"] == {"{tls_version}": "TLSv1.3"}


async def test_skip_ends_the_body_early(tmp_path: Path) -> None:
    """SKIP on the first chunk stops the split body; later body calls send nothing; EOM works."""
    script = {"replies": {"body": "skip", "eom": "continue"}}
    with running_filter(script, tmp_path) as proc:
        upstream = await connect_upstream(endpoint_for(proc), POSTFIX_OFFER)
        assert upstream.negotiated.skip
        await envelope(upstream)
        assert await upstream.command(None, EndOfHeaders()) == [Continue()]
        assert await upstream.body(None, BIG_BODY) == [Skip()]
        assert upstream.skipping_body
        assert await upstream.body(None, b"more\r\n") == []
        assert await upstream.command(None, EndOfMessage()) == [Continue()]
        await upstream.quit()
        proc.wait_for("close")
        assert len(proc.events("body")) == 1


async def test_unix_socket_and_abort_between_messages(tmp_path: Path) -> None:
    """The client works over a Unix socket; ABORT resets the message, a second one follows."""
    with FilterProcess({"replies": {"mail": "tempfail"}}, tmp_path, unix=True) as proc:
        upstream = await connect_upstream(endpoint_for(proc), POSTFIX_OFFER)
        assert await upstream.command(None, CONNECT) == [Continue()]
        assert await upstream.command(None, Mail(b"<a@x.test>")) == [Tempfail()]
        assert upstream.done_for_message
        await upstream.abort()
        assert await upstream.command(None, Mail(b"<a@x.test>")) == [Tempfail()]
        await upstream.quit()
        proc.wait_for("close")
        assert len(proc.events("mail")) == 2


async def test_flags_override_narrows_the_offer(tmp_path: Path) -> None:
    """flags_protocol without SKIP and flags_action = ADDHDRS are all the filter is offered."""
    script = {"protocol": {"enable": ["skip"]}}
    endpoint_kw = {
        "flags_protocol": int(ALL_PROTOCOL & ~Protocol.SKIP),
        "flags_action": int(Action.ADDHDRS),
    }
    with running_filter(script, tmp_path) as proc:
        upstream = await connect_upstream(endpoint_for(proc, **endpoint_kw), POSTFIX_OFFER)
        assert not upstream.negotiated.skip
        assert upstream.negotiated.actions == Action.ADDHDRS
        await upstream.quit()
        proc.wait_for("close")
        (negotiate,) = proc.events("negotiate")
    assert negotiate["offered"][0] == int(Action.ADDHDRS)
    assert not negotiate["offered"][1] & int(Protocol.SKIP)
