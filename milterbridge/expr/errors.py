"""Errors of the ``enable`` expression language.

Expressions are written by people in a configuration file, and the file is checked when it is
loaded (``check-config``), so an error has to point at the offending part of the expression, not
only describe it: every error keeps the expression text and the span of the bad part and prints
them the way pypa/packaging's ``ParserSyntaxError`` does, with a caret line under the span.
"""

from __future__ import annotations


class ExpressionError(Exception):
    """An expression that cannot be compiled: a syntax error, an unknown name, a wrong number of
    arguments, a bad regex or CIDR literal.

    ``span`` is ``(start, end)`` in ``text``, end exclusive; an empty span (``start == end``)
    points between two characters, e.g. at the end of the text when something is missing.
    """

    def __init__(self, message: str, *, text: str, span: tuple[int, int]) -> None:
        super().__init__(message)
        self.message = message
        self.text = text
        self.span = span

    def caret(self) -> str:
        """The line of the expression that holds the span and the marker line under it.

        Only that line is shown, so a multi-line TOML string still gets a marker that lines up;
        the marker is ``~`` under the span and ``^`` under its last character.
        """
        start, end = self.span
        line_start = self.text.rfind("\n", 0, start) + 1
        line_end = self.text.find("\n", start)
        if line_end == -1:
            line_end = len(self.text)
        line = self.text[line_start:line_end]
        column = start - line_start
        width = max(min(end, line_end) - start, 1)
        marker = " " * column + "~" * (width - 1) + "^"
        return f"    {line}\n    {marker}"

    def __str__(self) -> str:
        return f"{self.message}\n{self.caret()}"


class RuleError(ExpressionError):
    """An expression of a ``{match = [{if, then}], else}`` table that cannot be compiled.

    ``index`` is the rule's position in ``match`` (None for ``else``) and ``part`` is ``"if"``,
    ``"then"`` or ``"else"``, so the configuration loader can name the key, e.g.
    ``milter[1].enable.match[0].if``; ``location`` is that key relative to the table.
    """

    def __init__(self, error: ExpressionError, *, index: int | None, part: str) -> None:
        super().__init__(error.message, text=error.text, span=error.span)
        self.index = index
        self.part = part

    @property
    def location(self) -> str:
        """``match[N].if``, ``match[N].then`` or ``else``."""
        return self.part if self.index is None else f"match[{self.index}].{self.part}"

    def __str__(self) -> str:
        return f"{self.location}: {self.message}\n{self.caret()}"
