"""SIGTERM and SIGHUP while a message is in flight, end to end.

``python -m milterbridge run --config FILE`` runs as a subprocess (its log is JSON lines, read
back and parsed), with real libmilter filters behind it (tests/fixtures/pymilter_filter.py) and,
where the body must be kept, the real hook server; the MTA is our codec. Each test sends the
signal while the filter is provably inside the message -- its record shows the step it is
thinking about -- and checks the outcome README "When something breaks" and "Signals and
reload" promise: what the MTA gets, the log lines, the metrics (scraped from ``/metrics`` while
the admin listener is up: during the drain, or before the session ends), the exit status, and
that nothing is left in the spool directory.

test_app_signals.py covers the same paths in-process with scripted milters and virtual time
(the drain's own bookkeeping, the deadline's counter, a second signal); these add the real
process, the real signal and real filters.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from milterbridge.milter import (
    CLOSED,
    AddHeader,
    Body,
    Command,
    Connect,
    Continue,
    Data,
    EndOfHeaders,
    EndOfMessage,
    Family,
    Header,
    Helo,
    Mail,
    Quit,
    Rcpt,
    Reply,
    Tempfail,
)
from milterbridge.transport import MilterStream
from tests.fixtures.filter_process import FilterProcess, running_filter
from tests.fixtures.hook_server import hook_server
from tests.integration.bridge_process import BridgeProcess
from tests.integration.mta_driver import POSTFIX_OFFER, exchange, open_mta

#: Four KiB of body in 1 KiB lines: past a ``spoolMemory`` of 1 KiB, so the body goes to disk.
BODY = (b"x" * 1022 + b"\r\n") * 4
#: The message up to end-of-headers.
ENVELOPE: list[Command] = [
    Connect(b"client.test", Family.INET, 4000, b"192.0.2.1"),
    Helo(b"client.test"),
    Mail(b"<a@x.test>"),
    Rcpt(b"<b@y.test>"),
    Data(),
    Header(b"Subject", b"in flight"),
    EndOfHeaders(),
]


def milter_toml(name: str, filter_: FilterProcess) -> str:
    return f'[[milter]]\nname = "{name}"\nhostname = "127.0.0.1"\nport = {filter_.port}\n'


def scanner(tmp_path: Path, name: str, **script: Any) -> Iterator[FilterProcess]:
    """A libmilter filter that adds ``X-<name>: yes`` at end-of-message."""
    edits = {"eom_edits": [["addheader", f"X-{name}", "yes"]]}
    return running_filter({**edits, **script}, tmp_path / "filters", name=name)


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[FilterProcess]:
    """Thinks 1.5 s at end-of-message: the drain (20 s) waits for it."""
    with scanner(tmp_path, "slow", sleep_ms={"eom": 1500}) as filter_:
        yield filter_


@pytest.fixture
def stuck(tmp_path: Path) -> Iterator[FilterProcess]:
    """Thinks 30 s at end-of-message: far past the drain deadline (1 s)."""
    with scanner(tmp_path, "stuck", sleep_ms={"eom": 30_000}) as filter_:
        yield filter_


class Admin:
    """The bridge's admin listener: ``/readyz`` and one sample of ``/metrics``."""

    def __init__(self, bridge: BridgeProcess) -> None:
        (listening,) = bridge.events("listening")
        self.base = f"http://{listening['admin']}"

    async def ready(self) -> int:
        async with httpx.AsyncClient(base_url=self.base) as http:
            return (await http.get("/readyz")).status_code

    async def metric(self, name: str, **labels: str) -> float | None:
        """The sample, None when the series does not exist."""
        async with httpx.AsyncClient(base_url=self.base) as http:
            text = (await http.get("/metrics")).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return None

    async def until_probed(self, *names: str) -> None:
        """Until /readyz has these milters reachable (the bridge probed each)."""
        async with httpx.AsyncClient(base_url=self.base) as http:
            with trio.fail_after(10):
                while True:
                    filters = (await http.get("/readyz")).json()["filters"]
                    if all(filters.get(name, {}).get("state") == "reachable" for name in names):
                        return
                    await trio.sleep(0.05)


async def step(mta: MilterStream, command: Command) -> list[Reply]:
    """``command`` as Postfix sends it (not at all for a step the bridge declined)."""
    negotiated = mta.connection.negotiated
    assert negotiated is not None
    return await exchange(mta, command) if negotiated.sends(type(command)) else []


