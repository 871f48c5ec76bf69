"""SIGHUP end to end: ``python -m milterbridge run --config FILE`` re-reads FILE.

The MTAs are our codec over TCP, the milters scripted fakes in this process. The milters differ
in what they negotiate (m1 declines HELO, m2 wants it), so the OPTNEG answer an MTA gets shows
which filter set its session runs on, and each milter records what reaches it.
"""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import trio

from milterbridge.milter import (
    Connect,
    Continue,
    Family,
    Mail,
    OptNegReply,
    Protocol,
    Quit,
)
from milterbridge.transport import MilterStream
from tests.fake_upstream import Peer, fake_upstream

from .bridge_process import BridgeProcess
from .mta_driver import POSTFIX_OFFER, exchange, open_mta

CONNECT = Connect(b"client.test", Family.INET, 4000, b"192.0.2.1")


class Recording:
    """A milter that negotiates ``protocol``, answers CONTINUE, and records what it is sent."""

    def __init__(self, protocol: Protocol) -> None:
        self.protocol = protocol
        self.seen: list[str] = []

    async def __call__(self, peer: Peer) -> None:
        await peer.negotiate(self.protocol)
        while not isinstance(message := await peer.receive(), Quit):
            self.seen.append(type(message).__name__)
            if peer.codec.awaiting is not None:
                await peer.reply(Continue())


def milter(name: str, port: int) -> str:
    return (
        f'[[milter]]\nname = "{name}"\nhostname = "127.0.0.1"\nport = {port}\n'
        'stages = ["connect"]\n'
    )


async def until_reachable(bridge: BridgeProcess, *names: str) -> None:
    """Poll /readyz until the bridge has probed these milters (its OPTNEG answer uses them)."""
    (listening,) = bridge.events("listening")
    async with httpx.AsyncClient(base_url=f"http://{listening['admin']}") as http:
        with trio.fail_after(10):
            while True:
                filters = (await http.get("/readyz")).json()["filters"]
                if all(filters.get(name, {}).get("state") == "reachable" for name in names):
                    return
                await trio.sleep(0.05)


async def session(bridge: BridgeProcess) -> tuple[MilterStream, OptNegReply]:
    mta = await open_mta(bridge.listen)
    (negotiated,) = await exchange(mta, POSTFIX_OFFER)
    assert isinstance(negotiated, OptNegReply)
    assert await exchange(mta, CONNECT) == [Continue()]
    return mta, negotiated


async def test_sighup_switches_new_sessions_and_refuses_a_broken_file(tmp_path: Path) -> None:
    one, two = Recording(Protocol.NOHELO), Recording(Protocol.NONE)
    async with fake_upstream(one) as m1, fake_upstream(two) as m2:
        config = tmp_path / "bridge.toml"
        config.write_text(milter("m1", m1.port))
        with BridgeProcess(tmp_path / "bridge", args=["--config", str(config)]) as bridge:
            await until_reachable(bridge, "m1")
            before, old_answer = await session(bridge)
            assert old_answer.protocol & Protocol.NOHELO  # no filter of its set wants HELO
            assert one.seen == ["Connect"]

            config.write_text(milter("m1", m1.port) + milter("m2", m2.port))
            bridge.send_signal(signal.SIGHUP)
            (reloaded,) = await bridge.until_logged("config_reloaded")
            assert reloaded["filters"] == ["m1", "m2"]
            assert (reloaded["added"], reloaded["removed"]) == (["m2"], [])
            await until_reachable(bridge, "m1", "m2")

            after, new_answer = await session(bridge)
            assert not new_answer.protocol & Protocol.NOHELO  # m2 wants HELO
            assert (one.seen, two.seen) == (["Connect", "Connect"], ["Connect"])
            # The session opened before the reload still runs on m1 alone.
            assert await exchange(before, Mail(b"<a@x.test>")) == [Continue()]
            assert (one.seen[-1], two.seen) == ("Mail", ["Connect"])

            config.write_text("[[milter]\n")
            bridge.send_signal(signal.SIGHUP)
            (failed,) = await bridge.until_logged("config_reload_failed")
            assert failed["error"].startswith(f"{config}: ")
            third, third_answer = await session(bridge)  # still the config of the last reload
            assert third_answer == new_answer
            assert two.seen == ["Connect", "Connect"]
            for mta in (before, after, third):
                await exchange(mta, Quit())
                await mta.aclose()
            assert bridge.stop() == 0
    assert not bridge.events("config_reload_partial")  # --listen and --admin-listen stay as given
    assert len(bridge.events("config_reloaded")) == 1


async def test_sighup_without_a_config_file_changes_nothing(tmp_path: Path) -> None:
    with BridgeProcess(tmp_path / "bridge") as bridge:
        bridge.send_signal(signal.SIGHUP)
        (skipped,) = await bridge.until_logged("config_reload_skipped")
        assert skipped["reason"] == "no config file: nothing to reload"
        assert bridge.stop() == 0
