"""Where one upstream milter is and how to talk to it, and the OPTNEG offer it gets.

``UpstreamEndpoint`` is deliberately not the configuration struct: it carries only what the
client needs, so the client does not depend on how the configuration is spelled (the session
builds one from each ``[[milter]]`` table). Defaults are the reference object's (design §8).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..milter import MAX_VERSION, Action, OptNeg, Protocol

#: What a version 2 MTA may offer (SMFI_V2_ACTS; SMFI_V2_PROT plus SMFIP_NR_HDR, which Postfix
#: offers at milter_protocol=2 with "no_header_reply"; protocol notes §4.4).
V2_ACTIONS = Action(0x3F)
V2_PROTOCOL = Protocol(0xFF)

#: Protocol versions an upstream may be configured for (``protocolVersion`` v2 | v6).
SUPPORTED_VERSIONS = (2, 6)


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamEndpoint:
    """One upstream milter's address, transport and limits.

    Attributes:
        name: the filter's configured name (in failures and logs).
        hostname: TCP host, and the TLS server name (also with ``unix_path``).
        port: TCP port (ignored with ``unix_path``).
        unix_path: connect to this Unix socket instead of TCP.
        use_tls: wrap the connection in TLS (verified against the system CAs and ``hostname``).
        allow_invalid_certs: with TLS, accept any certificate and any name.
        max_response_size: largest packet accepted from the upstream (the codec's
            ``max_packet``, so a length word above it fails at once with OVERSIZE).
        protocol_version: 2 or 6, the highest version offered.
        flags_action: when set, only these SMFIF_* bits of the MTA's offer are offered.
        flags_protocol: when set, only these SMFIP_* bits of the MTA's offer are offered.
        timeout_connect: connect + TLS + OPTNEG, seconds.
        timeout_command: one envelope or header step and its reply, seconds.
        timeout_data: one body chunk or end-of-message and its replies, seconds.
    """

    name: str
    hostname: str
    port: int = 11332
    unix_path: str | None = None
    use_tls: bool = False
    allow_invalid_certs: bool = False
    max_response_size: int = 52428800
    protocol_version: int = MAX_VERSION
    flags_action: int | None = None
    flags_protocol: int | None = None
    timeout_connect: float = 30.0
    timeout_command: float = 30.0
    timeout_data: float = 60.0

    def __post_init__(self) -> None:
        if self.protocol_version not in SUPPORTED_VERSIONS:
            raise ValueError(f"protocol_version must be 2 or 6, not {self.protocol_version}")
        if self.max_response_size < 1:
            raise ValueError("max_response_size must be at least 1")
        for field in ("timeout_connect", "timeout_command", "timeout_data"):
            if not getattr(self, field) > 0:
                raise ValueError(f"{field} must be positive")


def upstream_offer(endpoint: UpstreamEndpoint, mta_offer: OptNeg) -> OptNeg:
    """The OPTNEG offer for this upstream: the MTA's, narrowed, never widened.

    We can only forward behaviour the MTA agreed to, so every limit intersects the MTA's offer
    (protocol notes §8.1 rule 2): a version 2 upstream gets the version 2 subsets, and
    ``flags_action``/``flags_protocol`` drop bits but never add any.
    """
    version = min(mta_offer.version, MAX_VERSION)
    actions = int(mta_offer.actions)
    protocol = int(mta_offer.protocol)
    if endpoint.protocol_version == 2:
        version = min(version, 2)
        actions &= V2_ACTIONS
        protocol &= V2_PROTOCOL
    if endpoint.flags_action is not None:
        actions &= endpoint.flags_action
    if endpoint.flags_protocol is not None:
        protocol &= endpoint.flags_protocol
    return OptNeg(version, Action(actions), Protocol(protocol))


__all__ = ["V2_ACTIONS", "V2_PROTOCOL", "UpstreamEndpoint", "upstream_offer"]
