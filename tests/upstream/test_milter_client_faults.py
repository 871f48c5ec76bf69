"""Fault injection for the upstream milter client: scripted fake upstreams on loopback sockets.

Each test runs in virtual time (``autojump_clock``: the clock jumps when every task is blocked,
which holds for loopback sockets in one process), makes one upstream misbehave in one way, and
checks the failure class, the stage it names, and that nothing is left: the client's socket is
closed (the fake upstream sees EOF, and the recorded socket has no file descriptor).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
import trustme

from milterbridge.milter import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    Accept,
    Action,
    AddHeader,
    Body,
    Connect,
    Continue,
    EndOfHeaders,
    EndOfMessage,
    Family,
    Header,
    Helo,
    LocalProtocolError,
    Mail,
    OptNeg,
    OptNegReply,
    Progress,
    Protocol,
    Rcpt,
    Skip,
)
from milterbridge.upstream import (
    FailureKind,
    UpstreamEndpoint,
    UpstreamFailure,
    UpstreamMilter,
    connect_upstream,
    open_socket,
)
from tests.fake_upstream import FakeUpstream, Peer, Script, fake_upstream

OFFER = OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL)
CONNECT = Connect(b"client.test", Family.INET, 40000, b"192.0.2.10")
TIMEOUT_CONNECT = 5.0
TIMEOUT_COMMAND = 7.0
TIMEOUT_DATA = 11.0


class RecordingOpener:
    """Opens real sockets and keeps them, so a test can check each one was closed."""

    def __init__(self) -> None:
        self.streams: list[trio.SocketStream] = []

    async def __call__(self, endpoint: UpstreamEndpoint) -> trio.abc.Stream:
        stream = await open_socket(endpoint)
        assert isinstance(stream, trio.SocketStream)
        self.streams.append(stream)
        return stream

    def all_closed(self) -> bool:
        return bool(self.streams) and all(s.socket.fileno() == -1 for s in self.streams)


def endpoint(port: int, **overrides: Any) -> UpstreamEndpoint:
    fields: dict[str, Any] = {
        "name": "fake",
        "hostname": "127.0.0.1",
        "port": port,
        "timeout_connect": TIMEOUT_CONNECT,
        "timeout_command": TIMEOUT_COMMAND,
        "timeout_data": TIMEOUT_DATA,
    }
    fields.update(overrides)
    return UpstreamEndpoint(**fields)


async def connect_failure(target: UpstreamEndpoint) -> tuple[UpstreamFailure, RecordingOpener]:
    opener = RecordingOpener()
    with pytest.raises(UpstreamFailure) as caught:
        await connect_upstream(target, OFFER, open_stream=opener)
    return caught.value, opener


@asynccontextmanager
async def connected(
    script: Script, **overrides: Any
) -> AsyncIterator[tuple[UpstreamMilter, FakeUpstream, RecordingOpener]]:
    """A client negotiated with a fake upstream running ``script`` (which must negotiate)."""
    async with fake_upstream(script) as fake:
        opener = RecordingOpener()
        upstream = await connect_upstream(
            endpoint(fake.port, **overrides), OFFER, open_stream=opener
        )
        async with upstream:
            yield upstream, fake, opener


async def assert_failed_and_closed(
    upstream: UpstreamMilter,
    fake: FakeUpstream,
    opener: RecordingOpener,
    failure: UpstreamFailure,
    kind: FailureKind,
    stage: str,
) -> None:
    assert failure.kind is kind, failure
    assert failure.stage == stage
    assert failure.filter_name == "fake"
    assert stage in str(failure) and "fake" in str(failure)
    assert upstream.closed
    assert opener.all_closed()
    await fake.wait_finished()
    assert fake.saw_eof
    with pytest.raises(trio.ClosedResourceError):
        await upstream.command(None, Helo(b"again"))


def frame(code: bytes, payload: bytes = b"") -> bytes:
    return (len(payload) + 1).to_bytes(4, "big") + code + payload


# --- connecting ------------------------------------------------------------------------------


async def test_refused_port(autojump_clock: trio.testing.MockClock) -> None:
    """A closed port is REFUSED, at once, with the OPTNEG stage named."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    failure, opener = await connect_failure(endpoint(port))
    assert failure.kind is FailureKind.REFUSED
    assert failure.stage == "optneg"
    assert f"127.0.0.1:{port}" in failure.cause
    assert trio.current_time() < 1
    assert opener.streams == []


