"""Recursive-descent parser of the expression language, in the style of pypa/packaging's
``_parser``: one ``_parse_<rule>`` function per grammar rule, the rule in its docstring.

The grammar, loosest binding first::

    expression     = or_expr END
    or_expr        = and_expr ('||' and_expr)*
    and_expr       = equality ('&&' equality)*
    equality       = comparison (('==' | '!=') comparison)?
    comparison     = additive (('<' | '>' | '<=' | '>=') additive)?
    additive       = multiplicative (('+' | '-') multiplicative)*
    multiplicative = unary (('*' | '/') unary)*
    unary          = ('!' | '-') unary | primary
    primary        = STRING | INT | FLOAT | 'true' | 'false' | list | '(' or_expr ')'
                   | IDENT ('(' arguments? ')')?
    list           = '[' (or_expr (',' or_expr)* ','?)? ']'
    arguments      = or_expr (',' or_expr)*

Binary operators associate to the left. Comparisons do not chain: ``a < b < c`` would compare
a boolean with ``c``, which is never what was meant, so it is refused (``a == b == c`` too).

Names are checked here, at compile time, because a misspelt variable would otherwise quietly be
empty for every message: an IDENT followed by ``(`` must be a known function called with its
number of arguments, any other IDENT a known variable.
"""

from __future__ import annotations

from dataclasses import dataclass

from milterbridge.expr.names import FUNCTIONS, VARIABLES
from milterbridge.expr.tokenizer import Token, Tokenizer, unquote

Span = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Literal:
    """A string, integer, float or boolean written in the expression."""

    value: str | int | float | bool
    span: Span

    def __str__(self) -> str:
        if isinstance(self.value, bool):
            return "true" if self.value else "false"
        if isinstance(self.value, str):
            return "'" + self.value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        return repr(self.value)


@dataclass(frozen=True, slots=True)
class ListLiteral:
    """``[a, b, ...]``."""

    items: tuple[Node, ...]
    span: Span

    def __str__(self) -> str:
        return "[" + ", ".join(str(item) for item in self.items) + "]"


@dataclass(frozen=True, slots=True)
class Variable:
    """A session variable, e.g. ``sender``."""

    name: str
    span: Span

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class Unary:
    """``!x`` or ``-x``."""

    op: str
    operand: Node
    span: Span

    def __str__(self) -> str:
        return f"({self.op}{self.operand})"


@dataclass(frozen=True, slots=True)
class Binary:
    """``left op right``; ``op`` is the operator as written, e.g. ``"&&"``."""

    op: str
    left: Node
    right: Node
    span: Span

    def __str__(self) -> str:
        return f"({self.left} {self.op} {self.right})"


@dataclass(frozen=True, slots=True)
class Call:
    """``name(args...)`` of a known function with the right number of arguments."""

    name: str
    args: tuple[Node, ...]
    span: Span

    def __str__(self) -> str:
        return f"{self.name}(" + ", ".join(str(arg) for arg in self.args) + ")"


Node = Literal | ListLiteral | Variable | Unary | Binary | Call
"""Any node of the syntax tree. ``str(node)`` gives it back fully parenthesized."""


def parse_expression(source: str) -> Node:
    """Parse ``source`` into a syntax tree; raises ExpressionError with the offending span."""
    return _parse_expression(Tokenizer(source))


def _parse_expression(tokenizer: Tokenizer) -> Node:
    """expression = or_expr END"""
    if tokenizer.check("END"):
        tokenizer.raise_syntax_error("expected an expression")
    node = _parse_or(tokenizer)
    if not tokenizer.check("END"):
        tokenizer.raise_syntax_error("expected an operator or the end of the expression")
    return node


def _binary(op: Token, left: Node, right: Node) -> Binary:
    return Binary(op.text, left, right, (left.span[0], right.span[1]))


def _parse_or(tokenizer: Tokenizer) -> Node:
    """or_expr = and_expr ('||' and_expr)*"""
    node = _parse_and(tokenizer)
    while op := tokenizer.consume("OR"):
        node = _binary(op, node, _parse_and(tokenizer))
    return node


def _parse_and(tokenizer: Tokenizer) -> Node:
    """and_expr = equality ('&&' equality)*"""
    node = _parse_equality(tokenizer)
    while op := tokenizer.consume("AND"):
        node = _binary(op, node, _parse_equality(tokenizer))
    return node


def _parse_equality(tokenizer: Tokenizer) -> Node:
    """equality = comparison (('==' | '!=') comparison)?"""
    node = _parse_comparison(tokenizer)
    if op := tokenizer.consume("EQ", "NE"):
        node = _binary(op, node, _parse_comparison(tokenizer))
        _refuse_chain(tokenizer, "EQ", "NE")
    return node


