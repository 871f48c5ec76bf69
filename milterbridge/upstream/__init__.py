"""Upstream filters: the bridge plays the MTA towards each configured milter.

``connect_upstream`` joins one milter to an MTA session; ``HookClient`` calls the HTTP hooks.
Every way either can fail is an ``UpstreamFailure`` with a ``FailureKind`` (design §7), for the
session's error policy.
"""

from ..engine.hook_answer import HookAnswer
from .endpoint import UpstreamEndpoint, upstream_offer
from .failure import STAGE_NAMES, FailureKind, UpstreamFailure
from .hook_client import HookClient
from .hook_request import HookInput, HookRequestBody, encode_request
from .hook_response import HookResponse, HookResponseError, decode_response
from .milter_client import StreamOpener, UpstreamMilter, connect_upstream, open_socket

__all__ = [
    "STAGE_NAMES",
    "FailureKind",
    "HookAnswer",
    "HookClient",
    "HookInput",
    "HookRequestBody",
    "HookResponse",
    "HookResponseError",
    "StreamOpener",
    "UpstreamEndpoint",
    "UpstreamFailure",
    "UpstreamMilter",
    "connect_upstream",
    "decode_response",
    "encode_request",
    "open_socket",
    "upstream_offer",
]