async def test_refused_unix_socket(tmp_path: Any) -> None:
    """A Unix socket path nobody listens on is REFUSED."""
    with pytest.raises(UpstreamFailure) as caught:
        await connect_upstream(endpoint(0, unix_path=str(tmp_path / "none.sock")), OFFER)
    assert caught.value.kind is FailureKind.REFUSED


async def test_connect_timeout_when_optneg_is_never_answered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An upstream that accepts but never answers OPTNEG is a CONNECT_TIMEOUT after the budget."""

    async def script(peer: Peer) -> None:
        await peer.expect(OptNeg)

    async with fake_upstream(script) as fake:
        start = trio.current_time()
        failure, opener = await connect_failure(endpoint(fake.port))
        assert trio.current_time() - start == pytest.approx(TIMEOUT_CONNECT)
        assert failure.kind is FailureKind.CONNECT_TIMEOUT
        assert failure.stage == "optneg"
        assert opener.all_closed()
        await fake.wait_finished()
        assert fake.saw_eof


async def test_tls_to_a_plaintext_peer(autojump_clock: trio.testing.MockClock) -> None:
    """TLS towards a peer that answers in plain text fails as TLS, not as garbage or timeout."""

    async def script(peer: Peer) -> None:
        await peer.stream.receive_some(65536)  # the ClientHello
        await peer.raw(frame(b"O", b"\0" * 12) * 20)

    async with fake_upstream(script) as fake:
        failure, opener = await connect_failure(endpoint(fake.port, use_tls=True))
        assert failure.kind is FailureKind.TLS, failure
        assert failure.stage == "optneg"
        assert opener.all_closed()
        await fake.wait_finished()


@pytest.fixture
def self_signed() -> ssl.SSLContext:
    """A server context with a certificate for 127.0.0.1 from a CA nobody trusts."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


def tls_server(context: ssl.SSLContext) -> Callable[[trio.SocketStream], trio.abc.Stream]:
    return lambda stream: trio.SSLStream(stream, context, server_side=True)


async def negotiate_then_wait(peer: Peer) -> None:
    await peer.negotiate()


async def test_tls_self_signed_certificate_is_refused(
    autojump_clock: trio.testing.MockClock, self_signed: ssl.SSLContext
) -> None:
    """With verification on, a certificate from an unknown CA is a TLS failure."""
    async with fake_upstream(negotiate_then_wait, wrap=tls_server(self_signed)) as fake:
        failure, opener = await connect_failure(endpoint(fake.port, use_tls=True))
        assert failure.kind is FailureKind.TLS, failure
        assert "certificate" in failure.cause
        assert opener.all_closed()
        await fake.wait_finished()


async def test_tls_allow_invalid_certs_accepts_it(
    autojump_clock: trio.testing.MockClock, self_signed: ssl.SSLContext
) -> None:
    """allow_invalid_certs=True accepts the same peer and negotiates over TLS."""
    async with fake_upstream(negotiate_then_wait, wrap=tls_server(self_signed)) as fake:
        target = endpoint(fake.port, use_tls=True, allow_invalid_certs=True)
        upstream = await connect_upstream(target, OFFER)
        assert isinstance(upstream.milter.stream, trio.SSLStream)
        assert upstream.negotiated.version == 6
        await upstream.quit()
        await fake.wait_finished()
        assert fake.saw_eof


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (OptNegReply(7, Action.NONE, Protocol.NONE), "version 7"),
        (OptNegReply(6, Action.ADDHDRS | Action.CHGBODY, Protocol.NONE), "actions 0x2"),
    ],
)
async def test_negotiation_outside_the_offer(
    autojump_clock: trio.testing.MockClock, answer: OptNegReply, words: str
) -> None:
    """A version above the offer, or an action not offered (CHGBODY here), is NEGOTIATION."""

    async def script(peer: Peer) -> None:
        await peer.expect(OptNeg)
        await peer.raw(answer.frame())

    async with fake_upstream(script) as fake:
        target = endpoint(fake.port, flags_action=int(Action.ADDHDRS))
        failure, opener = await connect_failure(target)
        assert failure.kind is FailureKind.NEGOTIATION, failure
        assert failure.stage == "optneg"
        assert words in failure.cause
        assert opener.all_closed()
        await fake.wait_finished()
        assert fake.saw_eof


async def test_closed_instead_of_answering_optneg(autojump_clock: trio.testing.MockClock) -> None:
    """An upstream that closes instead of answering OPTNEG is CLOSED."""

    async def script(peer: Peer) -> None:
        await peer.expect(OptNeg)
        await peer.stream.aclose()

    async with fake_upstream(script) as fake:
        failure, opener = await connect_failure(endpoint(fake.port))
        assert failure.kind is FailureKind.CLOSED, failure
        assert opener.all_closed()