def _parse_comparison(tokenizer: Tokenizer) -> Node:
    """comparison = additive (('<' | '>' | '<=' | '>=') additive)?"""
    node = _parse_additive(tokenizer)
    if op := tokenizer.consume("LT", "GT", "LE", "GE"):
        node = _binary(op, node, _parse_additive(tokenizer))
        _refuse_chain(tokenizer, "LT", "GT", "LE", "GE")
    return node


def _refuse_chain(tokenizer: Tokenizer, *names: str) -> None:
    if tokenizer.check(*names):
        tokenizer.raise_syntax_error(
            "comparisons cannot be chained; combine them with && or use parentheses"
        )


def _parse_additive(tokenizer: Tokenizer) -> Node:
    """additive = multiplicative (('+' | '-') multiplicative)*"""
    node = _parse_multiplicative(tokenizer)
    while op := tokenizer.consume("PLUS", "MINUS"):
        node = _binary(op, node, _parse_multiplicative(tokenizer))
    return node


def _parse_multiplicative(tokenizer: Tokenizer) -> Node:
    """multiplicative = unary (('*' | '/') unary)*"""
    node = _parse_unary(tokenizer)
    while op := tokenizer.consume("STAR", "SLASH"):
        node = _binary(op, node, _parse_unary(tokenizer))
    return node


def _parse_unary(tokenizer: Tokenizer) -> Node:
    """unary = ('!' | '-') unary | primary"""
    if op := tokenizer.consume("NOT", "MINUS"):
        with tokenizer.nested(op):
            operand = _parse_unary(tokenizer)
        return Unary(op.text, operand, (op.position, operand.span[1]))
    return _parse_primary(tokenizer)


def _parse_primary(tokenizer: Tokenizer) -> Node:
    """primary = STRING | INT | FLOAT | 'true' | 'false' | list | '(' or_expr ')'
    | IDENT ('(' arguments? ')')?
    """
    token = tokenizer.next_token
    span = (token.position, token.end)
    if tokenizer.consume("STRING"):
        return Literal(unquote(token.text), span)
    if tokenizer.consume("INT"):
        try:
            return Literal(int(token.text), span)
        except ValueError:  # longer than Python's int-from-string digit limit
            tokenizer.raise_syntax_error("integer too long", span_start=span[0], span_end=span[1])
    if tokenizer.consume("FLOAT"):
        return Literal(float(token.text), span)
    if tokenizer.consume("TRUE", "FALSE"):
        return Literal(token.name == "TRUE", span)
    if tokenizer.check("LEFT_BRACKET"):
        return _parse_list(tokenizer)
    if tokenizer.consume("LEFT_PAREN"):
        with tokenizer.nested(token):
            node = _parse_or(tokenizer)
        tokenizer.expect("RIGHT_PAREN", expected="')' to close the '(' opened before")
        return node
    if tokenizer.consume("IDENT"):
        if tokenizer.check("LEFT_PAREN"):
            return _parse_call(tokenizer, token)
        if token.text not in VARIABLES:
            hint = " (a function needs parentheses)" if token.text in FUNCTIONS else ""
            tokenizer.raise_syntax_error(
                f"unknown variable {token.text!r}{hint}", span_start=span[0], span_end=span[1]
            )
        return Variable(token.text, span)
    if tokenizer.check("END"):
        tokenizer.raise_syntax_error("expected a value at the end of the expression")
    tokenizer.raise_syntax_error(f"expected a value, not {token.text!r}")


def _parse_list(tokenizer: Tokenizer) -> ListLiteral:
    """list = '[' (or_expr (',' or_expr)* ','?)? ']'"""
    opening = tokenizer.read()
    items: list[Node] = []
    with tokenizer.nested(opening):
        while not tokenizer.check("RIGHT_BRACKET"):
            items.append(_parse_or(tokenizer))
            if not tokenizer.consume("COMMA"):
                break
    closing = tokenizer.expect("RIGHT_BRACKET", expected="',' or ']' to close the list")
    return ListLiteral(tuple(items), (opening.position, closing.end))


def _parse_call(tokenizer: Tokenizer, name: Token) -> Call:
    """IDENT '(' arguments? ')', arguments = or_expr (',' or_expr)*"""
    if name.text not in FUNCTIONS:
        tokenizer.raise_syntax_error(
            f"unknown function {name.text!r}", span_start=name.position, span_end=name.end
        )
    opening = tokenizer.read()
    args: list[Node] = []
    with tokenizer.nested(opening):
        if not tokenizer.check("RIGHT_PAREN"):
            args.append(_parse_or(tokenizer))
            while tokenizer.consume("COMMA"):
                args.append(_parse_or(tokenizer))
    closing = tokenizer.expect("RIGHT_PAREN", expected="',' or ')' to close the call")
    span = (name.position, closing.end)
    arity = FUNCTIONS[name.text]
    if len(args) != arity:
        plural = "" if arity == 1 else "s"
        tokenizer.raise_syntax_error(
            f"{name.text}() takes {arity} argument{plural} ({len(args)} given)",
            span_start=span[0],
            span_end=span[1],
        )
    return Call(name.text, tuple(args), span)
