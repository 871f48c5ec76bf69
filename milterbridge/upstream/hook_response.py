"""The JSON answer of an HTTP hook, decoded and checked before the session acts on it.

The shape is the MTA Hooks reference's: ``action``, an optional ``response`` (the SMTP reply) and
optional ``modifications``. Both spellings seen in the wild are accepted where the reference and
its examples disagree (``enhancedStatus``/``enhanced_status``, ``addRcpt``/``addRecipient``,
``deleteRcpt``/``deleteRecipient``). Keys this version does not know are ignored, so a hook
written for a newer MTA still works; everything that is there must be right, though: a wrong
type, an unknown action or modification type, a negative index, or a value the milter packets
cannot carry (a header name that is not a plain RFC 5322 field name, a line break or NUL where
the MTA would misread it) is a ``HookResponseError``, which the client reports as the hook's
failure -- an edit we cannot carry out exactly must not be carried out approximately.

Error texts end up in a log line, so they never quote more than a short piece of any value.
``HookResponseError`` is defined next to the code that turns a response into milter edits
(engine/hook_answer.py, which raises it too, for a header index that does not fit) and is the
same class here. Each modification hands itself to that code's ``EditBuilder`` (``apply_to``), so
the engine needs no import from this package.
"""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal

import msgspec

from ..engine.hook_answer import EditBuilder, HookResponseError, ParameterValue

#: A header field name: printable ASCII without ':' (RFC 5322 ftext).
_FIELD_NAME: Final = re.compile(r"[!-9;-~]+")
#: An ESMTP keyword (RFC 5321 esmtp-keyword).
_ESMTP_KEYWORD: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
#: What an ESMTP value cannot hold: whitespace, controls, '=' (RFC 5321 esmtp-value).
_ESMTP_VALUE_BAD: Final = re.compile(r"[\x00-\x20\x7f=]")
#: How much of a value an error message quotes.
QUOTE_MAX: Final = 60


def shorten(text: str, limit: int = QUOTE_MAX) -> str:
    """``text`` cut to ``limit`` characters (marked), for quoting in an error message."""
    return text if len(text) <= limit else text[:limit] + "..."


def _quote(text: str) -> str:
    return repr(shorten(text))


# --- checks run by msgspec while decoding (a ValueError becomes a ValidationError with a path) --


def _check_name(name: str) -> None:
    if not _FIELD_NAME.fullmatch(name):
        raise ValueError(f"header name {_quote(name)} is not a valid field name")


def _check_value(value: str, what: str = "header value") -> None:
    for bad, label in (("\0", "a NUL"), ("\r", "a CR"), ("\n", "a LF")):
        if bad in value:
            raise ValueError(f"{what} {_quote(value)} contains {label}")


def _check_address(value: str) -> None:
    if any(c in value for c in "\0\r\n"):
        raise ValueError(f"address {_quote(value)} contains a control character")


#: A parameter value as a hook may give it: text or a number is ``KEY=VALUE``, true is the
#: keyword alone, false or null leaves the keyword out.
Parameter = ParameterValue


def _check_parameters(parameters: dict[str, Parameter] | None) -> None:
    for key, value in (parameters or {}).items():
        if not _ESMTP_KEYWORD.fullmatch(key):
            raise ValueError(f"parameter name {_quote(key)} is not an ESMTP keyword")
        if isinstance(value, str) and (not value or _ESMTP_VALUE_BAD.search(value)):
            raise ValueError(
                f"parameter {shorten(key)} value {_quote(value)} is empty or holds a space, "
                "control character or '='"
            )


# --- the document -------------------------------------------------------------------------------


class ReplyDetails(msgspec.Struct, frozen=True):
    """``response``: the SMTP reply the hook wants the client to see."""

    status: int | None = None
    enhanced_status_camel: str | None = msgspec.field(default=None, name="enhancedStatus")
    enhanced_status_snake: str | None = msgspec.field(default=None, name="enhanced_status")
    message: str | None = None
    disconnect: bool | None = None

    def __post_init__(self) -> None:
        if self.message is not None and "\0" in self.message:
            raise ValueError("message contains a NUL")

    @property
    def enhanced_status(self) -> str | None:
        """The enhanced status code, whichever spelling carried it (camelCase first)."""
        if self.enhanced_status_camel is not None:
            return self.enhanced_status_camel
        return self.enhanced_status_snake


class _Modification(msgspec.Struct, frozen=True, tag_field="type"):
    """One entry of ``modifications``, told apart by its ``type``."""


