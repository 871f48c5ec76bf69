"""Disks that fill up or turn read-only under the admin API's state file and under the spool.

The disks are real: a 64 KiB tmpfs mounted under the test's directory (the tests run as root),
filled to the last page by a filler file, or remounted read-only. The service runs in-process
on loopback; the admin API is called over HTTP, the hook is the real hook server, the MTA is our
codec. What each fault must come to (README "When something breaks"):

* state file: the ``/api`` call answers ``serverFail``; the filters in memory and the state file
  on disk are exactly as before; no temporary file is left next to it; one
  ``admin_state_write_failed`` line per refused call; ``milterbridge_state_write_errors_total``.
  Once the disk is back, the same call succeeds.
* spool: the body chunk that cannot be kept is answered TEMPFAIL (the MTA keeps the message);
  the hook never sees a part of that message; ``spool_failed`` names the session and the OS
  error; ``milterbridge_limit_hits_total{limit="spool_directory"}``; nothing is left in the
  spool directory; and the same session serves its next message normally once there is room.
"""

from __future__ import annotations

import contextlib
import errno
import subprocess
from collections.abc import AsyncIterator, Iterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from milterbridge.admin import store as store_module
from milterbridge.admin.store import FilterStore
from milterbridge.app import Service, ServiceAddresses
from milterbridge.config import (
    AdminConfig,
    AdminToken,
    Config,
    HookFilter,
    MilterFilter,
    SecretValue,
    ServerConfig,
)
from milterbridge.durations import Size
from milterbridge.milter import (
    Abort,
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
    OptNegReply,
    Quit,
    Rcpt,
    Reply,
    Tempfail,
)
from milterbridge.transport import MilterStream
from tests.faults.leaks import files_under
from tests.fixtures.filter_process import FilterProcess, running_filter
from tests.fixtures.hook_server import HookServer, hook_server
from tests.integration.mta_driver import POSTFIX_OFFER, exchange, open_mta

#: The size of each test disk: 16 pages.
DISK_SIZE = "64k"
TOKEN = "t0k"
PERMISSIONS = ["sysMtaHookGet", "sysMtaHookCreate", "sysMtaHookUpdate"]
USING = ["urn:ietf:params:jmap:core", "urn:stalwart:jmap"]
HOOK_URL = "http://127.0.0.1:1/first"


class Disk:
    """A small tmpfs mounted at ``path``: fill it, free it, make it read-only and writable."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        """Take every free page, so that the next write of any size fails with ENOSPC."""
        with self.filler.open("ab", buffering=0) as filler:
            try:
                while True:
                    filler.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
        with pytest.raises(OSError, match="No space left"):
            (self.path / "probe").write_bytes(b"x" * 4096)
        (self.path / "probe").unlink(missing_ok=True)

    def free(self) -> None:
        self.filler.unlink()

    def read_only(self) -> None:
        _run("mount", "-o", "remount,ro", str(self.path))

    def writable(self) -> None:
        _run("mount", "-o", "remount,rw", str(self.path))

    def entries(self) -> list[str]:
        """What the directory holds, without the filler."""
        return sorted(entry.name for entry in self.path.iterdir() if entry != self.filler)


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    """A fresh 64 KiB tmpfs under the test's directory, always unmounted afterwards."""
    path = tmp_path / "disk"
    path.mkdir()
    _run("mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE},mode=0755", "tmpfs", str(path))
    try:
        yield Disk(path)
    finally:
        # Lazy: a descriptor the test failed to close must not leave the mount behind.
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


# --- the state file -----------------------------------------------------------------------------


def api_config(state_file: Path) -> Config:
    return Config(
        server=ServerConfig(listen=["inet:127.0.0.1:0"]),
        admin=AdminConfig(
            listen="127.0.0.1:0",
            state_file=str(state_file),
            token=[
                AdminToken(name="ops", secret=SecretValue(secret=TOKEN), permissions=PERMISSIONS)
            ],
        ),
    )


class Admin:
    """The admin listener of a running service: JMAP calls and a Prometheus scrape."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def call(self, method: str, arguments: dict[str, Any]) -> list[Any]:
        """One method call; its response ``[name, arguments, "c1"]``."""
        answer = await self.http.post(
            "/api",
            json={"using": USING, "methodCalls": [[method, arguments, "c1"]]},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert answer.status_code == 200, answer.text
        (response,) = answer.json()["methodResponses"]
        return list(response)

    async def create(self, name: str, url: str) -> list[Any]:
        hook = {"name": name, "url": url, "stages": ["connect"]}
        return await self.call("x:MtaHook/set", {"create": {"h": hook}})

    async def hooks(self) -> dict[str, str]:
        """Every hook's name and url, as the API shows them."""
        (name, arguments, _) = await self.call("x:MtaHook/get", {"ids": None})
        assert name == "x:MtaHook/get"
        return {hook["name"]: hook["url"] for hook in arguments["list"]}

    async def metric(self, name: str, **labels: str) -> float:
        """One sample from ``/metrics``, as Prometheus would scrape it."""
        text = (await self.http.get("/metrics")).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        raise AssertionError(f"no sample {name}{labels} in /metrics")