async def up_to_end_of_message(address: str) -> MilterStream:
    """A session with the whole message sent, END-OF-MESSAGE included; its answer unread."""
    mta = await open_mta(address)
    await exchange(mta, POSTFIX_OFFER)
    for command in [*ENVELOPE, Body(BODY)]:
        assert await step(mta, command) in ([], [Continue()]), command
    await mta.send(EndOfMessage())
    return mta


async def answer(mta: MilterStream) -> list[Reply]:
    """What the bridge sends for the step in progress, up to its final reply."""
    replies: list[Reply] = []
    while mta.connection.awaiting is not None:
        reply = await mta.receive()
        assert isinstance(reply, Reply), reply
        replies.append(reply)
    return replies


async def thinking(filter_: FilterProcess, stage: str) -> None:
    """Until the filter's record shows it got ``stage`` (it records before it thinks)."""
    with trio.fail_after(10):
        while not filter_.events(stage):  # noqa: ASYNC110 -- a record file: polled
            await trio.sleep(0.02)


def refused(address: str) -> bool:
    """Whether a new connection to ``address`` is refused by the kernel (nobody listens)."""
    host, _, port = address.removeprefix("inet:").rpartition(":")
    with socket.socket() as probe:
        return probe.connect_ex((host, int(port))) != 0


def events(bridge: BridgeProcess) -> list[str]:
    return [line["event"] for line in bridge.logs()]


# --- SIGTERM ------------------------------------------------------------------------------------


async def test_sigterm_mid_message_lets_it_finish_within_the_deadline(
    tmp_path: Path, slow: FilterProcess
) -> None:
    """The milter is thinking at end-of-message when SIGTERM comes: the listener closes, the
    message still gets its answer and its edits, and the process exits 0 once the MTA quits."""
    spool = tmp_path / "spool"
    spool.mkdir()
    config = tmp_path / "bridge.toml"
    async with hook_server() as hook:
        config.write_text(
            f'[server]\ndrainDeadline = "20s"\nspoolMemory = "1KiB"\nspoolDirectory = "{spool}"\n'
            + milter_toml("slow", slow)
            + f'[[hook]]\nname = "keeper"\nurl = "{hook.url}"\nstages = ["data"]\n'
        )
        with BridgeProcess(tmp_path / "bridge", args=["--config", str(config)]) as bridge:
            admin = Admin(bridge)
            await admin.until_probed("slow")
            with trio.fail_after(20):
                mta = await up_to_end_of_message(bridge.address())
                await thinking(slow, "eom")
                bridge.send_signal(signal.SIGTERM)
                (draining,) = await bridge.until_logged("draining")
                assert refused(bridge.address())
                assert await admin.ready() == 503
                assert await admin.metric("milterbridge_sessions_active") == 1

                assert await answer(mta) == [AddHeader(b"X-slow", b"yes"), Continue()]
                accepted = await admin.metric("milterbridge_messages_total", verdict="accept")
                assert accepted == 1
                hits = await admin.metric("milterbridge_limit_hits_total", limit="drain_deadline")
                assert hits == 0
                await exchange(mta, Quit())
                await mta.aclose()
                assert await trio.to_thread.run_sync(bridge.wait, 10) == 0

    assert (draining["sessions"], draining["deadline"]) == (1, 20.0)
    order = events(bridge)
    assert order.index("stopping") < order.index("draining") < order.index("message_end")
    assert order[-1] == "stopped"
    assert "drain_abandoned" not in order
    (message,) = bridge.events("message_end")
    assert message["verdict"] == "accept"
    (ended,) = bridge.events("session_end")
    assert ended["outcome"] == "quit"
    (spilled,) = bridge.events("limit_hit")
    assert spilled["limit"] == "spool_memory"
    (eom,) = slow.events("eom")
    assert eom["body_len"] == len(BODY)
    (request,) = hook.requests
    assert request.json["message"]["contents"] == BODY.decode()
    assert list(spool.iterdir()) == []
    assert sorted(path.name for path in bridge.workdir.iterdir()) == ["bridge.log"]


