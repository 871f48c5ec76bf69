"""Turning a syntax tree into a function of the session variables, and the value semantics.

The tree is compiled once, when the configuration is loaded, into nested closures: literal regexes
and CIDRs are compiled and checked there (a bad one is a compile error with a caret), so the
evaluation itself is a walk over prepared closures. Evaluation runs on the mail path and must
never raise, whatever the session hands in, so every operator and function is total: an operand
of the wrong type gives the "empty" answer of that operator (``false``, ``""``, ``0``) instead of
an error. The rules:

Values are ``str``, ``int``, ``float``, ``bool`` and lists of values. ``""``, ``0``, ``0.0``,
``false`` and ``[]`` are false, everything else is true.

Numbers and strings. Macros arrive as strings (``remote_port`` is ``"25"``), so a *numeric
string* -- ASCII digits with an optional sign, point and exponent, nothing around them -- is read
as a number where a number is needed:

* ``-`` ``*`` ``/`` and unary ``-`` read both operands as numbers; an operand that is not a
  number or a numeric string makes the result ``""``.
* ``+`` ``==`` ``!=`` ``<`` ``<=`` ``>`` ``>=`` have a meaning for two strings (concatenation,
  string comparison by code point), so there a numeric string is read as a number only when the
  other operand is a number: ``remote_port == 25`` and ``remote_port < 1024`` are numeric,
  ``"10" < "9"`` is true and ``"1" + "2"`` is ``"12"``.
* ``/`` always gives a float; division by zero gives ``""`` (false), like any other failed
  operation, rather than stopping the evaluation. A number too large for a float gives ``""``.

Equality: numbers (after the rule above) by value, strings exactly (case-sensitive), booleans only
equal booleans (``true == 1`` is false), lists item by item; anything else is unequal. Ordering
compares numbers and two strings; any other pair (booleans, lists, number with a non-numeric
string) is false for every ordering operator. ``+`` also joins two lists; ``&&`` and ``||``
short-circuit and give a boolean.
"""

from __future__ import annotations

import functools
import ipaddress
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

from milterbridge.expr.errors import ExpressionError
from milterbridge.expr.names import LIST_VARIABLES
from milterbridge.expr.parser import Binary, Call, ListLiteral, Literal, Node, Unary, Variable

Value: TypeAlias = "str | int | float | bool | list[Value]"
Number: TypeAlias = int | float
Evaluator: TypeAlias = Callable[[Mapping[str, object]], Value]
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_DEPTH = 100
"""Deepest syntax tree compiled. Evaluation recurses once per level, and a long chain such as
``1+1+1+...`` is as deep as it is long, so the limit keeps evaluation far from Python's recursion
limit wherever it is called from."""

EMPTY = ""
"""The result of an operation whose operands do not fit it."""

_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(?=[eE]))(?:[eE][+-]?[0-9]+)?")


# -- value semantics -------------------------------------------------------------------------


def truthy(value: Value) -> bool:
    """``""``, ``0``, ``0.0``, ``false`` and ``[]`` are false; everything else is true."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    return len(value) > 0


def _is_number(value: Value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def as_number(value: Value) -> Number | None:
    """The number a value stands for: itself, or a numeric string's value; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        try:
            if _INT.fullmatch(value):
                return int(value)
            if _FLOAT.fullmatch(value):
                return float(value)
        except ValueError:  # more digits than Python converts
            return None
    return None


def _numbers(left: Value, right: Value) -> tuple[Number, Number] | None:
    """Both operands as numbers, if at least one already is one (see the module docstring)."""
    if not (_is_number(left) or _is_number(right)):
        return None
    x, y = as_number(left), as_number(right)
    if x is None or y is None:
        return None
    return x, y


def equal(left: Value, right: Value) -> bool:
    """``==``: see the module docstring."""
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool) and left == right
    pair = _numbers(left, right)
    if pair is not None:
        return pair[0] == pair[1]
    if isinstance(left, str) and isinstance(right, str):
        return left == right
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(map(equal, left, right))
    return False


