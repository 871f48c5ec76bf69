"""The admin API inside the running service: a hook created through /api is called by the next
MTA session, without a restart; the state file keeps it for the next start."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio

from milterbridge.app import Service
from milterbridge.config import AdminConfig, AdminToken, Config, SecretValue, ServerConfig
from milterbridge.milter import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    Connect,
    Connection,
    Family,
    OptNeg,
    Quit,
    Role,
)
from milterbridge.transport import MilterStream
from tests.fixtures.hook_server import hook_server

PERMISSIONS = ["sysMtaHookCreate", "sysMtaHookGet"]


async def _connect_once(address: str) -> None:
    host, _, port = address.removeprefix("inet:").rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    mta = MilterStream(stream, Connection(Role.MTA))
    await mta.send(OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL))
    await mta.receive()
    options = mta.connection.negotiated
    assert options is not None
    if options.sends(Connect):  # with no filter the bridge declines every step
        await mta.send(Connect(b"client.test", Family.INET, 4000, b"192.0.2.1"))
        while mta.connection.awaiting is not None:
            await mta.receive()
    await mta.send(Quit())
    await stream.aclose()


async def test_a_hook_created_through_the_api_serves_the_next_session(tmp_path: Path) -> None:
    config = Config(
        server=ServerConfig(listen=["inet:127.0.0.1:0"]),
        admin=AdminConfig(
            listen="127.0.0.1:0",
            state_file=str(tmp_path / "filters.json"),
            token=[
                AdminToken(name="ops", secret=SecretValue(secret="t0k"), permissions=PERMISSIONS)
            ],
        ),
    )
    async with hook_server() as server, trio.open_nursery() as nursery:
        service = Service(config)
        addresses = await nursery.start(service.run)
        await _connect_once(addresses[0])
        assert server.requests == []  # no hook yet
        request = {
            "using": ["urn:ietf:params:jmap:core", "urn:stalwart:jmap"],
            "methodCalls": [
                [
                    "x:MtaHook/set",
                    {"create": {"h": {"name": "policy", "url": server.url, "stages": ["connect"]}}},
                    "c1",
                ]
            ],
        }
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"http://{addresses.admin}/api",
                json=request,
                headers={"Authorization": "Bearer t0k"},
            )
        assert answer.status_code == 200
        created = answer.json()["methodResponses"][0][1]["created"]
        assert set(created) == {"h"}
        await _connect_once(addresses[0])
        assert [r.json["context"]["stage"] for r in server.requests] == ["CONNECT"]
        nursery.cancel_scope.cancel()
    # The next start finds it in the state file.
    assert [hook.name for hook in Service(config).config.hook] == ["policy"]
