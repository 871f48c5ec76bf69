"""Upstream filters: the bridge plays the MTA towards each configured milter.

``connect_upstream`` joins one milter to an MTA session; every way it can fail is an
``UpstreamFailure`` with a ``FailureKind`` (design §7), for the session's error policy.
"""

from .endpoint import UpstreamEndpoint, upstream_offer
from .failure import STAGE_NAMES, FailureKind, UpstreamFailure
from .milter_client import StreamOpener, UpstreamMilter, connect_upstream, open_socket

__all__ = [
    "STAGE_NAMES",
    "FailureKind",
    "StreamOpener",
    "UpstreamEndpoint",
    "UpstreamFailure",
    "UpstreamMilter",
    "connect_upstream",
    "open_socket",
    "upstream_offer",
]
