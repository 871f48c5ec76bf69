"""Hypothesis over the expression language: random token streams, and print/re-parse."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from milterbridge.expr import ExpressionError, compile_expression
from milterbridge.expr.parser import parse_expression

TOKENS = [
    "sender", "rcpt_domain", "recipients", "remote_ip", "remote_port", "nosuch",
    "'a'", '"b c"', "'x\\'y'", "0", "25", "1.5", "-3", "true", "false",
    "!", "*", "/", "+", "-", "<", ">", "<=", ">=", "==", "!=", "&&", "||",
    "(", ")", "[", "]", ",", "len", "contains", "matches", "is_ip_in_cidr", "email_part",
    "'10.0.0.0/8'", "'local'", "'^a+$'", "'('", "&", "|", "=", "@", "é", "'unterminated",
]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=14), st.sampled_from([" ", ""]))
def test_random_token_streams_only_raise_expression_errors(tokens: list[str], sep: str) -> None:
    """Any mix of tokens compiles or raises ExpressionError, never anything else."""
    try:
        compile_expression(sep.join(tokens))
    except ExpressionError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=14))
def test_printing_a_parsed_tree_and_parsing_it_again_gives_the_same_tree(
    tokens: list[str],
) -> None:
    """str(tree) is an expression that parses back to a tree printing the same way."""
    try:
        tree = parse_expression(" ".join(tokens))
    except ExpressionError:
        return
    printed = str(tree)
    assert str(parse_expression(printed)) == printed


def test_round_trip_of_known_expressions() -> None:
    """Precedence and grouping survive printing: a(b) + c * d, !x || y && z, nested calls."""
    for text in (
        "1 + 2 * 3",
        "(1 + 2) * 3",
        "!is_empty(sender) || rcpt_domain == 'a' && remote_port >= 1024",
        "-len([1, 2, 'x']) < 0",
        "contains(to_lowercase(sender), 'abc') != false",
        "email_part(rcpt, 'domain') + '.x' == \"y\"",
    ):
        printed = str(parse_expression(text))
        assert str(parse_expression(printed)) == printed
        variables = {"sender": "ABC@x", "rcpt": "a@y", "rcpt_domain": "a", "remote_port": "2000"}
        assert compile_expression(printed).evaluate(variables) == compile_expression(text).evaluate(
            variables
        )
