"""What one message did, for its canonical log line and its metrics (design §11).

A session keeps one :class:`MessageReport` per message, from MAIL to its end (end-of-message, an
early refusal, an abort or the connection's end), fills it as filters answer, and logs it as one
``message_end`` line: who sent what to how many, each filter's last verdict, time and error, the
final verdict and the edits by kind. Never message content, never a secret: addresses and the
HELO name are the envelope, which mail logs carry anyway.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..milter import (
    AddHeader,
    AddRcpt,
    AddRcptPar,
    ChangeFrom,
    ChangeHeader,
    DelRcpt,
    InsertHeader,
    Quarantine,
    ReplaceBody,
    Reply,
)


def edit_kind(edit: Reply) -> str | None:
    """The ``kind`` label of an edit packet (None for what is not an edit)."""
    match edit:
        case AddHeader():
            return "add_header"
        case InsertHeader():
            return "insert_header"
        case ChangeHeader(value=value):
            return "change_header" if value else "delete_header"
        case ChangeFrom():
            return "change_from"
        case AddRcpt() | AddRcptPar():
            return "add_rcpt"
        case DelRcpt():
            return "delete_rcpt"
        case ReplaceBody():
            return "replace_body"
        case Quarantine():
            return "quarantine"
    return None


def edit_counts(edits: Iterable[Reply]) -> Counter[str]:
    """Edits by kind; a body replaced in several chunks counts once."""
    counts: Counter[str] = Counter()
    body = False
    for edit in edits:
        kind = edit_kind(edit)
        if kind == "replace_body":
            if body:
                continue
            body = True
        if kind is not None:
            counts[kind] += 1
    return counts


@dataclass
class FilterRecord:
    """One filter's part in a message."""

    verdict: str | None = None
    seconds: float = 0.0
    error: str | None = None


@dataclass
class MessageReport:
    """One message's canonical record."""

    started: float
    filters: dict[str, FilterRecord] = field(default_factory=dict)
    edits: Counter[str] = field(default_factory=Counter)

    def answered(self, name: str, verdict: str, seconds: float) -> None:
        record = self.filters.setdefault(name, FilterRecord())
        record.verdict = verdict
        record.seconds += seconds

    def failed(self, name: str, kind: str) -> None:
        record = self.filters.setdefault(name, FilterRecord())
        record.verdict = "error"
        record.error = kind

    def fields(self) -> dict[str, Any]:
        """The per-filter and edit fields of the log line."""
        return {
            "filters": {
                name: {
                    "verdict": record.verdict,
                    "seconds": round(record.seconds, 6),
                    **({"error": record.error} if record.error else {}),
                }
                for name, record in self.filters.items()
            },
            "edits": dict(self.edits),
        }