async def test_sigterm_past_the_deadline_tempfails_the_step_in_progress(
    tmp_path: Path, stuck: FilterProcess
) -> None:
    """The milter would think for 30 s; the drain deadline is 1 s: at the deadline the MTA gets
    TEMPFAIL for end-of-message (it keeps the message and retries), the connection closes, and
    the process exits 0."""
    config = tmp_path / "bridge.toml"
    config.write_text('[server]\ndrainDeadline = "1s"\n' + milter_toml("stuck", stuck))
    with BridgeProcess(tmp_path / "bridge", args=["--config", str(config)]) as bridge:
        admin = Admin(bridge)
        await admin.until_probed("stuck")
        with trio.fail_after(20):
            mta = await up_to_end_of_message(bridge.address())
            await thinking(stuck, "eom")
            bridge.send_signal(signal.SIGTERM)
            await bridge.until_logged("draining")
            # Scraped within the deadline: the session still runs, nothing abandoned yet.
            assert await admin.metric("milterbridge_sessions_active") == 1
            hits = await admin.metric("milterbridge_limit_hits_total", limit="drain_deadline")
            assert hits == 0

            assert await answer(mta) == [Tempfail()]
            assert await mta.receive() is CLOSED
            await mta.aclose()
            assert await trio.to_thread.run_sync(bridge.wait, 10) == 0

    order = events(bridge)
    assert order.index("draining") < order.index("drain_abandoned") < order.index("session_end")
    assert order[-1] == "stopped"
    (abandoned,) = bridge.events("drain_abandoned")
    assert (abandoned["sessions"], abandoned["reason"]) == (1, "drain_deadline")
    (ended,) = bridge.events("session_end")
    assert ended["outcome"] == "abandoned"
    assert not [line for line in bridge.events("message_end") if line["verdict"] == "accept"]


# --- SIGHUP -------------------------------------------------------------------------------------


async def test_sighup_mid_message_changes_nothing_for_it_and_everything_for_the_next(
    tmp_path: Path,
) -> None:
    """Reload from filter ``one`` to filter ``two`` between end-of-headers and the body: the
    message in flight finishes on ``one`` alone, with ``one``'s edit; the next session runs on
    ``two`` alone; ``one``'s metric series go when the session that used it ends."""
    with scanner(tmp_path, "one") as one, scanner(tmp_path, "two") as two:
        config = tmp_path / "bridge.toml"
        config.write_text(milter_toml("one", one))
        with BridgeProcess(tmp_path / "bridge", args=["--config", str(config)]) as bridge:
            admin = Admin(bridge)
            await admin.until_probed("one")
            with trio.fail_after(20):
                before = await open_mta(bridge.address())
                await exchange(before, POSTFIX_OFFER)
                for command in ENVELOPE:
                    assert await step(before, command) in ([], [Continue()]), command
                await thinking(one, "eoh")

                config.write_text(milter_toml("two", two))
                bridge.send_signal(signal.SIGHUP)
                (reloaded,) = await bridge.until_logged("config_reloaded")
                await admin.until_probed("two")

                assert await step(before, Body(BODY)) in ([], [Continue()])
                edits = await step(before, EndOfMessage())
                assert edits == [AddHeader(b"X-one", b"yes"), Continue()]
                one_edits = {"filter": "one", "kind": "add_header"}
                assert await admin.metric("milterbridge_edits_total", **one_edits) == 1

                after = await open_mta(bridge.address())
                await exchange(after, POSTFIX_OFFER)
                for command in [*ENVELOPE, Body(BODY)]:
                    assert await step(after, command) in ([], [Continue()]), command
                edits = await step(after, EndOfMessage())
                assert edits == [AddHeader(b"X-two", b"yes"), Continue()]

                for mta in (before, after):
                    await exchange(mta, Quit())
                    await mta.aclose()
                await bridge.until_logged("session_end", 2)
                two_edits = {"filter": "two", "kind": "add_header"}
                assert await admin.metric("milterbridge_edits_total", **two_edits) == 1
                assert await admin.metric("milterbridge_edits_total", **one_edits) is None
                accepted = await admin.metric("milterbridge_messages_total", verdict="accept")
                assert accepted == 2
            assert bridge.stop() == 0

        # Each filter saw one message whole; ``two`` never heard of the one in flight.
        assert [record["body_len"] for record in one.events("eom")] == [len(BODY)]
        assert [record["body_len"] for record in two.events("eom")] == [len(BODY)]
        assert len(two.events("connect")) == 1

    assert reloaded["filters"] == ["two"]
    assert (reloaded["added"], reloaded["removed"], reloaded["changed"]) == (["two"], ["one"], [])
    assert [line["verdict"] for line in bridge.events("message_end")] == ["accept", "accept"]
    assert [list(line["filters"]) for line in bridge.events("message_end")] == [["one"], ["two"]]
