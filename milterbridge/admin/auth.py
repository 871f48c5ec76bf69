"""Who may call ``/api``: bearer tokens from ``[[admin.token]]`` and their permissions.

The secrets are read once, when the API is built (as every other secret is read when the
configuration loads), and kept only as SHA-256 digests: a presented token is hashed and compared
with :func:`hmac.compare_digest` against every configured digest, without stopping at a match.
Comparing digests of equal length means neither the length of a secret nor the position of the
first wrong byte nor which entry matched shows in the time an answer takes.

A permission names a type and an operation (``sysMtaMilterGet``). A ``/get`` or ``/query`` needs
its one permission; a ``/set`` needs one for each kind of operation it carries, so that a token
allowed to create cannot destroy by slipping a ``destroy`` into the same call.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, cast

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
    "Authenticator",
    "ObjectType",
    "Principal",
    "SetOperation",
    "bearer_token",
    "may_set_something",
    "method_permissions",
    "permission",
]
