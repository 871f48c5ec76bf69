"""Two Connections, one per role, joined by a fake link (after h11's ConnectionPair)."""

from __future__ import annotations

from milterbridge.milter import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    NEED_DATA,
    Connection,
    Message,
    OptNeg,
    OptNegReply,
    Protocol,
    Role,
    answer_offer,
)
from milterbridge.milter.constants import Action


class Pair:
    """An MTA-role and a filter-role Connection; ``mta()``/``filter()`` carry packets across."""

    def __init__(self) -> None:
        self.mta_side = Connection(Role.MTA)
        self.filter_side = Connection(Role.FILTER)

    @staticmethod
    def _carry(src: Connection, dst: Connection, messages: tuple[Message, ...]) -> list[Message]:
        data = src.send_many(messages)
        dst.receive_data(data)
        received: list[Message] = []
        while (event := dst.next_event()) is not NEED_DATA:
            assert isinstance(event, Message)
            received.append(event)
        return received

    def mta(self, *messages: Message) -> list[Message]:
        """The MTA sends; returns what the filter decoded."""
        return self._carry(self.mta_side, self.filter_side, messages)

    def filter(self, *messages: Message) -> list[Message]:
        """The filter sends; returns what the MTA decoded."""
        return self._carry(self.filter_side, self.mta_side, messages)

    def negotiate(
        self,
        protocol: Protocol = Protocol.NONE,
        actions: Action = ALL_ACTIONS,
        offer: OptNeg | None = None,
    ) -> OptNegReply:
        offer = offer or OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL)
        assert self.mta(offer) == [offer]
        reply = answer_offer(offer, actions=actions, protocol=protocol)
        assert self.filter(reply) == [reply]
        return reply
