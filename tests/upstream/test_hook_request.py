"""The hook request document: every field from its source, nulls never left out, the body
streamed in escaped pieces that add up to valid JSON."""

from __future__ import annotations

import io
import tempfile
from collections.abc import Mapping
from typing import Any

import msgspec
import pytest

from milterbridge.upstream.hook_request import (
    READ_SIZE,
    HookInput,
    HookRequestBody,
    encode_request,
    message_size,
    parameters_of,
)

MACROS = {
    "auth_authen": "alice",
    "auth_type": "PLAIN",
    "tls_version": "TLSv1.3",
    "cipher": "TLS_AES_256_GCM_SHA384",
    "cipher_bits": "256",
    "cert_issuer": "CN=Client CA",
    "cert_subject": "CN=client.example",
    "j": "mx.example.net",
    "daemon_port": "25",
    "daemon_addr": "192.0.2.1",
    "daemon_name": "smtpd",
    "i": "4XyZ12AbC",
    "client_ptr": "ignored.example",
}
HEADERS = [(b"From", b"Alice <alice@example.org>"), (b"Subject", b"Hello, World!")]
BODY = b"Hello, World!\r\n"


def _decoded(request: HookInput) -> dict[str, Any]:
    document = msgspec.json.decode(encode_request(request))
    assert isinstance(document, dict)
    return document


def _full(stage: str = "data", **extra: Any) -> HookInput:
    values: dict[str, Any] = {
        "stage": stage,
        "macros": MACROS,
        "client_address": "198.51.100.7",
        "client_port": 40123,
        "client_hostname": "mail.example.org",
        "helo": "mail.example.org",
        "sender": (b"<alice@example.org>", [b"SIZE=1234", b"BODY=8BITMIME", b"SMTPUTF8"]),
        "recipients": [
            (b"<bob@example.net>", [b"ORCPT=rfc822;bob@example.net", b"NOTIFY=NEVER"]),
            (b"<carol@example.net>", []),
        ],
        "headers": HEADERS,
        "body": io.BytesIO(BODY),
        "body_size": len(BODY),
        "active_connections": 3,
    }
    values.update(extra)
    return HookInput(**values)


def test_every_field_at_the_data_stage() -> None:
    assert _decoded(_full()) == {
        "context": {
            "stage": "DATA",
            "sasl": {"login": "alice", "method": "PLAIN"},
            "client": {
                "ip": "198.51.100.7",
                "port": 40123,
                "ptr": "mail.example.org",
                "ehlo": "mail.example.org",
                "activeConnections": 3,
            },
            "tls": {
                "version": "TLSv1.3",
                "cipher": "TLS_AES_256_GCM_SHA384",
                "cipherBits": 256,
                "certIssuer": "CN=Client CA",
                "certSubject": "CN=client.example",
            },
            "server": {"name": "mx.example.net", "port": 25, "ip": "192.0.2.1"},
            "queue": {"id": "4XyZ12AbC"},
            "protocol": {"version": 1},
        },
        "envelope": {
            "from": {
                "address": "alice@example.org",
                "parameters": {"size": 1234, "body": "8BITMIME", "smtputf8": True},
            },
            "to": [
                {
                    "address": "bob@example.net",
                    "parameters": {"orcpt": "rfc822;bob@example.net", "notify": "NEVER"},
                },
                {"address": "carol@example.net", "parameters": None},
            ],
        },
        "message": {
            "headers": [["From", "Alice <alice@example.org>"], ["Subject", "Hello, World!"]],
            "serverHeaders": [],
            "size": message_size(HEADERS, len(BODY)),
            "contents": "Hello, World!\r\n",
        },
    }


def test_before_anything_is_known_every_key_is_there_as_null() -> None:
    assert _decoded(HookInput(stage="connect", macros={})) == {
        "context": {
            "stage": "CONNECT",
            "sasl": None,
            "client": {"ip": None, "port": None, "ptr": None, "ehlo": None, "activeConnections": 0},
            "tls": None,
            "server": {"name": None, "port": None, "ip": None},
            "queue": None,
            "protocol": {"version": 1},
        },
        "envelope": None,
        "message": None,
    }


