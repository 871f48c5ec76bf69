"""Tokenizer of the expression language, in the style of pypa/packaging's ``_tokenizer``.

A table of named regexes, tried in order at the current position; every token keeps its position
so the parser can put a caret under whatever it rejects. Unlike packaging the whole text is
tokenized up front: the language has no context-dependent tokens, and scanning eagerly lets a
stray character be reported as such instead of as "expected X" at some later rule.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn

from milterbridge.expr.errors import ExpressionError

_NAME_END = r"(?![A-Za-z0-9_])"

# Order matters: the first rule that matches wins, so two-character operators come before their
# one-character prefixes, FLOAT before INT, and the keywords before IDENT. Digits and letters are
# spelt [0-9] and [A-Za-z] because \d and \w would accept non-ASCII digits and letters.
DEFAULT_RULES: dict[str, re.Pattern[str]] = {
    name: re.compile(pattern, re.DOTALL)
    for name, pattern in {
        "WS": r"[ \t\r\n]+",
        "LEFT_PAREN": r"\(",
        "RIGHT_PAREN": r"\)",
        "LEFT_BRACKET": r"\[",
        "RIGHT_BRACKET": r"\]",
        "COMMA": r",",
        "STRING": r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"",
        "FLOAT": r"[0-9]+\.[0-9]+(?:[eE][+-]?[0-9]+)?|[0-9]+[eE][+-]?[0-9]+",
        "INT": r"[0-9]+",
        "OR": r"\|\|",
        "AND": r"&&",
        "EQ": r"==",
        "NE": r"!=",
        "LE": r"<=",
        "GE": r">=",
        "LT": r"<",
        "GT": r">",
        "NOT": r"!",
        "STAR": r"\*",
        "SLASH": r"/",
        "PLUS": r"\+",
        "MINUS": r"-",
        "TRUE": r"true" + _NAME_END,
        "FALSE": r"false" + _NAME_END,
        "IDENT": r"[A-Za-z_][A-Za-z0-9_]*",
    }.items()
}

_HINTS = {"&": "&&", "|": "||", "=": "=="}

MAX_NESTING = 32
"""Deepest nesting of parentheses, brackets, calls and unary operators the parser accepts.

The parser is recursive; the limit turns a pathological expression into a compile error rather
than a RecursionError, and no sensible condition comes near it.
"""


@dataclass(frozen=True, slots=True)
class Token:
    """One token: its rule name, its exact source text and where that text starts."""

    name: str
    text: str
    position: int

    @property
    def end(self) -> int:
        """Position just past the token, so ``(position, end)`` is its span."""
        return self.position + len(self.text)


def tokenize(source: str, rules: dict[str, re.Pattern[str]] = DEFAULT_RULES) -> list[Token]:
    """Split ``source`` into tokens, whitespace dropped, ending with an empty ``END`` token.

    Raises ExpressionError at the first character no rule accepts.
    """
    tokens: list[Token] = []
    position = 0
    while position < len(source):
        for name, pattern in rules.items():
            match = pattern.match(source, position)
            if match:
                if name != "WS":
                    tokens.append(Token(name, match.group(), position))
                position = match.end()
                break
        else:
            char = source[position]
            if char in "'\"":
                raise ExpressionError(
                    "unterminated string", text=source, span=(position, len(source))
                )
            message = f"unexpected character {char!r}"
            if char in _HINTS:
                message += f" (did you mean {_HINTS[char]!r}?)"
            raise ExpressionError(message, text=source, span=(position, position + 1))
    tokens.append(Token("END", "", len(source)))
    return tokens


def unquote(text: str) -> str:
    """The value of a STRING token.

    A backslash escapes the backslash and both quote characters; any other backslash stays as it
    is, so a regex such as ``'\\d+\\.example'`` can be written without doubling every backslash.
    """
    return re.sub(r"\\([\\'\"])", r"\1", text[1:-1])


class Tokenizer:
    """The parser's cursor over the token list, with packaging's check/consume/expect interface."""

    def __init__(self, source: str, rules: dict[str, re.Pattern[str]] = DEFAULT_RULES) -> None:
        self.source = source
        self.tokens = tokenize(source, rules)
        self.index = 0
        self.nesting = 0

    @property
    def next_token(self) -> Token:
        """The token at the cursor (the END token once everything is read)."""
        return self.tokens[self.index]

    def check(self, *names: str) -> bool:
        """Whether the token at the cursor is one of ``names``; never moves the cursor."""
        return self.next_token.name in names

    def read(self) -> Token:
        """Return the token at the cursor and move past it (never past END)."""
        token = self.next_token
        if token.name != "END":
            self.index += 1
        return token

    def consume(self, *names: str) -> Token | None:
        """Read the token at the cursor if it is one of ``names``, else return None."""
        return self.read() if self.check(*names) else None

    def expect(self, name: str, *, expected: str) -> Token:
        """Read a token that must be ``name``; otherwise a syntax error saying ``expected``."""
        if not self.check(name):
            self.raise_syntax_error(f"expected {expected}")
        return self.read()

    def raise_syntax_error(
        self, message: str, *, span_start: int | None = None, span_end: int | None = None
    ) -> NoReturn:
        """Raise ExpressionError for ``message``, by default under the token at the cursor."""
        token = self.next_token
        start = token.position if span_start is None else span_start
        end = token.end if span_end is None else span_end
        raise ExpressionError(message, text=self.source, span=(start, end))

    @contextmanager
    def nested(self, token: Token) -> Iterator[None]:
        """Count one level of nesting opened by ``token`` (see MAX_NESTING)."""
        if self.nesting >= MAX_NESTING:
            self.raise_syntax_error(
                f"expression nested too deeply (more than {MAX_NESTING} levels)",
                span_start=token.position,
                span_end=token.end,
            )
        self.nesting += 1
        try:
            yield
        finally:
            self.nesting -= 1