@asynccontextmanager
async def running_service(config: Config) -> AsyncIterator[tuple[Service, Admin]]:
    async with trio.open_nursery() as nursery:
        service = Service(config)
        addresses: ServiceAddresses = await nursery.start(service.run)
        async with httpx.AsyncClient(base_url=f"http://{addresses.admin}") as http:
            yield service, Admin(http)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("fault", "repair", "error"),
    [
        ("fill", "free", "No space left on device"),
        ("read_only", "writable", "Read-only file system"),
    ],
)
async def test_a_state_file_that_cannot_be_written_refuses_the_change(
    disk: Disk, fault: str, repair: str, error: str
) -> None:
    state_file = disk.path / "filters.json"
    with trio.fail_after(20), capture_logs([merge_contextvars]) as logs:
        async with running_service(api_config(state_file)) as (service, admin):
            (_, created, _) = await admin.create("first", HOOK_URL)
            (first_id,) = [hook["id"] for hook in created["created"].values()]
            before = state_file.read_bytes()
            config_before = service.config
            assert await admin.metric("milterbridge_state_write_errors_total") == 0

            getattr(disk, fault)()
            create = await admin.create("second", "http://127.0.0.1:1/second")
            update = await admin.call(
                "x:MtaHook/set", {"update": {first_id: {"url": "http://127.0.0.1:1/moved"}}}
            )
            for name, arguments, call_id in (create, update):
                assert (name, arguments["type"], call_id) == ("error", "serverFail", "c1")
                assert error in arguments["description"]
                assert "nothing was changed" in arguments["description"]
            assert await admin.hooks() == {"first": HOOK_URL}
            assert service.config is config_before
            assert state_file.read_bytes() == before
            assert disk.entries() == ["filters.json"]  # no temporary file left
            assert await admin.metric("milterbridge_state_write_errors_total") == 2

            getattr(disk, repair)()
            (name, arguments, _) = await admin.create("second", "http://127.0.0.1:1/second")
            assert (name, set(arguments["created"])) == ("x:MtaHook/set", {"h"})
            assert [hook.name for hook in service.config.hook] == ["first", "second"]
            assert disk.entries() == ["filters.json"]
    failures = [line for line in logs if line["event"] == "admin_state_write_failed"]
    assert len(failures) == 2
    assert all(error in line["error"] and str(state_file) in line["error"] for line in failures)
    assert all(line["log_level"] == "error" for line in failures)
    _, hooks = FilterStore.open(api_config(state_file)).filters()  # as the next start reads it
    assert [hook.name for hook in hooks] == ["first", "second"]