# --- commands --------------------------------------------------------------------------------


async def test_command_timeout(autojump_clock: trio.testing.MockClock) -> None:
    """An upstream that answers OPTNEG, then hangs on CONNECT, is a COMMAND_TIMEOUT at connect."""

    async def script(peer: Peer) -> None:
        await peer.negotiate()
        await peer.expect(Connect)

    async with connected(script) as (upstream, fake, opener):
        start = trio.current_time()
        with pytest.raises(UpstreamFailure) as caught:
            await upstream.command(None, CONNECT)
        assert trio.current_time() - start == pytest.approx(TIMEOUT_COMMAND)
        await assert_failed_and_closed(
            upstream, fake, opener, caught.value, FailureKind.COMMAND_TIMEOUT, "connect"
        )


async def full_message_until_eom(peer: Peer) -> None:
    await peer.negotiate()
    for kind in (Connect, Helo, Mail, Rcpt, Header, EndOfHeaders, Body):
        await peer.expect(kind)
        await peer.reply(Continue())
    await peer.expect(EndOfMessage)


async def send_message_until_eom(upstream: UpstreamMilter) -> None:
    assert await upstream.command(None, CONNECT) == [Continue()]
    assert await upstream.command(None, Helo(b"client.test")) == [Continue()]
    assert await upstream.command(None, Mail(b"<a@x.test>")) == [Continue()]
    assert await upstream.command(None, Rcpt(b"<b@y.test>")) == [Continue()]
    assert await upstream.command(None, Header(b"Subject", b"x")) == [Continue()]
    assert await upstream.command(None, EndOfHeaders()) == [Continue()]
    assert await upstream.body(None, b"body\r\n") == [Continue()]


async def test_data_timeout_at_end_of_message(autojump_clock: trio.testing.MockClock) -> None:
    """An upstream that hangs at end-of-message is a DATA_TIMEOUT after timeout_data."""
    async with connected(full_message_until_eom) as (upstream, fake, opener):
        await send_message_until_eom(upstream)
        start = trio.current_time()
        with pytest.raises(UpstreamFailure) as caught:
            await upstream.command(None, EndOfMessage())
        assert trio.current_time() - start == pytest.approx(TIMEOUT_DATA)
        await assert_failed_and_closed(
            upstream, fake, opener, caught.value, FailureKind.DATA_TIMEOUT, "eom"
        )


async def test_progress_gives_a_fresh_timeout(autojump_clock: trio.testing.MockClock) -> None:
    """Each PROGRESS restarts the step's timeout: answers after 2.5 timeouts still count."""

    async def script(peer: Peer) -> None:
        await full_message_until_eom(peer)
        for _ in range(2):
            await trio.sleep(TIMEOUT_DATA - 1)
            await peer.reply(Progress())
        await trio.sleep(TIMEOUT_DATA / 2)
        await peer.reply(AddHeader(b"X-Late", b"yes"), Accept())

    async with connected(script) as (upstream, _fake, _opener):
        await send_message_until_eom(upstream)
        start = trio.current_time()
        assert await upstream.command(None, EndOfMessage()) == [
            Progress(),
            Progress(),
            AddHeader(b"X-Late", b"yes"),
            Accept(),
        ]
        assert trio.current_time() - start == pytest.approx(2 * (TIMEOUT_DATA - 1) + 5.5)


