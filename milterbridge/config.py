"""The configuration file: TOML decoded by msgspec into frozen Structs.

Keys are camelCase to match the reference objects; unknown keys are errors (a typo must not
silently fall back to a default); every error names the file and the key path. An empty file --
or no file at all -- is the embedded default: listen on inet:127.0.0.1:8899, no filters.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import msgspec

from .listeners import ListenerSpecError, parse_listener

DEFAULT_LISTEN = "inet:127.0.0.1:8899"


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the file and key path."""


class Base(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, rename="camel"):
    """Shared policy: immutable, keyword-only, typo-proof, camelCase keys."""


class ServerConfig(Base, frozen=True):
    """``[server]``: the milter listeners the MTA connects to."""

    listen: Annotated[list[str], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: [DEFAULT_LISTEN]
    )
    #: Permissions of unix: sockets, octal as in chmod.
    socket_mode: Annotated[str, msgspec.Meta(pattern=r"^0?[0-7]{3}$")] = "0660"

    def __post_init__(self) -> None:
        for spec in self.listen:
            try:
                parse_listener(spec)
            except ListenerSpecError as exc:
                raise ValueError(f"listen: {exc}") from None


class Config(Base, frozen=True):
    """The whole file."""

    server: ServerConfig = msgspec.field(default_factory=ServerConfig)


EMBEDDED_DEFAULT = Config()

_PATH = re.compile(r" - at `\$\.?(.*)`$")


def _describe(path: Path, exc: msgspec.MsgspecError) -> str:
    message = str(exc)
    match = _PATH.search(message)
    if match is None:
        where = "(top level): " if isinstance(exc, msgspec.ValidationError) else ""
        return f"{path}: {where}{message}"
    key = match.group(1) or "(top level)"
    return f"{path}: {key}: {message[: match.start()]}"


def parse_config(data: bytes | str, path: Path) -> Config:
    """Decode a config document; ``path`` only names it in errors."""
    try:
        return msgspec.toml.decode(data, type=Config)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ConfigError(_describe(path, exc)) from None


def load_config(path: Path) -> Config:
    """Read and validate a config file. Raises ConfigError for every problem, I/O included."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_config(data, path)
