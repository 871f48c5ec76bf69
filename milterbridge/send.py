"""``milterbridge send``: play the MTA against any milter and show what a message becomes.

It connects to the bridge or to any filter directly, offers what Postfix offers (protocol 6, all
actions, all protocol bits), walks one message through every step the filter asked for, prints
each step's answer and each edit, applies the edits with Postfix's semantics (engine/apply.py)
and prints the result as a unified diff against the input. The exit status is the verdict.
"""

from __future__ import annotations

import difflib
import enum
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

import trio

from .engine.apply import MessageState, apply_postfix
from .listeners import InetSpec, parse_listener
from .milter import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    CHUNK_SIZE,
    CLOSED,
    Abort,
    Accept,
    AddHeader,
    AddRcpt,
    AddRcptPar,
    Body,
    ChangeFrom,
    ChangeHeader,
    Command,
    Connect,
    Connection,
    Data,
    DelRcpt,
    Discard,
    EndOfHeaders,
    EndOfMessage,
    Family,
    Header,
    Helo,
    InsertHeader,
    Macro,
    Mail,
    OptNeg,
    Progress,
    ProtocolError,
    Quarantine,
    Quit,
    Rcpt,
    Reject,
    ReplaceBody,
    Reply,
    ReplyCode,
    Role,
    Shutdown,
    Skip,
    Tempfail,
    client_text,
)
from .transport import MilterStream

POSTFIX_OFFER = OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL)


class Verdict(enum.IntEnum):
    """The outcome, also the exit status of ``milterbridge send``."""

    ACCEPTED = 0
    TEMPFAILED = 3
    REJECTED = 4
    DISCARDED = 5
    HELD = 6  # accepted, but quarantined


@dataclass
class Envelope:
    """What the SMTP client would have said."""

    sender: bytes
    recipients: list[bytes]
    helo: bytes = b"client.test"
    client_ip: str = "127.0.0.1"
    client_name: bytes = b"client.test"
    macros: list[tuple[bytes, bytes]] = field(default_factory=list)