async def test_progress_then_silence_times_out_a_timeout_after_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After the last PROGRESS the upstream has one full timeout, then DATA_TIMEOUT."""

    async def script(peer: Peer) -> None:
        await full_message_until_eom(peer)
        await trio.sleep(3)
        await peer.reply(Progress())

    async with connected(script) as (upstream, fake, opener):
        await send_message_until_eom(upstream)
        start = trio.current_time()
        with pytest.raises(UpstreamFailure) as caught:
            await upstream.command(None, EndOfMessage())
        assert trio.current_time() - start == pytest.approx(3 + TIMEOUT_DATA)
        await assert_failed_and_closed(
            upstream, fake, opener, caught.value, FailureKind.DATA_TIMEOUT, "eom"
        )


async def test_closed_in_the_middle_of_a_packet(autojump_clock: trio.testing.MockClock) -> None:
    """Three bytes of a length word, then a close: CLOSED at that stage."""

    async def script(peer: Peer) -> None:
        await peer.negotiate()
        await peer.expect(Connect)
        await peer.raw(b"\0\0\0")
        await peer.stream.aclose()

    async with connected(script) as (upstream, fake, opener):
        with pytest.raises(UpstreamFailure) as caught:
            await upstream.command(None, CONNECT)
        assert "middle of a packet" in caught.value.cause
        await assert_failed_and_closed(
            upstream, fake, opener, caught.value, FailureKind.CLOSED, "connect"
        )


async def test_closed_without_answering(autojump_clock: trio.testing.MockClock) -> None:
    """A close while a reply is owed is CLOSED, at once (not a timeout)."""

    async def script(peer: Peer) -> None:
        await peer.negotiate()
        await peer.expect(Connect)
        await peer.reply(Continue())
        await peer.expect(Helo)
        await peer.stream.aclose()

    async with connected(script) as (upstream, fake, opener):
        assert await upstream.command(None, CONNECT) == [Continue()]
        with pytest.raises(UpstreamFailure) as caught:
            await upstream.command(None, Helo(b"client.test"))
        assert trio.current_time() < 1
        await assert_failed_and_closed(
            upstream, fake, opener, caught.value, FailureKind.CLOSED, "helo"
        )


async def test_closed_between_commands(autojump_clock: trio.testing.MockClock) -> None:
    """An upstream that closed after its last answer fails the next command before it is sent."""

    async def script(peer: Peer) -> None:
        await peer.negotiate()
        await peer.expect(Connect)
        await peer.reply(Continue())
        await peer.stream.aclose()

    async with connected(script) as (upstream, fake, opener):
        assert await upstream.command(None, CONNECT) == [Continue()]
        await fake.wait_finished()
        with pytest.raises(UpstreamFailure) as caught:
            await upstream.command(None, Helo(b"client.test"))
        assert "between commands" in caught.value.cause
        await assert_failed_and_closed(
            upstream, fake, opener, caught.value, FailureKind.CLOSED, "helo"
        )


async def test_unknown_reply_letter_is_garbage(autojump_clock: trio.testing.MockClock) -> None:
    """A reply with an unknown letter is GARBAGE."""

    async def script(peer: Peer) -> None:
        await peer.negotiate()
        await peer.expect(Connect)
        await peer.raw(frame(b"Z"))

    async with connected(script) as (upstream, fake, opener):
        with pytest.raises(UpstreamFailure) as caught:
            await upstream.command(None, CONNECT)
        await assert_failed_and_closed(
            upstream, fake, opener, caught.value, FailureKind.GARBAGE, "connect"
        )


async def test_length_word_over_the_limit_is_oversize(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A length word over max_response_size fails at once, before any payload arrives."""

    async def script(peer: Peer) -> None:
        await peer.negotiate()
        await peer.expect(Connect)
        await peer.raw((5000).to_bytes(4, "big") + b"h")

    async with connected(script, max_response_size=1000) as (upstream, fake, opener):
        with pytest.raises(UpstreamFailure) as caught:
            await upstream.command(None, CONNECT)
        assert trio.current_time() < 1
        await assert_failed_and_closed(
            upstream, fake, opener, caught.value, FailureKind.OVERSIZE, "connect"
        )