def compare(op: str, left: Value, right: Value) -> bool:
    """``<`` ``<=`` ``>`` ``>=``: numbers by value, two strings by code point, else false."""
    pair = _numbers(left, right)
    if pair is not None:
        return bool(_ORDER[op](*pair))
    if isinstance(left, str) and isinstance(right, str):
        return bool(_ORDER[op](left, right))
    return False


_ORDER: dict[str, Callable[[Any, Any], Any]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def add(left: Value, right: Value) -> Value:
    """``+``: joins two strings or two lists, else adds numbers."""
    if isinstance(left, str) and isinstance(right, str):
        return left + right
    if isinstance(left, list) and isinstance(right, list):
        return left + right
    pair = _numbers(left, right)
    if pair is None:
        return EMPTY
    return _guarded(lambda: pair[0] + pair[1])


def arithmetic(op: str, left: Value, right: Value) -> Value:
    """``-`` ``*`` ``/``: both operands read as numbers; ``""`` when that fails or for x / 0."""
    x, y = as_number(left), as_number(right)
    if x is None or y is None:
        return EMPTY
    if op == "-":
        return _guarded(lambda: x - y)
    if op == "*":
        return _guarded(lambda: x * y)
    if y == 0:
        return EMPTY
    return _guarded(lambda: x / y)


def negate(value: Value) -> Value:
    """Unary ``-``."""
    x = as_number(value)
    return EMPTY if x is None else -x


def _guarded(operation: Callable[[], Number]) -> Value:
    """Run ``operation``; a number too large for a float makes the result ``""``."""
    try:
        return operation()
    except OverflowError:
        return EMPTY


def from_host(value: object, *, empty: Value = EMPTY) -> Value:
    """A variable's value as handed in by the session, made a Value without ever raising.

    The session passes strings and lists of strings; anything else is tolerated rather than
    trusted: numbers and booleans are kept, a list or tuple keeps its string, number and boolean
    items (anything else inside it becomes ``""``, so nesting and cycles cannot occur), and any
    other object -- None included -- is the variable's empty value.
    """
    if isinstance(value, str | int | float):  # bool is an int
        return value
    if isinstance(value, list | tuple):
        return [item if isinstance(item, str | int | float) else EMPTY for item in value]
    return empty


# -- functions -------------------------------------------------------------------------------


def _is_empty(value: Value) -> Value:
    """True for ``""`` and ``[]`` only: numbers and booleans are never empty."""
    return isinstance(value, str | list) and len(value) == 0


def _len(value: Value) -> Value:
    """Characters of a string, items of a list, 0 for anything else."""
    return len(value) if isinstance(value, str | list) else 0


def _count(value: Value) -> Value:
    """Items of a list, 0 for anything else (a string is not a list of one)."""
    return len(value) if isinstance(value, list) else 0


def _contains(haystack: Value, needle: Value) -> Value:
    """A list contains an item equal to ``needle`` (``==`` rules); a string contains the string
    ``needle`` as a substring; false for anything else."""
    if isinstance(haystack, list):
        return any(equal(item, needle) for item in haystack)
    if isinstance(haystack, str) and isinstance(needle, str):
        return needle in haystack
    return False


def _starts_with(value: Value, prefix: Value) -> Value:
    return isinstance(value, str) and isinstance(prefix, str) and value.startswith(prefix)


def _ends_with(value: Value, suffix: Value) -> Value:
    return isinstance(value, str) and isinstance(suffix, str) and value.endswith(suffix)


def _map_strings(function: Callable[[str], str]) -> Callable[[Value], Value]:
    """A string function that also maps over a list's strings (other items are kept), so
    ``contains(to_lowercase(recipients), 'a@b')`` works; ``""`` for numbers and booleans."""

    def apply(value: Value) -> Value:
        if isinstance(value, str):
            return function(value)
        if isinstance(value, list):
            return [function(item) if isinstance(item, str) else item for item in value]
        return EMPTY

    return apply


def _is_intersect(left: Value, right: Value) -> Value:
    """Two lists share an item (``==`` rules); false unless both are lists."""
    if not (isinstance(left, list) and isinstance(right, list)):
        return False
    return any(equal(x, y) for x in left for y in right)


def _parse_ip(value: Value) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address from a string, tolerating the ``[...]`` brackets some MTAs add."""
    if not isinstance(value, str):
        return None
    return _parse_ip_text(value)


@functools.lru_cache(maxsize=1024)
def _parse_ip_text(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    # Cached: a session evaluates the same client address at every stage, and parsing one
    # costs more than the rest of a typical expression (benchmarks/expr_eval.py).
    text = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _is_ipv4_addr(value: Value) -> Value:
    return isinstance(_parse_ip(value), ipaddress.IPv4Address)


def _is_ipv6_addr(value: Value) -> Value:
    return isinstance(_parse_ip(value), ipaddress.IPv6Address)


def _network(value: Value) -> IPNetwork | None:
    """A CIDR network (a bare address is a /32 or /128); None when invalid, host bits set too:
    ``10.0.0.1/8`` is refused rather than silently read as ``10.0.0.0/8``."""
    if not isinstance(value, str):
        return None
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        return None


def _networks(value: Value) -> list[IPNetwork]:
    """One CIDR or a list of them; invalid ones are skipped at evaluation time."""
    items = value if isinstance(value, list) else [value]
    return [network for item in items if (network := _network(item)) is not None]


def _in_networks(ip: Value, networks: Sequence[IPNetwork]) -> bool:
    """Whether ``ip`` is in one of ``networks``; an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``)
    also matches IPv4 networks, as dual-stack listeners report IPv4 clients that way."""
    address = _parse_ip(ip)
    if address is None:
        return False
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return any(
        address in network or (mapped is not None and mapped in network) for network in networks
    )


def _email_part(address: Value, part: Value) -> Value:
    """``local`` or ``domain`` part of an address, split at the last ``@`` after dropping
    surrounding ``<>`` and whitespace (no ``@``: all local part, empty domain); maps over a list;
    ``""`` for anything else. Case is kept: compare domains with ``to_lowercase``."""
    if part not in ("local", "domain"):
        return EMPTY
    if isinstance(address, list):
        return [_email_part(item, part) for item in address]
    if not isinstance(address, str):
        return EMPTY
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    local, at, domain = text.rpartition("@")
    if not at:
        local, domain = text, ""
    return local if part == "local" else domain


@functools.lru_cache(maxsize=256)
def _runtime_regex(pattern: str) -> re.Pattern[str] | None:
    """A regex built from a variable; cached because the same one comes back message after
    message; None (no match) when it does not compile."""
    try:
        return re.compile(pattern)
    except (re.error, OverflowError, RecursionError, ValueError):
        return None


def _matches(regex: re.Pattern[str] | None, value: Value) -> bool:
    """``re.search`` (anchor with ``^``/``$`` to match the whole value); any item of a list."""
    if regex is None:
        return False
    if isinstance(value, list):
        return any(isinstance(item, str) and regex.search(item) is not None for item in value)
    return isinstance(value, str) and regex.search(value) is not None


_SIMPLE: dict[str, Callable[..., Value]] = {
    "is_empty": _is_empty,
    "len": _len,
    "count": _count,
    "contains": _contains,
    "starts_with": _starts_with,
    "ends_with": _ends_with,
    "to_lowercase": _map_strings(str.lower),
    "to_uppercase": _map_strings(str.upper),
    "trim": _map_strings(str.strip),
    "is_ipv4_addr": _is_ipv4_addr,
    "is_ipv6_addr": _is_ipv6_addr,
    "is_intersect": _is_intersect,
    "email_part": _email_part,
}


# -- compilation -----------------------------------------------------------------------------


def compile_tree(node: Node, source: str) -> Evaluator:
    """The evaluator of a parsed expression; ``source`` is its text, for error messages.

    Raises ExpressionError for a literal regex or CIDR that is invalid, an ``email_part`` part
    other than ``'local'``/``'domain'``, or a tree deeper than MAX_DEPTH.
    """
    return _compile(node, source, 0)


def _compile(node: Node, source: str, depth: int) -> Evaluator:
    if depth > MAX_DEPTH:
        raise ExpressionError(
            f"expression too deep (more than {MAX_DEPTH} levels of operators)",
            text=source,
            span=node.span,
        )
    depth += 1
    if isinstance(node, Literal):
        literal: Value = node.value
        return lambda env: literal
    if isinstance(node, ListLiteral):
        items = [_compile(item, source, depth) for item in node.items]
        return lambda env: [item(env) for item in items]
    if isinstance(node, Variable):
        name = node.name
        empty: Value = [] if name in LIST_VARIABLES else EMPTY

        def variable(env: Mapping[str, object]) -> Value:
            value = from_host(env.get(name), empty=empty)
            return [] if value == "" and empty == [] else value

        return variable
    if isinstance(node, Unary):
        operand = _compile(node.operand, source, depth)
        if node.op == "!":
            return lambda env: not truthy(operand(env))
        return lambda env: negate(operand(env))
    if isinstance(node, Binary):
        return _compile_binary(node, source, depth)
    return _compile_call(node, source, depth)


def _compile_binary(node: Binary, source: str, depth: int) -> Evaluator:
    left = _compile(node.left, source, depth)
    right = _compile(node.right, source, depth)
    op = node.op
    if op == "&&":
        return lambda env: truthy(left(env)) and truthy(right(env))
    if op == "||":
        return lambda env: truthy(left(env)) or truthy(right(env))
    if op == "==":
        return lambda env: equal(left(env), right(env))
    if op == "!=":
        return lambda env: not equal(left(env), right(env))
    if op == "+":
        return lambda env: add(left(env), right(env))
    if op in _ORDER:
        return lambda env: compare(op, left(env), right(env))
    return lambda env: arithmetic(op, left(env), right(env))


def _compile_call(node: Call, source: str, depth: int) -> Evaluator:
    args = [_compile(arg, source, depth) for arg in node.args]
    if node.name == "matches":
        return _compile_matches(node, source, args)
    if node.name == "is_ip_in_cidr":
        return _compile_cidr(node, source, args)
    if node.name == "email_part":
        part = node.args[1]
        if isinstance(part, Literal) and part.value not in ("local", "domain"):
            raise ExpressionError(
                "email_part() takes 'local' or 'domain' as its second argument",
                text=source,
                span=part.span,
            )
    function = _SIMPLE[node.name]
    if len(args) == 1:
        (only,) = args
        return lambda env: function(only(env))
    first, second = args
    return lambda env: function(first(env), second(env))


def _compile_matches(node: Call, source: str, args: list[Evaluator]) -> Evaluator:
    """matches(regex, value): a literal regex is compiled now, so a bad one is a compile error."""
    regex_node = node.args[0]
    value = args[1]
    if isinstance(regex_node, Literal):
        if not isinstance(regex_node.value, str):
            raise ExpressionError(
                "matches() takes a string regex", text=source, span=regex_node.span
            )
        try:
            compiled = re.compile(regex_node.value)
        except (re.error, OverflowError, RecursionError, ValueError) as error:
            raise ExpressionError(
                f"invalid regex: {error}", text=source, span=regex_node.span
            ) from None
        return lambda env: _matches(compiled, value(env))
    dynamic = args[0]

    def match_dynamic(env: Mapping[str, object]) -> Value:
        pattern = dynamic(env)
        return isinstance(pattern, str) and _matches(_runtime_regex(pattern), value(env))

    return match_dynamic


def _compile_cidr(node: Call, source: str, args: list[Evaluator]) -> Evaluator:
    """is_ip_in_cidr(ip, cidr or [cidr, ...]): literal networks are checked and parsed now."""
    cidr_node = node.args[1]
    ip = args[0]
    literals: list[Literal] | None = None
    if isinstance(cidr_node, Literal):
        literals = [cidr_node]
    elif isinstance(cidr_node, ListLiteral) and all(
        isinstance(item, Literal) for item in cidr_node.items
    ):
        literals = [item for item in cidr_node.items if isinstance(item, Literal)]
    if literals is not None:
        networks: list[IPNetwork] = []
        for literal in literals:
            network = _network(literal.value)
            if network is None:
                raise ExpressionError(
                    f"invalid CIDR {literal}: write a network such as '10.0.0.0/8' or "
                    "'2001:db8::/32' (host bits must be zero)",
                    text=source,
                    span=literal.span,
                )
            networks.append(network)
        return lambda env: _in_networks(ip(env), networks)
    dynamic = args[1]
    return lambda env: _in_networks(ip(env), _networks(dynamic(env)))