def parse_message(raw: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Split a message into milter headers (folded lines joined by LF, one leading space removed,
    as Postfix sends them) and a CRLF body."""
    text = raw.replace(b"\r\n", b"\n")
    head, sep, body = text.partition(b"\n\n")
    if not sep and b":" not in head.split(b"\n", 1)[0]:
        head, body = b"", text
    headers: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\n") if head else []:
        if line[:1] in (b" ", b"\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + b"\n" + line)
            continue
        name, _, value = line.partition(b":")
        headers.append((name.rstrip(), value[1:] if value.startswith(b" ") else value))
    return headers, body.replace(b"\n", b"\r\n")


def _angle(address: bytes) -> bytes:
    return address if address.startswith(b"<") else b"<" + address + b">"


def _text(data: bytes) -> str:
    return data.decode(errors="replace")


def _describe(reply: Reply) -> str:
    match reply:
        case ReplyCode(text=text):
            return "reply " + _text(client_text(text)).replace("\r\n", " / ")
        case AddHeader(name=n, value=v):
            return f"addheader {_text(n)}: {_text(v)}"
        case InsertHeader(index=i, name=n, value=v):
            return f"insheader #{i} {_text(n)}: {_text(v)}"
        case ChangeHeader(index=i, name=n, value=v):
            return f"chgheader {_text(n)}[{i}]: {_text(v)}" if v else f"delheader {_text(n)}[{i}]"
        case ChangeFrom(address=a, args=args):
            return f"chgfrom {_text(a)} {_text(args or b'')}".rstrip()
        case AddRcpt(address=a) | AddRcptPar(address=a):
            return f"addrcpt {_text(a)}"
        case DelRcpt(address=a):
            return f"delrcpt {_text(a)}"
        case ReplaceBody(chunk=chunk):
            return f"replbody {len(chunk)} bytes"
        case Quarantine(reason=r):
            return f"quarantine {_text(r)}"
    return type(reply).__name__.lower()


_FINAL_VERDICT: dict[type[Reply], Verdict] = {
    Reject: Verdict.REJECTED,
    Tempfail: Verdict.TEMPFAILED,
    Discard: Verdict.DISCARDED,
    Shutdown: Verdict.TEMPFAILED,
}


def _verdict_of(reply: Reply) -> Verdict | None:
    """The message's fate if this final reply decides it, None when the message goes on."""
    if isinstance(reply, ReplyCode):
        return Verdict.REJECTED if reply.text.startswith(b"5") else Verdict.TEMPFAILED
    return _FINAL_VERDICT.get(type(reply))


class SendSession:
    """One message walked through one milter, printing as it goes."""

    def __init__(self, milter: MilterStream, out: TextIO, timeout: float) -> None:
        self.milter = milter
        self.out = out
        self.timeout = timeout
        self.edits: list[Reply] = []
        self.recipients: list[bytes] = []  # those the milter did not refuse

    async def step(self, label: str, *packets: Command) -> Reply | None:
        """Send a step (if the filter wants it) and return its final reply (None: not awaited)."""
        negotiated = self.milter.connection.negotiated
        assert negotiated is not None
        command = packets[-1]
        if not negotiated.sends(type(command)):
            return None
        await self.milter.send(*packets)
        final: Reply | None = None
        with trio.fail_after(self.timeout):
            while self.milter.connection.awaiting is not None:
                event = await self.milter.receive()
                if event is CLOSED:
                    raise ConnectionError(f"the milter closed the connection at {label}")
                assert isinstance(event, Reply)
                if isinstance(event, Progress):
                    continue
                if self.milter.connection.awaiting is not None:
                    self.edits.append(event)
                    print(f"  edit      {_describe(event)}", file=self.out)
                else:
                    final = event
        print(f"{label:<10}{_describe(final) if final else 'no reply (NR)'}", file=self.out)
        return final


async def run_send(
    spec: str, envelope: Envelope, raw: bytes, out: TextIO, step_seconds: float = 30.0
) -> Verdict:
    """Walk ``raw`` through the milter at ``spec``; print the steps and the diff.

    ``step_seconds`` bounds the connection and each step's wait for its reply.
    """
    headers, body = parse_message(raw)
    with trio.fail_after(step_seconds):
        milter = await _open(spec)
    try:
        session = SendSession(milter, out, step_seconds)
        verdict = await _walk(session, envelope, headers, body)
        if milter.connection.negotiated is not None:
            await milter.send(Quit())
    finally:
        await milter.aclose()
    if verdict in (Verdict.ACCEPTED, Verdict.HELD):
        _print_result(out, envelope.sender, session.recipients, headers, body, session.edits)
    print(f"verdict   {verdict.name.lower()}", file=out)
    return verdict


async def _open(spec: str) -> MilterStream:
    parsed = parse_listener(spec)
    if isinstance(parsed, InetSpec):
        stream: trio.abc.Stream = await trio.open_tcp_stream(parsed.host, parsed.port)
    else:
        stream = await trio.open_unix_socket(parsed.path)
    return MilterStream(stream, Connection(Role.MTA))


async def _walk(
    session: SendSession, envelope: Envelope, headers: list[tuple[bytes, bytes]], body: bytes
) -> Verdict:
    milter = session.milter
    await milter.send(POSTFIX_OFFER)
    with trio.fail_after(session.timeout):
        await milter.receive()
    family = Family.INET6 if ":" in envelope.client_ip else Family.INET
    connect_macros = ((b"j", b"milterbridge-send"), (b"{daemon_name}", b"send"), *envelope.macros)
    steps: list[tuple[str, tuple[Command, ...]]] = [
        (
            "connect",
            (
                Macro(b"C", connect_macros),
                Connect(envelope.client_name, family, 25, envelope.client_ip.encode()),
            ),
        ),
        ("helo", (Macro(b"H"), Helo(envelope.helo))),
        ("mail", (Macro(b"M", ((b"i", b"SEND0001"),)), Mail(_angle(envelope.sender)))),
    ]
    for label, packets in steps:
        reply = await session.step(label, *packets)
        if reply is not None and (verdict := _verdict_of(reply)) is not None:
            return verdict
        if isinstance(reply, Accept):
            return Verdict.ACCEPTED
    return await _recipients_and_content(session, envelope, headers, body)


async def _recipients_and_content(
    session: SendSession, envelope: Envelope, headers: list[tuple[bytes, bytes]], body: bytes
) -> Verdict:
    for rcpt in envelope.recipients:
        reply = await session.step("rcpt", Macro(b"R"), Rcpt(_angle(rcpt)))
        if isinstance(reply, Discard):
            return Verdict.DISCARDED
        if reply is None or _verdict_of(reply) is None:
            session.recipients.append(_angle(rcpt))
        if isinstance(reply, Accept):
            return Verdict.ACCEPTED
    if not session.recipients:
        return Verdict.REJECTED
    content: list[tuple[str, tuple[Command, ...]]] = [("data", (Macro(b"T"), Data()))]
    content += [("header", (Macro(b"L"), Header(n, v))) for n, v in headers]
    content.append(("eoh", (Macro(b"N"), EndOfHeaders())))
    skipping = False
    for pos in range(0, len(body), CHUNK_SIZE):
        content.append(("body", (Macro(b"B"), Body(body[pos : pos + CHUNK_SIZE]))))
    for label, packets in content:
        if skipping and label == "body":
            continue
        reply = await session.step(label, *packets)
        if reply is not None and (verdict := _verdict_of(reply)) is not None:
            return verdict
        if isinstance(reply, Accept):
            return Verdict.ACCEPTED
        skipping = skipping or isinstance(reply, Skip)
    final = await session.step("eom", Macro(b"E"), EndOfMessage())
    assert final is not None
    await session.milter.send(Abort())
    verdict = _verdict_of(final)
    if verdict is not None:
        return verdict
    held = any(isinstance(edit, Quarantine) for edit in session.edits)
    return Verdict.HELD if held else Verdict.ACCEPTED


def _render(state: MessageState) -> list[str]:
    lines = [f"MAIL FROM:{_text(state.sender)}\n"]
    lines += [f"RCPT TO:{_text(r)}\n" for r in state.recipients]
    lines.append("\n")
    for name, value in state.visible_headers():
        text = f"{_text(name)}: {_text(value)}"
        lines += [line + "\n" for line in text.split("\n")]
    lines.append("\n")
    lines += [line + "\n" for line in _text(state.body).split("\r\n")[:-1]]
    return lines


def _print_result(
    out: TextIO,
    sender: bytes,
    recipients: Sequence[bytes],
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    edits: Sequence[Reply],
) -> None:
    before = MessageState.received(headers, body, _angle(sender), recipients)
    after = apply_postfix(before, edits)
    diff = list(difflib.unified_diff(_render(before), _render(after), "before", "after"))
    if after.quarantine:
        print(f"held      {_text(b'; '.join(after.quarantine))}", file=out)
    out.writelines(diff if diff else ["(message unchanged)\n"])


def send_main(
    spec: str, envelope: Envelope, raw: bytes, timeout: float, out: TextIO = sys.stdout
) -> int:
    """Run ``send`` and return its exit status (1 when the milter could not be talked to)."""
    try:
        return int(trio.run(run_send, spec, envelope, raw, out, timeout))
    except (OSError, socket.gaierror, ConnectionError, trio.TooSlowError) as exc:
        print(f"milterbridge send: {spec}: {exc or type(exc).__name__}", file=sys.stderr)
    except ProtocolError as exc:
        print(f"milterbridge send: {spec}: protocol error: {exc}", file=sys.stderr)
    return 1
