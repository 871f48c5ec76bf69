"""Durations (``"30s"``) and sizes (``"50MB"``) as they are written in the config file.

Both are subclasses of the built-in number they stand for, so code that uses them needs no
conversion: a :class:`Duration` is a ``float`` of seconds (``trio.move_on_after(timeout)``), a
:class:`Size` is an ``int`` of bytes. msgspec does not know them; pass :func:`dec_hook` when
decoding and :func:`enc_hook` when encoding (which writes them back in the config's notation).
"""

from __future__ import annotations

import math
import re
from typing import Any

_DURATION = re.compile(r"(\d+(?:\.\d+)?) *(ms|s|m|h)")
_SECONDS_PER_UNIT = {"s": 1, "m": 60, "h": 3600}

# KB/MB/GB are decimal (powers of 1000) as in the SI; KiB/MiB/GiB are binary (powers of 1024).
_SIZE = re.compile(r"(\d+) *(B|KB|MB|GB|KiB|MiB|GiB)")
_BYTES_PER_UNIT = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
}


class Duration(float):
    """A length of time in seconds, finite and greater than zero.

    Parsed from ``"500ms"``, ``"30s"``, ``"2m"``, ``"1h"`` (a decimal number is allowed before
    the unit: ``"1.5s"``) or from a bare number of seconds.
    """

    __slots__ = ()

    def __new__(cls, seconds: float) -> Duration:
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise TypeError(f"a duration is a number of seconds, not {type(seconds).__name__}")
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(
                f"duration must be a finite number of seconds greater than 0, got {seconds!r}"
            )
        return super().__new__(cls, seconds)

    @classmethod
    def parse(cls, value: object) -> Duration:
        """Read a config value: a string with a unit, or a number of seconds."""
        if isinstance(value, str):
            match = _DURATION.fullmatch(value)
            if match is None:
                raise ValueError(
                    f"invalid duration {value!r}: write a number and a unit ms, s, m or h "
                    "(e.g. '500ms', '30s', '2m') or a number of seconds"
                )
            number, unit = match.groups()
            if unit == "ms":
                seconds = float(number) / 1000
            else:
                seconds = float(number) * _SECONDS_PER_UNIT[unit]
            if seconds <= 0:
                raise ValueError(f"duration must be greater than 0, got {value!r}")
            return cls(seconds)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(
                f"Expected a duration such as '30s' or a number of seconds, "
                f"got `{type(value).__name__}`"
            )
        return cls(value)

    def __str__(self) -> str:
        """Config notation: whole seconds as ``"30s"``, else ``"500ms"`` when exact."""
        seconds = float(self)
        if seconds.is_integer():
            return f"{int(seconds)}s"
        millis = round(seconds * 1000)
        if millis / 1000 == seconds:
            return f"{millis}ms"
        return f"{seconds!r}s"

    def __repr__(self) -> str:
        return f"Duration({str(self)!r})"


class Size(int):
    """A number of bytes, at least 1.

    Parsed from an integer or from ``"512KB"``, ``"50MB"``, ``"1GB"`` (powers of 1000) or
    ``"10KiB"``, ``"1MiB"``, ``"1GiB"`` (powers of 1024); ``"100B"`` is 100 bytes.
    """

    __slots__ = ()

    def __new__(cls, size: int) -> Size:
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"a size is a whole number of bytes, not {type(size).__name__}")
        if size < 1:
            raise ValueError(f"size must be at least 1 byte, got {size}")
        return super().__new__(cls, size)

    @classmethod
    def parse(cls, value: object) -> Size:
        """Read a config value: an integer of bytes, or a string with a unit."""
        if isinstance(value, str):
            match = _SIZE.fullmatch(value)
            if match is None:
                raise ValueError(
                    f"invalid size {value!r}: write a whole number of bytes or a number and a "
                    "unit B, KB, MB, GB (powers of 1000) or KiB, MiB, GiB (powers of 1024)"
                )
            number, unit = match.groups()
            size = int(number) * _BYTES_PER_UNIT[unit]
            if size < 1:
                raise ValueError(f"size must be at least 1 byte, got {value!r}")
            return cls(size)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(
                f"Expected a size such as '50MB' or a whole number of bytes, "
                f"got `{type(value).__name__}`"
            )
        return cls(value)

    def __repr__(self) -> str:
        return f"Size({int(self)})"


def dec_hook(type_: type, obj: Any) -> Any:
    """msgspec ``dec_hook`` for :class:`Duration` and :class:`Size` fields."""
    if type_ is Duration:
        return Duration.parse(obj)
    if type_ is Size:
        return Size.parse(obj)
    raise NotImplementedError(f"cannot decode {type_!r}")


def enc_hook(obj: Any) -> Any:
    """msgspec ``enc_hook``: a Duration as its config string, a Size as an integer."""
    if isinstance(obj, Duration):
        return str(obj)
    if isinstance(obj, Size):
        return int(obj)
    raise NotImplementedError(f"cannot encode {type(obj)!r}")
