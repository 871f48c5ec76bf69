"""The parser: precedence, associativity, node spans, and every error with its caret."""

from __future__ import annotations

import pytest

from milterbridge.expr import ExpressionError
from milterbridge.expr.parser import (
    Binary,
    Call,
    ListLiteral,
    Literal,
    Unary,
    Variable,
    parse_expression,
)
from milterbridge.expr.tokenizer import MAX_NESTING


def shape(source: str) -> str:
    """The fully parenthesized form, which shows how the parser grouped things."""
    return str(parse_expression(source))


@pytest.mark.parametrize(
    ("source", "grouped"),
    [
        # each level against the next looser one
        ("-1 * 2", "((-1) * 2)"),
        ("!sender * 2", "((!sender) * 2)"),
        ("1 + 2 * 3", "(1 + (2 * 3))"),
        ("1 * 2 + 3", "((1 * 2) + 3)"),
        ("1 - 6 / 3", "(1 - (6 / 3))"),
        ("1 + 2 < 3 - 4", "((1 + 2) < (3 - 4))"),
        ("1 < 2 == 3 >= 4", "((1 < 2) == (3 >= 4))"),
        ("sender == 1 && rcpt != 2", "((sender == 1) && (rcpt != 2))"),
        ("sender && rcpt || listener && queue_id", "((sender && rcpt) || (listener && queue_id))"),
        ("sender || rcpt && listener", "(sender || (rcpt && listener))"),
        ("!sender == rcpt", "((!sender) == rcpt)"),
        ("!(sender == rcpt)", "(!(sender == rcpt))"),
        ("--1", "(-(-1))"),
        ("!!sender", "(!(!sender))"),
        ("(1 + 2) * 3", "((1 + 2) * 3)"),
        ("len(sender) + 1 > 2", "((len(sender) + 1) > 2)"),
        ("[1, 2 + 3] == []", "([1, (2 + 3)] == [])"),
        ("sender + 'x' <= \"y\"", "((sender + 'x') <= 'y')"),
    ],
)
def test_precedence(source: str, grouped: str) -> None:
    assert shape(source) == grouped


@pytest.mark.parametrize(
    ("source", "grouped"),
    [
        ("1 - 2 - 3", "((1 - 2) - 3)"),
        ("8 / 4 / 2", "((8 / 4) / 2)"),
        ("1 + 2 - 3 + 4", "(((1 + 2) - 3) + 4)"),
        ("2 * 3 / 4 * 5", "(((2 * 3) / 4) * 5)"),
        ("true && false && true", "((true && false) && true)"),
        ("true || false || true", "((true || false) || true)"),
        ("'a' + 'b' + 'c'", "(('a' + 'b') + 'c')"),
    ],
)
def test_left_associativity(source: str, grouped: str) -> None:
    assert shape(source) == grouped


def test_literals_and_nodes() -> None:
    assert parse_expression("'it\\'s'") == Literal("it's", (0, 7))
    assert parse_expression("12") == Literal(12, (0, 2))
    assert parse_expression("1.25") == Literal(1.25, (0, 4))
    assert parse_expression("true") == Literal(True, (0, 4))
    assert parse_expression("false") == Literal(False, (0, 5))
    assert parse_expression("[]") == ListLiteral((), (0, 2))
    assert parse_expression("[1,]") == ListLiteral((Literal(1, (1, 2)),), (0, 4))
    assert parse_expression("recipients") == Variable("recipients", (0, 10))
    assert parse_expression("-1") == Unary("-", Literal(1, (1, 2)), (0, 2))
    assert parse_expression(" ( 1 ) ") == Literal(1, (3, 4))
    assert parse_expression("1 + 2") == Binary("+", Literal(1, (0, 1)), Literal(2, (4, 5)), (0, 5))
    assert parse_expression("trim( sender )") == Call(
        "trim", (Variable("sender", (6, 12)),), (0, 14)
    )
    assert str(parse_expression("[[1], 'a\\\\b']")) == "[[1], 'a\\\\b']"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("", "expected an expression"),
        ("   ", "expected an expression"),
        ("1 +", "expected a value at the end of the expression"),
        ("1 2", "expected an operator or the end of the expression"),
        ("1abc", "expected an operator or the end of the expression"),
        ("(1", "expected ')' to close the '(' opened before"),
        ("1)", "expected an operator or the end of the expression"),
        ("[1, 2", "expected ',' or ']' to close the list"),
        ("[1 2]", "expected ',' or ']' to close the list"),
        ("[,]", "expected a value, not ','"),
        ("len(sender", "expected ',' or ')' to close the call"),
        ("len(sender,)", "expected a value, not ')'"),
        ("* 2", "expected a value, not '*'"),
        ("sendr", "unknown variable 'sendr'"),
        ("trim", "unknown variable 'trim' (a function needs parentheses)"),
        ("lenght(sender)", "unknown function 'lenght'"),
        ("len()", "len() takes 1 argument (0 given)"),
        ("contains(sender)", "contains() takes 2 arguments (1 given)"),
        ("1 < 2 < 3", "comparisons cannot be chained; combine them with && or use parentheses"),
        ("1 == 2 != 3", "comparisons cannot be chained; combine them with && or use parentheses"),
        ("9" * 5000, "integer too long"),
    ],
)
def test_errors(source: str, message: str) -> None:
    with pytest.raises(ExpressionError) as info:
        parse_expression(source)
    assert info.value.message == message
    assert info.value.text == source


@pytest.mark.parametrize(
    ("source", "printed"),
    [
        (
            "sendr == 'a'",
            "unknown variable 'sendr'\n    sendr == 'a'\n    ~~~~^",
        ),
        (
            "is_empty(sender) && len(rcpt, 2) > 1",
            "len() takes 1 argument (2 given)\n"
            "    is_empty(sender) && len(rcpt, 2) > 1\n"
            "                        ~~~~~~~~~~~^",
        ),
        (
            "sender == ",
            "expected a value at the end of the expression\n    sender == \n              ^",
        ),
        (
            "(sender == 'a'",
            "expected ')' to close the '(' opened before\n    (sender == 'a'\n                  ^",
        ),
        (
            "1 < 2 < 3",
            "comparisons cannot be chained; combine them with && or use parentheses\n"
            "    1 < 2 < 3\n"
            "          ^",
        ),
        (
            # Only the line holding the error is shown, so the caret lines up.
            "sender == 'a'\n  && rcp == 'b'",
            "unknown variable 'rcp'\n      && rcp == 'b'\n         ~~^",
        ),
    ],
)
def test_caret_output(source: str, printed: str) -> None:
    with pytest.raises(ExpressionError) as info:
        parse_expression(source)
    assert str(info.value) == printed


def test_nesting_limit() -> None:
    parse_expression("(" * MAX_NESTING + "1" + ")" * MAX_NESTING)
    parse_expression("!" * MAX_NESTING + "true")
    for deep in (
        "(" * (MAX_NESTING + 1) + "1" + ")" * (MAX_NESTING + 1),
        "[" * 1000 + "]" * 1000,
        "!" * 1000 + "true",
        "len(" * 1000 + "sender" + ")" * 1000,
    ):
        with pytest.raises(ExpressionError, match="nested too deeply"):
            parse_expression(deep)