async def test_edit_in_reply_to_a_header_is_protocol(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """ADDHEADER in reply to HEADER (edits are for end-of-message only) is PROTOCOL."""

    async def script(peer: Peer) -> None:
        await peer.negotiate()
        for kind in (Connect, Mail, Rcpt):
            await peer.expect(kind)
            await peer.reply(Continue())
        await peer.expect(Header)
        await peer.raw(AddHeader(b"X-Early", b"1").frame())

    async with connected(script) as (upstream, fake, opener):
        await upstream.command(None, CONNECT)
        await upstream.command(None, Mail(b"<a@x.test>"))
        await upstream.command(None, Rcpt(b"<b@y.test>"))
        with pytest.raises(UpstreamFailure) as caught:
            await upstream.command(None, Header(b"Subject", b"x"))
        await assert_failed_and_closed(
            upstream, fake, opener, caught.value, FailureKind.PROTOCOL, "header"
        )


async def test_skip_not_negotiated_is_protocol(autojump_clock: trio.testing.MockClock) -> None:
    """SKIP from an upstream that did not negotiate SMFIP_SKIP is PROTOCOL."""

    async def script(peer: Peer) -> None:
        await peer.negotiate()
        for kind in (Connect, Mail, Rcpt, EndOfHeaders):
            await peer.expect(kind)
            await peer.reply(Continue())
        await peer.expect(Body)
        await peer.raw(Skip().frame())

    async with connected(script) as (upstream, fake, opener):
        assert not upstream.negotiated.skip
        for command in (CONNECT, Mail(b"<a@x.test>"), Rcpt(b"<b@y.test>"), EndOfHeaders()):
            await upstream.command(None, command)
        with pytest.raises(UpstreamFailure) as caught:
            await upstream.body(None, b"x")
        await assert_failed_and_closed(
            upstream, fake, opener, caught.value, FailureKind.PROTOCOL, "body"
        )


async def no_reply_headers_until(peer: Peer) -> None:
    await peer.negotiate(Protocol.NR_HDR)
    for kind in (Connect, Mail, Rcpt):
        await peer.expect(kind)
        await peer.reply(Continue())
    await peer.expect(Header)


async def send_until_header(upstream: UpstreamMilter) -> None:
    assert upstream.negotiated.no_reply(Header)
    for command in (CONNECT, Mail(b"<a@x.test>"), Rcpt(b"<b@y.test>")):
        assert await upstream.command(None, command) == [Continue()]
    assert await upstream.command(None, Header(b"Subject", b"x")) == []


async def test_reply_to_a_no_reply_step_before_the_next_command(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A CONTINUE to a header negotiated NR is PROTOCOL before the next command goes out."""
    stray_sent = trio.Event()

    async def script(peer: Peer) -> None:
        await no_reply_headers_until(peer)
        await peer.raw(Continue().frame())
        stray_sent.set()

    async with connected(script) as (upstream, fake, opener):
        await send_until_header(upstream)
        await stray_sent.wait()
        with pytest.raises(UpstreamFailure) as caught:
            await upstream.command(None, EndOfHeaders())
        assert "Continue" in caught.value.cause
        await assert_failed_and_closed(
            upstream, fake, opener, caught.value, FailureKind.PROTOCOL, "eoh"
        )


async def test_reply_to_a_no_reply_step_read_with_the_next_reply(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A stray reply that arrives with the next answer is caught at the next command boundary."""

    async def script(peer: Peer) -> None:
        await no_reply_headers_until(peer)
        await peer.expect(EndOfHeaders)
        await peer.raw(Continue().frame() + Continue().frame())

    async with connected(script) as (upstream, fake, opener):
        await send_until_header(upstream)
        assert await upstream.command(None, EndOfHeaders()) == [Continue()]
        with pytest.raises(UpstreamFailure) as caught:
            await upstream.body(None, b"x")
        await assert_failed_and_closed(
            upstream, fake, opener, caught.value, FailureKind.PROTOCOL, "body"
        )


# --- what is not the upstream's fault ----------------------------------------------------------


async def test_cancellation_propagates_and_closes(autojump_clock: trio.testing.MockClock) -> None:
    """A caller's cancel scope wins over the step timeout; the half-done client is closed."""

    async def script(peer: Peer) -> None:
        await peer.negotiate()
        await peer.expect(Connect)

    async with connected(script) as (upstream, fake, opener):
        with trio.move_on_after(1) as scope:
            await upstream.command(None, CONNECT)
        assert scope.cancelled_caught
        assert upstream.closed
        assert opener.all_closed()
        await fake.wait_finished()
        assert fake.saw_eof


async def test_illegal_command_is_our_bug(autojump_clock: trio.testing.MockClock) -> None:
    """A command the upstream's state forbids (RCPT after it accepted the message) raises
    LocalProtocolError as is, and the client is closed."""

    async def script(peer: Peer) -> None:
        await peer.negotiate()
        await peer.expect(Connect)
        await peer.reply(Continue())
        await peer.expect(Mail)
        await peer.reply(Accept())

    async with connected(script) as (upstream, _fake, opener):
        await upstream.command(None, CONNECT)
        assert await upstream.command(None, Mail(b"<a@x.test>")) == [Accept()]
        assert upstream.done_for_message
        with pytest.raises(LocalProtocolError):
            await upstream.command(None, Rcpt(b"<b@y.test>"))
        assert upstream.closed
        assert opener.all_closed()


async def test_quit_is_best_effort_and_aclose_idempotent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """quit() after the upstream vanished does not raise; aclose() may be repeated."""

    async def script(peer: Peer) -> None:
        await peer.negotiate()
        await peer.stream.aclose()

    async with connected(script) as (upstream, fake, opener):
        await fake.wait_finished()
        await upstream.quit()
        assert upstream.closed
        await upstream.quit()
        await upstream.aclose()
        assert opener.all_closed()