@pytest.mark.parametrize(
    ("stage", "name"),
    [
        ("connect", "CONNECT"),
        ("ehlo", "EHLO"),
        ("auth", "AUTH"),
        ("mail", "MAIL"),
        ("rcpt", "RCPT"),
        ("data", "DATA"),
    ],
)
def test_stage_names(stage: str, name: str) -> None:
    assert _decoded(_full(stage))["context"]["stage"] == name


def test_message_is_only_sent_at_the_data_stage() -> None:
    for stage in ("connect", "ehlo", "auth", "mail", "rcpt"):
        document = _decoded(_full(stage))
        assert document["message"] is None
        assert document["envelope"]["from"]["address"] == "alice@example.org"


def test_the_rcpt_stage_lists_the_recipient_being_decided_last() -> None:
    recipients = [(b"<a@x>", []), (b"<b@x>", [b"NOTIFY=SUCCESS"])]
    document = _decoded(_full("rcpt", recipients=recipients))
    assert [r["address"] for r in document["envelope"]["to"]] == ["a@x", "b@x"]


def test_the_null_sender_is_an_empty_address() -> None:
    document = _decoded(_full("mail", sender=(b"<>", []), recipients=[]))
    assert document["envelope"] == {"from": {"address": "", "parameters": None}, "to": []}


@pytest.mark.parametrize(
    ("hostname", "macros", "ptr"),
    [
        ("mail.example.org", {"client_ptr": "other.example"}, "mail.example.org"),
        ("unknown", {}, None),
        ("unknown", {"client_ptr": "unverified.example"}, "unverified.example"),
        ("[192.0.2.9]", {}, None),
        ("[192.0.2.9]", {"client_ptr": "ptr.example"}, "ptr.example"),
        ("[IPv6:2001:db8::1]", {}, None),
        (None, {}, None),
    ],
)
def test_ptr(hostname: str | None, macros: Mapping[str, str], ptr: str | None) -> None:
    request = HookInput(stage="connect", macros=macros, client_hostname=hostname)
    assert _decoded(request)["context"]["client"]["ptr"] == ptr


def test_numbers_that_are_not_numbers_are_null() -> None:
    macros = {**MACROS, "cipher_bits": "lots", "daemon_port": ""}
    context = _decoded(_full(macros=macros))["context"]
    assert context["tls"]["cipherBits"] is None
    assert context["server"]["port"] is None


def test_sasl_and_tls_are_null_without_their_macros() -> None:
    macros = {k: v for k, v in MACROS.items() if k not in ("auth_authen", "tls_version")}
    context = _decoded(_full(macros=macros))["context"]
    assert context["sasl"] is None
    assert context["tls"] is None


def test_sasl_method_may_be_unknown() -> None:
    context = _decoded(_full(macros={"auth_authen": "bob"}))["context"]
    assert context["sasl"] == {"login": "bob", "method": None}


@pytest.mark.parametrize(
    ("args", "parameters"),
    [
        ([], None),
        ([b"SIZE=100"], {"size": 100}),
        ([b"size=100"], {"size": 100}),
        ([b"SIZE=big"], {"size": "big"}),
        ([b"SMTPUTF8"], {"smtputf8": True}),
        (
            [b"BODY=8BITMIME", b"RET=HDRS", b"ENVID=x+2By"],
            {"body": "8BITMIME", "ret": "HDRS", "envid": "x+2By"},
        ),
        ([b"ORCPT=rfc822;a=b@example"], {"orcpt": "rfc822;a=b@example"}),
        ([b"NOTIFY=NEVER", b"NOTIFY=SUCCESS"], {"notify": "SUCCESS"}),
        ([b"X-EMPTY="], {"x-empty": ""}),
    ],
)
def test_esmtp_parameters(args: list[bytes], parameters: dict[str, Any] | None) -> None:
    assert parameters_of(args) == parameters


