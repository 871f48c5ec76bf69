"""The ``enable`` expression language: when a filter takes part in a session.

An expression is compiled once, when the configuration is loaded -- syntax, names, arities and
literal regexes and CIDRs are all checked then, and a problem is an ExpressionError that shows
the expression with a caret under the bad part -- and evaluated for every session against the
session's variables, where it never raises (see ``evaluate`` for the value rules).

Pure: no I/O, no logging, no trio, and never Python's ``eval``.

    >>> rules = compile_rules([("is_ip_in_cidr(remote_ip, '10.0.0.0/8')", "false")], "true")
    >>> rules.evaluate({"remote_ip": "10.1.2.3"})
    False
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from milterbridge.expr.errors import ExpressionError, RuleError
from milterbridge.expr.evaluate import Evaluator, Predicate, Value, compile_node
from milterbridge.expr.names import FUNCTIONS, VARIABLES
from milterbridge.expr.parser import Node, parse_expression

__all__ = [
    "FUNCTIONS",
    "VARIABLES",
    "CompiledExpression",
    "CompiledRules",
    "ExpressionError",
    "RuleError",
    "Value",
    "compile_expression",
    "compile_rules",
]

Variables = Mapping[str, "str | list[str]"]


@dataclass(frozen=True, slots=True)
class CompiledExpression:
    """A checked expression, ready to be evaluated any number of times."""

    text: str
    tree: Node
    _evaluator: Evaluator
    _test: Predicate

    def evaluate(self, variables: Variables) -> Value:
        """The expression's value for these variables; a variable missing from the mapping is
        empty (``""``, or ``[]`` for ``recipients``). Never raises."""
        return self._evaluator(variables)

    def truthy(self, variables: Variables) -> bool:
        """Whether the value is true: not ``""``, ``0``, ``false`` or ``[]``. Never raises;
        cheaper than ``evaluate`` (the value is not built when it need not be)."""
        return self._test(variables)


def compile_expression(text: str) -> CompiledExpression:
    """Parse and check ``text``; raises ExpressionError pointing into it."""
    tree = parse_expression(text)
    compiled = compile_node(tree, text)
    return CompiledExpression(text, tree, compiled.value, compiled.test)


@dataclass(frozen=True, slots=True)
class CompiledRules:
    """``{match = [{if, then}, ...], else}``: the first rule whose ``if`` holds gives the value
    (its ``then``), and ``else`` when none does. ``then`` and ``else`` are expressions too, most
    often ``"true"`` or ``"false"``."""

    rules: tuple[tuple[CompiledExpression, CompiledExpression], ...]
    otherwise: CompiledExpression
    _decide: Predicate = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_decide", _decision(self.rules, self.otherwise))

    def evaluate(self, variables: Variables) -> bool:
        """The truth of the chosen ``then`` or of ``else``. Never raises."""
        return self._decide(variables)


def _decision(
    rules: tuple[tuple[CompiledExpression, CompiledExpression], ...], otherwise: CompiledExpression
) -> Predicate:
    """CompiledRules.evaluate as one closure over the expressions' truth closures."""
    if not rules:
        return otherwise._test
    pairs = tuple((condition._test, then._test) for condition, then in rules)
    otherwise_test = otherwise._test

    def decide(variables: Mapping[str, object]) -> bool:
        for condition, then in pairs:
            if condition(variables):
                return then(variables)
        return otherwise_test(variables)

    return decide


def compile_rules(match: Sequence[tuple[str, str]], else_: str) -> CompiledRules:
    """Compile every ``(if, then)`` pair and ``else``; raises RuleError (an ExpressionError)
    whose ``index`` and ``part`` say which of them failed."""
    rules = []
    for index, (condition, then) in enumerate(match):
        rules.append(
            (
                _compile_part(condition, index=index, part="if"),
                _compile_part(then, index=index, part="then"),
            )
        )
    return CompiledRules(tuple(rules), _compile_part(else_, index=None, part="else"))


def _compile_part(text: str, *, index: int | None, part: str) -> CompiledExpression:
    try:
        return compile_expression(text)
    except ExpressionError as error:
        raise RuleError(error, index=index, part=part) from None
