"""The fault matrix of an HTTP hook: every way a call fails, under both error policies.

One row per fault (README "When something breaks", design §7). Each cell runs one session with
one hook, ``policy``, listed at ``rcpt`` and ``data``, served by a real HTTP server in this
process (hypercorn, tests/fixtures/hook_server.py) and called by the bridge's real client
(upstream/hook_client.py). At RCPT the hook answers well and asks for a header to be added; the
row's fault comes at the row's stage. The body goes to the spool (memory limit 1 byte). Time is
virtual (autojump_clock): the hook's ``timeout`` is 5 s, its ``maxResponseSize`` 4 KiB.

Every cell asserts the reply the MTA gets (tempFailOnError true: TEMPFAIL at the failing stage;
false: the message goes on without the hook, and the header it asked for at RCPT is *not* added),
the one ``filter_error`` line and its fields, the metrics that must move and by how much, and
that nothing is left behind (tests/faults/leaks.py).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from milterbridge.config import HookFilter
from milterbridge.durations import Duration, Size
from milterbridge.milter import AddHeader, Continue, Progress, Reply, Tempfail
from milterbridge.server.session import MtaSession
from milterbridge.upstream import HookClient
from tests.fixtures.hook_server import Answer, HookServer, Recorded, hook_server

from .harness import (
    SESSION_ID,
    Answered,
    Delta,
    Line,
    MetricWatch,
    Mta,
    errors,
    failed_request,
    protocol_errors,
    up,
)
from .leaks import LeakCheck, connections_to

HOOK = "policy"
TIMEOUT = 5.0
MAX_RESPONSE = 4096
#: What the hook asks for at RCPT: a header the MTA must get only if the hook never fails.
EDIT = {"type": "addHeader", "name": "X-Policy", "value": "checked"}
ADDED = AddHeader(b"X-Policy", b"checked")
#: Where each hook stage is answered to the MTA (the data call happens at end-of-message).
MTA_STAGE = {"rcpt": "rcpt", "data": "eom"}


@dataclass(frozen=True)
class Cell:
    """One fault of the hook and what it must lead to.

    ``fault`` builds the failing answer for the running server; ``fail_at`` is the hook stage
    that gets it; ``changes`` the metric series that must move; ``up`` what
    ``filter_up{filter="policy"}`` reads afterwards (None: never set).
    """

    fault: Callable[[HookServer], Answer] | None
    fail_at: str
    kind: str
    changes: tuple[Delta, ...]
    up: float | None
    cause: str = ""
    #: The hook's TLS certificate: "unknown_ca" (not in the system store) or "wrong_name".
    certificate: str | None = None
    #: PROGRESS packets the MTA gets while the bridge waits for the hook.
    progress: int = 0
    #: Connections to the hook server still open when the session has ended: the client keeps
    #: one alive after an answer it read to the end; one it stopped reading (a refused status,
    #: an oversize body), timed out or never began (TLS) is closed.
    kept_alive: int = 1


def _status(status: int, **extra: Any) -> Callable[[HookServer], Answer]:
    return lambda server: Answer(status=status, **extra)


def _redirect_to_itself(server: HookServer) -> Answer:
    return Answer(status=302, headers=[("location", server.url)])


def _body(body: bytes) -> Callable[[HookServer], Answer]:
    return lambda server: Answer(body=body)


def _json(document: Any) -> Callable[[HookServer], Answer]:
    return lambda server: Answer(json=document)


def _slow(server: HookServer) -> Answer:
    return Answer(delay=10 * TIMEOUT)


def _oversize(server: HookServer) -> Answer:
    return Answer.oversize(256 * 1024)


def _data_failure(kind: str, *more: Delta) -> tuple[Delta, ...]:
    return (errors(HOOK, kind), failed_request(HOOK, "eom"), *more)


CELLS: dict[str, Cell] = {
    "http_5xx": Cell(
        _status(503),
        "data",
        "http_status",
        _data_failure("http_status"),
        up=1,
        cause="HTTP 503",
        kept_alive=0,
    ),
    "redirect_to_itself": Cell(
        _redirect_to_itself,
        "data",
        "http_status",
        _data_failure("http_status"),
        up=1,
        cause="redirects are not followed",
        kept_alive=0,
    ),
    "times_out_at_data": Cell(
        _slow,
        "data",
        "data_timeout",
        _data_failure("data_timeout"),
        up=1,
        progress=1,  # PROGRESS every 3 s keeps the MTA waiting for the 5 s timeout
        kept_alive=0,
    ),
    "times_out_at_rcpt": Cell(
        _slow,
        "rcpt",
        "command_timeout",
        (errors(HOOK, "command_timeout"), failed_request(HOOK, "rcpt")),
        up=None,
        kept_alive=0,
    ),
    "invalid_json": Cell(
        _body(b"{not json"), "data", "invalid_response", _data_failure("invalid_response"), up=1
    ),
    "an_answer_it_cannot_mean": Cell(
        _json({"action": "maybe"}),
        "data",
        "invalid_response",
        _data_failure("invalid_response"),
        up=1,
        cause="$.action",
    ),
    "oversize_body": Cell(
        _oversize,
        "data",
        "oversize",
        # An oversize answer counts as a protocol error of the filter, as a milter's does.
        _data_failure("oversize", protocol_errors("filter")),
        up=1,
        cause=f"over the {MAX_RESPONSE}-byte limit",
        kept_alive=0,
    ),
    "tls_unknown_ca": Cell(
        None,
        "rcpt",
        "tls",
        (errors(HOOK, "tls"), failed_request(HOOK, "rcpt")),
        up=0,
        cause="certificate verify failed",
        certificate="unknown_ca",
        kept_alive=0,
    ),
    "tls_wrong_name": Cell(
        None,
        "rcpt",
        "tls",
        (errors(HOOK, "tls"), failed_request(HOOK, "rcpt")),
        up=0,
        cause="mismatch",
        certificate="wrong_name",
        kept_alive=0,
    ),
}


# --- the hook server and client -----------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@asynccontextmanager
async def hook_peer(cell: Cell, ca: trustme.CA) -> AsyncIterator[tuple[HookServer, HookClient]]:
    """The running hook server, scripted for ``cell``, and the bridge's client for it."""
    cert: trustme.LeafCert | None = None
    context: ssl.SSLContext | None = None
    if cell.certificate == "unknown_ca":
        cert = ca.issue_cert("127.0.0.1")  # the client keeps the system store
    elif cell.certificate == "wrong_name":
        cert, context = ca.issue_cert("other.test"), trusting(ca)
    async with hook_server(cert) as server, HookClient(ssl_context=context) as client:
        server.responder = responder(cell, server)
        yield server, client