class _AddressEdit(_Modification, frozen=True):
    """An envelope address with optional ESMTP parameters."""

    value: str
    parameters: dict[str, Parameter] | None = None

    def __post_init__(self) -> None:
        _check_address(self.value)
        _check_parameters(self.parameters)


class ChangeFrom(_AddressEdit, frozen=True, tag="changeFrom"):
    def apply_to(self, builder: EditBuilder) -> None:
        builder.change_from(self.value, self.parameters)


class AddRcpt(_AddressEdit, frozen=True, tag="addRcpt"):
    def apply_to(self, builder: EditBuilder) -> None:
        builder.add_rcpt(self.value, self.parameters)


class AddRecipient(AddRcpt, frozen=True, tag="addRecipient"):
    """The reference example's spelling of ``addRcpt``."""


class DeleteRcpt(_Modification, frozen=True, tag="deleteRcpt"):
    value: str

    def __post_init__(self) -> None:
        _check_address(self.value)

    def apply_to(self, builder: EditBuilder) -> None:
        builder.delete_rcpt(self.value)


class DeleteRecipient(DeleteRcpt, frozen=True, tag="deleteRecipient"):
    """The reference example's spelling of ``deleteRcpt``."""


class ReplaceContents(_Modification, frozen=True, tag="replaceContents"):
    value: str

    def apply_to(self, builder: EditBuilder) -> None:
        builder.replace_contents(self.value)


class AddHeader(_Modification, frozen=True, tag="addHeader"):
    name: str
    value: str

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_value(self.value)

    def apply_to(self, builder: EditBuilder) -> None:
        builder.add_header(self.name, self.value)


Index = Annotated[int, msgspec.Meta(ge=0)]


class _HeaderAt(_Modification, frozen=True):
    """A header field given with its position in the list the hook was sent."""

    index: Index
    name: str
    value: str

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_value(self.value)


class InsertHeader(_HeaderAt, frozen=True, tag="insertHeader"):
    def apply_to(self, builder: EditBuilder) -> None:
        builder.insert_header(self.index, self.name, self.value)


class ChangeHeader(_HeaderAt, frozen=True, tag="changeHeader"):
    def apply_to(self, builder: EditBuilder) -> None:
        builder.change_header(self.index, self.name, self.value)


class DeleteHeader(_Modification, frozen=True, tag="deleteHeader"):
    index: Index
    name: str

    def __post_init__(self) -> None:
        _check_name(self.name)

    def apply_to(self, builder: EditBuilder) -> None:
        builder.delete_header(self.index, self.name)


Modification = (
    ChangeFrom
    | AddRcpt
    | AddRecipient
    | DeleteRcpt
    | DeleteRecipient
    | ReplaceContents
    | AddHeader
    | InsertHeader
    | ChangeHeader
    | DeleteHeader
)

Action = Literal["accept", "discard", "reject", "quarantine"]


class HookResponse(msgspec.Struct, frozen=True):
    """A hook's whole answer."""

    action: Action
    response: ReplyDetails | None = None
    modifications: list[Modification] | None = None

    @property
    def edits(self) -> list[Modification]:
        return self.modifications or []


_decoder: Final = msgspec.json.Decoder(HookResponse)

# msgspec quotes offending values in some messages ("Invalid enum value 'xyz...'").
_QUOTED: Final = re.compile(rf"'([^']{{{QUOTE_MAX}}})[^']+'")


def decode_response(data: bytes) -> HookResponse:
    """The hook's answer, or HookResponseError saying what is wrong and where."""
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise HookResponseError(f"invalid hook response: {_short_message(exc)}") from None
    except msgspec.DecodeError as exc:
        raise HookResponseError(f"hook response is not JSON: {_short_message(exc)}") from None
    except UnicodeDecodeError as exc:
        # msgspec raises this (not DecodeError) for a string that is not UTF-8 (found by
        # fuzzing: tests/fuzz/fuzz_hook_answer.py).
        raise HookResponseError(f"hook response is not UTF-8 JSON: {exc.reason}") from None


def _short_message(exc: Exception) -> str:
    text = _QUOTED.sub(lambda m: f"'{m.group(1)}...'", str(exc))
    return shorten(text, 300)


__all__ = [
    "QUOTE_MAX",
    "Action",
    "AddHeader",
    "AddRcpt",
    "AddRecipient",
    "ChangeFrom",
    "ChangeHeader",
    "DeleteHeader",
    "DeleteRcpt",
    "DeleteRecipient",
    "HookResponse",
    "HookResponseError",
    "InsertHeader",
    "Modification",
    "ReplaceContents",
    "ReplyDetails",
    "decode_response",
    "shorten",
]
