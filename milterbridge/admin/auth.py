"""Who may call ``/api``: bearer tokens from ``[[admin.token]]`` and their permissions.

The secrets are read once, when the API is built (as every other secret is read when the
configuration loads), and kept only as SHA-256 digests: a presented token is hashed and compared
with :func:`hmac.compare_digest` against every configured digest, without stopping at a match.
Comparing digests of equal length means neither the length of a secret nor the position of the
first wrong byte nor which entry matched shows in the time an answer takes.

A permission names a type and an operation (``sysMtaMilterGet``). A ``/get`` or ``/query`` needs
its one permission; a ``/set`` needs one for each kind of operation it carries, so that a token
allowed to create cannot destroy by slipping a ``destroy`` into the same call.

Guessing is slowed per client address (:class:`AuthFailures`): after :data:`MAX_AUTH_FAILURES`
failed authentications within :data:`AUTH_FAILURE_WINDOW` seconds, the address is answered 429
without its token being looked at until the oldest of those failures is a window old. It is per
address, so it slows one guesser rather than many (the listener is meant for loopback, where
there is one address): what it buys is that a weak token (a word someone chose) is not found in
an afternoon by a local process, and that a guesser costs at most one log line a second.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, cast

from ..config import AdminToken, Permission

#: The object types of the API, as written in method names (``x:MtaMilter/get``).
ObjectType = Literal["MtaMilter", "MtaHook"]
#: A ``/set`` operation, as written in its arguments.
SetOperation = Literal["create", "update", "destroy"]

_SET_PERMISSION: Mapping[SetOperation, str] = {
    "create": "Create",
    "update": "Update",
    "destroy": "Destroy",
}


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller a token stands for: its name (for logs) and what it may do."""

    name: str
    permissions: frozenset[Permission]

    def missing(self, needed: Collection[Permission]) -> list[Permission]:
        """The permissions in ``needed`` this caller lacks, in the order given."""
        return [permission for permission in needed if permission not in self.permissions]


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


class Authenticator:
    """Maps an ``Authorization`` header to the :class:`Principal` of the token it carries."""

    def __init__(self, tokens: Sequence[AdminToken]) -> None:
        self._entries = [
            (_digest(token.secret.reveal()), Principal(token.name, frozenset(token.permissions)))
            for token in tokens
        ]

    def __bool__(self) -> bool:
        """Whether any token is configured (none: the API is off)."""
        return bool(self._entries)

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The principal of a valid ``Bearer`` token; None for no header, another scheme or an
        unknown token (the caller answers 401 in every case)."""
        token = bearer_token(authorization)
        if token is None:
            return None
        presented = _digest(token)
        found: Principal | None = None
        for digest, principal in self._entries:
            # No early exit: every entry costs the same whether or not an earlier one matched.
            if hmac.compare_digest(presented, digest) and found is None:
                found = principal
        return found


#: Failed authentications from one address, within :data:`AUTH_FAILURE_WINDOW` seconds, after
#: which the address is answered 429.
MAX_AUTH_FAILURES: Final = 10
AUTH_FAILURE_WINDOW: Final = 60.0
#: At most one ``admin_auth_failed`` line per address per this many seconds.
AUTH_LOG_INTERVAL: Final = 1.0
#: Addresses remembered at once. Beyond it the one that failed longest ago is forgotten: a
#: flood from many addresses costs bounded memory (and can only make the limit forget).
MAX_TRACKED_CLIENTS: Final = 4096


@dataclass(slots=True)
class _Client:
    #: When its last (up to MAX_AUTH_FAILURES) failures happened, oldest first.
    failures: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_AUTH_FAILURES))
    #: When its last log line was written.
    logged_at: float | None = None
    #: Refused attempts since that line.
    unlogged: int = 0


class AuthFailures:
    """Refused authentications per client address: when to answer 429, when to log a line.

    Args:
        clock: seconds from any origin that never goes back (``trio.current_time`` in the
            service, so that tests drive it with trio's clocks).
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._clients: dict[str, _Client] = {}

    def retry_after(self, client: str) -> float | None:
        """Seconds until ``client`` may present a token again; None when it may now."""
        entry = self._clients.get(client)
        if entry is None or len(entry.failures) < MAX_AUTH_FAILURES:
            return None
        wait = entry.failures[0] + AUTH_FAILURE_WINDOW - self._clock()
        return wait if wait > 0 else None

    def refused(self, client: str, *, failed: bool) -> int | None:
        """Count a refused attempt from ``client``: ``failed`` when its token was checked and
        wrong (it counts towards the limit), not when it was answered 429 unchecked.

        Returns:
            How many refused attempts a log line written now stands for (this one included),
            or None when the address had a line less than :data:`AUTH_LOG_INTERVAL` ago.
        """
        now = self._clock()
        entry = self._clients.pop(client, None) or self._new_entry(now)
        self._clients[client] = entry  # last in the dict: the most recently refused
        if failed:
            entry.failures.append(now)
        entry.unlogged += 1
        if entry.logged_at is not None and now - entry.logged_at < AUTH_LOG_INTERVAL:
            return None
        count, entry.unlogged, entry.logged_at = entry.unlogged, 0, now
        return count

    def _new_entry(self, now: float) -> _Client:
        if len(self._clients) >= MAX_TRACKED_CLIENTS:
            stale = [
                client
                for client, entry in self._clients.items()
                if not entry.failures or entry.failures[-1] <= now - AUTH_FAILURE_WINDOW
            ]
            for client in stale:
                del self._clients[client]
            if len(self._clients) >= MAX_TRACKED_CLIENTS:
                del self._clients[next(iter(self._clients))]
        return _Client()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme in any case)."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def permission(object_type: ObjectType, operation: str) -> Permission:
    """``sysMtaMilterGet`` from ``("MtaMilter", "Get")``."""
    return cast(Permission, f"sys{object_type}{operation}")


def method_permissions(
    object_type: ObjectType, method: str, operations: Collection[SetOperation] = ()
) -> list[Permission]:
    """What a call needs: ``get`` and ``query`` their own permission; ``set`` one per kind of
    operation in ``operations`` (an empty ``set`` any one of the three, so that a token with no
    write permission learns nothing from it)."""
    if method == "get":
        return [permission(object_type, "Get")]
    if method == "query":
        return [permission(object_type, "Query")]
    if method != "set":
        raise ValueError(f"no permission for method {method!r}")
    return [permission(object_type, _SET_PERMISSION[op]) for op in operations]


def may_set_something(principal: Principal, object_type: ObjectType) -> bool:
    """Whether the principal holds any of the three ``/set`` permissions of the type."""
    return any(
        permission(object_type, operation) in principal.permissions
        for operation in _SET_PERMISSION.values()
    )


__all__ = [
    "AUTH_FAILURE_WINDOW",
    "AUTH_LOG_INTERVAL",
    "MAX_AUTH_FAILURES",
    "MAX_TRACKED_CLIENTS",
    "AuthFailures",
    "Authenticator",
    "ObjectType",
    "Principal",
    "SetOperation",
    "bearer_token",
    "may_set_something",
    "method_permissions",
    "permission",
]