def responder(cell: Cell, server: HookServer) -> Callable[[Recorded], Answer]:
    def answer(request: Recorded) -> Answer:
        stage = request.json["context"]["stage"].lower()
        if stage == cell.fail_at and cell.fault is not None:
            return cell.fault(server)
        if stage == "rcpt":
            return Answer(json={"action": "accept", "modifications": [EDIT]})
        return Answer(json={"action": "accept"})

    return answer


# --- one cell -----------------------------------------------------------------------------------


async def play(
    watch: MetricWatch, server: HookServer, client: HookClient, temp_fail: bool, leaks: LeakCheck
) -> tuple[list[Answered], list[MutableMapping[str, Any]]]:
    """Run the session; check its leaks as soon as it has returned (while it still exists, so
    that nothing it forgot to close is closed by the garbage collector first)."""
    hook = HookFilter(
        name=HOOK,
        url=server.url,
        stages=["rcpt", "data"],
        timeout=Duration(TIMEOUT),
        max_response_size=Size(MAX_RESPONSE),
        temp_fail_on_error=temp_fail,
    )
    mta_stream, session_stream = trio.testing.memory_stream_pair()
    session = MtaSession(
        session_stream,
        max_packet=1 << 20,
        session_id=SESSION_ID,
        hooks=[hook],
        hook_client=client,
        metrics=watch.metrics,
        spool_memory=1,
        spool_directory=str(leaks.spool),
    )
    mta = Mta(mta_stream)
    with capture_logs([merge_contextvars]) as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            await mta.negotiate()
            answers = await mta.message()
            await mta.quit()
    leaks.session_ended()
    return answers, logs


