"""The tokenizer: every token kind, positions, and the characters it refuses."""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from milterbridge.expr import ExpressionError
from milterbridge.expr.tokenizer import MAX_NESTING, Token, Tokenizer, tokenize, unquote


def kinds(source: str) -> list[tuple[str, str]]:
    return [(token.name, token.text) for token in tokenize(source)]


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("(", "LEFT_PAREN"),
        (")", "RIGHT_PAREN"),
        ("[", "LEFT_BRACKET"),
        ("]", "RIGHT_BRACKET"),
        (",", "COMMA"),
        ("'a b'", "STRING"),
        ('"a b"', "STRING"),
        ("''", "STRING"),
        ("'it\\'s'", "STRING"),
        ('"say \\"hi\\""', "STRING"),
        ("'a\\\\'", "STRING"),
        ("1.5", "FLOAT"),
        ("1.5e3", "FLOAT"),
        ("2E-3", "FLOAT"),
        ("42", "INT"),
        ("||", "OR"),
        ("&&", "AND"),
        ("==", "EQ"),
        ("!=", "NE"),
        ("<=", "LE"),
        (">=", "GE"),
        ("<", "LT"),
        (">", "GT"),
        ("!", "NOT"),
        ("*", "STAR"),
        ("/", "SLASH"),
        ("+", "PLUS"),
        ("-", "MINUS"),
        ("true", "TRUE"),
        ("false", "FALSE"),
        ("sender_domain", "IDENT"),
        ("_x9", "IDENT"),
        ("trueish", "IDENT"),
        ("false_", "IDENT"),
    ],
)
def test_every_token_kind(source: str, name: str) -> None:
    assert kinds(source) == [(name, source), ("END", "")]


def test_positions_and_whitespace() -> None:
    tokens = tokenize("  len(sender)\n\t>= 3 ")
    assert tokens == [
        Token("IDENT", "len", 2),
        Token("LEFT_PAREN", "(", 5),
        Token("IDENT", "sender", 6),
        Token("RIGHT_PAREN", ")", 12),
        Token("GE", ">=", 15),
        Token("INT", "3", 18),
        Token("END", "", 20),
    ]
    assert tokens[2].end == 12


def test_longest_operators_win() -> None:
    assert [t.name for t in tokenize("a<=b!=!c||-1")] == [
        "IDENT", "LE", "IDENT", "NE", "NOT", "IDENT", "OR", "MINUS", "INT", "END",
    ]  # fmt: skip


def test_number_then_name_are_two_tokens() -> None:
    # The parser refuses "1abc"; the tokenizer just splits it.
    assert kinds("1abc") == [("INT", "1"), ("IDENT", "abc"), ("END", "")]
    with pytest.raises(ExpressionError, match=r"unexpected character '\.'"):
        tokenize("1.")


@pytest.mark.parametrize(
    ("source", "message", "span"),
    [
        ("a & b", "unexpected character '&' (did you mean '&&'?)", (2, 3)),
        ("a | b", "unexpected character '|' (did you mean '||'?)", (2, 3)),
        ("a = b", "unexpected character '=' (did you mean '=='?)", (2, 3)),
        ("a % b", "unexpected character '%'", (2, 3)),
        ("é", "unexpected character 'é'", (0, 1)),
        ("1 + ٣", "unexpected character '٣'", (4, 5)),
        ("x == 'abc", "unterminated string", (5, 9)),
        ('"abc\\"', "unterminated string", (0, 6)),
    ],
)
def test_bad_characters(source: str, message: str, span: tuple[int, int]) -> None:
    with pytest.raises(ExpressionError) as info:
        tokenize(source)
    assert info.value.message == message
    assert info.value.span == span
    assert info.value.text == source


@pytest.mark.parametrize(
    ("literal", "value"),
    [
        ("'plain'", "plain"),
        ("'it\\'s'", "it's"),
        ('"say \\"hi\\""', 'say "hi"'),
        ("'back\\\\slash'", "back\\slash"),
        ("'\\d+\\.example'", "\\d+\\.example"),  # other backslashes stay, for regexes
        ("'mixed \"quotes\"'", 'mixed "quotes"'),
    ],
)
def test_unquote(literal: str, value: str) -> None:
    (token, _end) = tokenize(literal)
    assert token.name == "STRING"
    assert unquote(token.text) == value


def test_cursor_check_consume_expect() -> None:
    tokenizer = Tokenizer("( x")
    assert tokenizer.check("LEFT_PAREN", "INT")
    assert tokenizer.consume("INT") is None
    assert tokenizer.consume("LEFT_PAREN") == Token("LEFT_PAREN", "(", 0)
    assert tokenizer.read() == Token("IDENT", "x", 2)
    assert tokenizer.read() == Token("END", "", 3)
    assert tokenizer.read() == Token("END", "", 3)  # never moves past END
    with pytest.raises(ExpressionError) as info:
        tokenizer.expect("RIGHT_PAREN", expected="')'")
    assert str(info.value) == "expected ')'\n    ( x\n       ^"


def test_nesting_limit() -> None:
    tokenizer = Tokenizer("(")
    token = tokenizer.next_token
    with ExitStack() as stack:
        for _ in range(MAX_NESTING):
            stack.enter_context(tokenizer.nested(token))
        with pytest.raises(ExpressionError, match="nested too deeply"):
            stack.enter_context(tokenizer.nested(token))
    assert tokenizer.nesting == 0