def test_message_size_counts_the_reconstructed_message() -> None:
    headers = [(b"A", b"1"), (b"Subject", b"")]
    assert message_size(headers, 10) == len(b"A: 1\r\nSubject: \r\n\r\n") + 10
    assert _decoded(_full(headers=headers, body_size=10))["message"]["size"] == 29


def test_headers_and_addresses_with_invalid_utf8_get_replacement_characters() -> None:
    request = _full(headers=[(b"X-Bad", b"caf\xe9")], sender=(b"<\xff@x>", []))
    document = _decoded(request)
    assert document["message"]["headers"] == [["X-Bad", "caf\ufffd"]]
    assert document["envelope"]["from"]["address"] == "\ufffd@x"


def test_the_body_is_escaped() -> None:
    body = b'He said "hi"\\ \x00\x01\t\r\nline 2 \xe2\x82\xac \xf0\x9f\x93\xa7 \xff end'
    document = _decoded(_full(body=io.BytesIO(body), body_size=len(body)))
    assert document["message"]["contents"] == body.decode("utf-8", errors="replace")


def test_a_data_request_without_a_body_file_has_empty_contents() -> None:
    assert _decoded(_full(body=None, body_size=0))["message"]["contents"] == ""


def _large_body(size: int) -> bytes:
    """Multibyte characters across every read boundary, and an invalid byte here and there."""
    piece = "plain text, caf\u00e9, \u20ac, \U0001f4e7, \u65e5\u672c\r\n".encode()
    body = bytearray((piece * (size // len(piece) + 1))[:size])
    for boundary in range(READ_SIZE, size, READ_SIZE):
        body[boundary - 1 : boundary + 3] = "\U0001f4e7".encode()  # split 1+3 bytes
    body[size // 2] = 0xFF
    return bytes(body)


def test_a_large_body_streams_in_pieces_and_decodes_across_read_boundaries() -> None:
    body = _large_body(5 * 1024 * 1024)
    with tempfile.SpooledTemporaryFile(max_size=1024 * 1024) as spool:
        spool.write(body)
        request = _full(body=spool, body_size=len(body))
        chunks = list(HookRequestBody(request).chunks())
    assert len(chunks) >= len(body) // READ_SIZE
    assert max(len(c) for c in chunks) <= 2 * READ_SIZE
    document = msgspec.json.decode(b"".join(chunks))
    assert document["message"]["contents"] == body.decode("utf-8", errors="replace")
    assert document["message"]["size"] == message_size(HEADERS, len(body))


async def test_content_length_is_the_length_of_what_is_sent() -> None:
    body = _large_body(300_000)
    request = _full(body=io.BytesIO(body), body_size=len(body))
    streamed = [chunk async for chunk in HookRequestBody(request)]
    assert await HookRequestBody(request).content_length() == len(b"".join(streamed))
    assert b"".join(streamed) == encode_request(request)


def test_readers_sharing_the_spool_do_not_disturb_each_other_or_its_writer() -> None:
    body = _large_body(400_000)
    spool = io.BytesIO(body)
    spool.seek(0, io.SEEK_END)
    request = _full(body=spool, body_size=len(body))
    first, second = HookRequestBody(request).chunks(), HookRequestBody(request).chunks()
    one: list[bytes] = []
    two: list[bytes] = []
    for a, b in zip(first, second, strict=True):  # interleaved, as two parallel hook calls
        one.append(a)
        two.append(b)
    assert one == two
    assert b"".join(one) == encode_request(request)
    assert spool.tell() == len(body)  # the writer's position is where it left it


def test_the_document_is_reiterable() -> None:
    request = _full()
    body = HookRequestBody(request)
    assert b"".join(body.chunks()) == b"".join(body.chunks())