def finals(answers: list[Answered]) -> dict[str, list[Reply]]:
    """Per stage, what the MTA got apart from PROGRESS."""
    return {a.stage: [r for r in a.replies if not isinstance(r, Progress)] for a in answers}


async def test_without_a_fault_the_hooks_header_is_added(
    ca: trustme.CA, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The control for the matrix: the header asked for at RCPT arrives at end-of-message."""
    watch = MetricWatch([HOOK])
    async with hook_peer(Cell(None, "none", "", (), None), ca) as (server, client):
        answers, logs = await play(watch, server, client, True, LeakCheck(tmp_path / "spool"))
    assert finals(answers)["eom"] == [ADDED, Continue()]
    assert [line for line in logs if line["event"] == "filter_error"] == []


@pytest.mark.parametrize("temp_fail", [True, False], ids=["tempfail", "skip"])
@pytest.mark.parametrize("name", list(CELLS))
async def test_hook_fault(
    name: str,
    temp_fail: bool,
    ca: trustme.CA,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    cell = CELLS[name]
    leaks = LeakCheck(tmp_path / "spool")
    watch = MetricWatch([HOOK])
    before = watch.start(cell.changes)
    with trio.fail_after(60):
        async with hook_peer(cell, ca) as (server, client):
            answers, logs = await play(watch, server, client, temp_fail, leaks)
            assert len(connections_to([server.port])) == cell.kept_alive
            stages = [request.json["context"]["stage"].lower() for request in server.requests]

    # The reply the MTA gets.
    failed = MTA_STAGE[cell.fail_at]
    got = finals(answers)
    if temp_fail:
        assert list(got)[-1] == failed
        assert got[failed] == [Tempfail()]
        assert all(replies == [Continue()] for stage, replies in got.items() if stage != failed)
    else:
        assert got["eom"] == [Continue()]  # no ADDED: the failed hook's edits are dropped
        assert all(replies == [Continue()] for replies in got.values())
    progress = {a.stage: a.progress for a in answers if a.progress}
    assert progress == ({failed: cell.progress} if cell.progress else {})
    # One request per stage reached: a failed hook is not asked again, a redirect not followed.
    expected_requests = ["rcpt", "data"][: ["rcpt", "data"].index(cell.fail_at) + 1]
    assert stages == ([] if cell.certificate else expected_requests)

    # The log lines.
    policy = "tempfail" if temp_fail else "skip"
    error = Line("filter_error", {"filter": HOOK, "kind": cell.kind, "stage": cell.fail_at}).find(
        logs
    )
    assert error["policy"] == policy
    assert cell.cause in error["cause"]
    assert len([line for line in logs if line["event"] == "filter_error"]) == 1
    Line("session_end", {"outcome": "quit"}).find(logs)
    message = Line("message_end").find(logs)
    assert message["filters"][HOOK]["error"] == cell.kind
    assert message["edits"] == {}
    if cell.fail_at == "data":  # the body came, and went to the spool's file
        Line("limit_hit", {"limit": "spool_memory"}).find(logs)

    # The metrics.
    watch.check(before, [up(HOOK, cell.up)])
    assert watch.total("milterbridge_filter_errors_total") == 1
    if not any(delta.metric == "milterbridge_protocol_errors_total" for delta in cell.changes):
        assert watch.total("milterbridge_protocol_errors_total") == 0
    verdict = "accept" if not temp_fail else "tempfail" if cell.fail_at == "data" else None
    assert watch.total("milterbridge_messages_total") == (verdict is not None)
    if verdict is not None:
        assert watch.total("milterbridge_messages_total", verdict=verdict) == 1
    assert watch.total("milterbridge_sessions_active") == 0

    leaks.finished()