def test_a_failed_directory_sync_after_the_rename_keeps_the_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename is done when the directory's fsync fails (an I/O error, which no test disk
    produces on demand): the change stands, in memory as in the file, and is logged."""
    state_file = tmp_path / "filters.json"
    store = FilterStore.open(api_config(state_file))
    errors: list[Exception] = []
    store.on_write_error.append(errors.append)

    def fail(directory: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store_module, "_sync_directory", fail)
    draft = store.draft("hook")
    draft.create({"name": "first", "url": HOOK_URL})
    with capture_logs([merge_contextvars]) as logs:
        store.commit(draft)
    assert [hook.name for hook in store.filters()[1]] == ["first"]
    assert [hook.name for hook in FilterStore.open(api_config(state_file)).filters()[1]] == [
        "first"
    ]
    (warning,) = [line for line in logs if line["event"] == "state_file_sync_failed"]
    assert warning["error"] == "Input/output error"
    assert errors == []
    draft = store.draft("hook")  # the store still knows the file it wrote: no conflict
    draft.create({"name": "second", "url": HOOK_URL})
    store.commit(draft)


# --- the spool ----------------------------------------------------------------------------------

#: The body kept in memory; the first chunk of a message passes it, so the body goes to disk.
SPOOL_MEMORY = 8 * 1024
CHUNK = b"0123456789abcdef" * 640 + b"\r\n"  # 10 KiB and a line end


def spool_config(spool: Path, hook: HookServer, milter: FilterProcess | None) -> Config:
    return Config(
        server=ServerConfig(
            listen=["inet:127.0.0.1:0"],
            spool_memory=Size(SPOOL_MEMORY),
            spool_directory=str(spool),
        ),
        admin=AdminConfig(listen=""),
        hook=[HookFilter(name="scanner", url=hook.url, stages=["data"])],
        milter=[]
        if milter is None
        else [MilterFilter(name="libmilter", hostname=milter.host, port=milter.port)],
    )


async def step(mta: MilterStream, command: Command) -> list[Reply] | None:
    """Send ``command`` as Postfix would; the replies it got (``[]``: none owed), or None when
    the bridge declined the step (then Postfix does not send it)."""
    negotiated = mta.connection.negotiated
    assert negotiated is not None
    if not negotiated.sends(type(command)):
        return None
    return await exchange(mta, command)


async def envelope(mta: MilterStream, sender: bytes) -> None:
    """MAIL up to end-of-headers, each step continued."""
    for command in (
        Mail(sender),
        Rcpt(b"<b@y.test>"),
        Data(),
        Header(b"Subject", b"spool"),
        EndOfHeaders(),
    ):
        assert await step(mta, command) in (None, [], [Continue()])


async def logged(logs: list[MutableMapping[str, Any]], event: str) -> list[Any]:
    """The captured lines of ``event``, once there is one."""
    while not (lines := [line for line in logs if line["event"] == event]):  # noqa: ASYNC110
        await trio.sleep(0.01)
    return lines


@pytest.mark.parametrize(
    "with_milter",
    [
        # A data hook alone: the bridge asks for no reply to body chunks, so the TEMPFAIL
        # comes at end-of-message.
        pytest.param(False, id="hook-tempfail-at-eom"),
        # With a real libmilter filter that answers body chunks, at the chunk itself; Postfix
        # then aborts the message, and the filter never gets its end-of-message.
        pytest.param(True, id="milter-tempfail-at-body"),
    ],
)
async def test_a_full_spool_tempfails_the_message_and_the_session_goes_on(
    disk: Disk, tmp_path: Path, with_milter: bool
) -> None:
    spool = disk.path / "spool"
    spool.mkdir()
    registry = CollectorRegistry()
    with contextlib.ExitStack() as stack:
        milter = stack.enter_context(running_filter({}, tmp_path)) if with_milter else None
        with trio.fail_after(20), capture_logs([merge_contextvars]) as logs:
            async with hook_server() as hook, trio.open_nursery() as nursery:
                service = Service(spool_config(spool, hook, milter), registry=registry)
                (address,) = await nursery.start(service.run)
                mta = await open_mta(address)
                (answer,) = await exchange(mta, POSTFIX_OFFER)
                assert isinstance(answer, OptNegReply)
                client = Connect(b"client.test", Family.INET, 4000, b"192.0.2.1")
                for command in (client, Helo(b"client.test")):
                    assert await step(mta, command) in (None, [], [Continue()])
                body_replies = [Continue()] if with_milter else []

                # The first message: its body goes to disk, then the disk fills mid-message.
                await envelope(mta, b"<first@x.test>")
                assert await step(mta, Body(CHUNK)) == body_replies
                (spilled,) = await logged(logs, "limit_hit")  # a chunk owes no reply: polled
                assert spilled["limit"] == "spool_memory"
                disk.fill()
                if with_milter:
                    assert await step(mta, Body(CHUNK)) == [Tempfail()]
                else:
                    assert await step(mta, Body(CHUNK)) == []
                    assert await step(mta, EndOfMessage()) == [Tempfail()]
                assert await step(mta, Abort()) == []  # Postfix aborts after every message
                assert hook.requests == []  # never a part of the message
                assert files_under(spool) == []  # no descriptor into the spool left open
                assert list(spool.iterdir()) == []
                hits = {"limit": "spool_directory"}
                assert registry.get_sample_value("milterbridge_limit_hits_total", hits) == 1
                tempfailed = {"verdict": "tempfail"}
                assert registry.get_sample_value("milterbridge_messages_total", tempfailed) == 1

                # Room again: the same session's next message is served whole.
                disk.free()
                await envelope(mta, b"<second@x.test>")
                assert await step(mta, Body(CHUNK)) == body_replies
                assert await step(mta, Body(CHUNK)) == body_replies
                assert await step(mta, EndOfMessage()) == [Continue()]
                (request,) = hook.requests
                assert request.json["message"]["contents"] == (CHUNK * 2).decode()
                assert request.json["envelope"]["from"]["address"] == "second@x.test"
                await mta.send(Quit())
                await mta.aclose()
                while service.open_sessions:  # noqa: ASYNC110 -- no event to wait on
                    await trio.sleep(0.01)
                assert list(spool.iterdir()) == []
                assert files_under(spool) == []
                nursery.cancel_scope.cancel()
        if milter is not None:
            (eom,) = milter.events("eom")  # the second message only
            assert eom["body_len"] == 2 * len(CHUNK)
            events = [r["event"] for r in milter.events() if r["event"] in ("body", "abort")]
            assert events[:2] == ["body", "abort"]  # the first message: one chunk, aborted
    (failed,) = [line for line in logs if line["event"] == "spool_failed"]
    assert failed["log_level"] == "error"
    assert failed["directory"] == str(spool)
    assert "No space left on device" in failed["error"]
    messages = [line for line in logs if line["event"] == "message_end"]
    assert [line["verdict"] for line in messages] == ["tempfail", "accept"]
    (ended,) = [line for line in logs if line["event"] == "session_end"]
    assert (ended["outcome"], ended["messages"]) == ("quit", 1)
    assert failed["session_id"] == ended["session_id"] == messages[0]["session_id"]
