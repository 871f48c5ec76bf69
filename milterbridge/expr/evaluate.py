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
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeAlias, TypeVar, cast

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

_SCALARS = (str, int, float)
"""``isinstance(x, _SCALARS)``: a tuple is checked faster than the ``str | int | float`` union."""

_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(?=[eE]))(?:[eE][+-]?[0-9]+)?")


# -- value semantics -------------------------------------------------------------------------


def truthy(value: Value) -> bool:
    """``""``, ``0``, ``0.0``, ``false`` and ``[]`` are false; everything else is true."""
    if type(value) is str:  # the common case first; a str subclass takes the general path
        return value != ""
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
            if type(value) is str and value.isdigit() and value.isascii():  # "25": no regex
                return int(value)
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
    if isinstance(value, _SCALARS):  # bool is an int
        return value
    if isinstance(value, (list, tuple)):  # a tuple is checked faster than a union
        return [item if isinstance(item, _SCALARS) else EMPTY for item in value]
    return empty


# -- functions -------------------------------------------------------------------------------


def _is_empty(value: Value) -> bool:
    """True for ``""`` and ``[]`` only: numbers and booleans are never empty."""
    return isinstance(value, str | list) and len(value) == 0


def _len(value: Value) -> Value:
    """Characters of a string, items of a list, 0 for anything else."""
    return len(value) if isinstance(value, str | list) else 0


def _count(value: Value) -> Value:
    """Items of a list, 0 for anything else (a string is not a list of one)."""
    return len(value) if isinstance(value, list) else 0


def _contains(haystack: Value, needle: Value) -> bool:
    """A list contains an item equal to ``needle`` (``==`` rules); a string contains the string
    ``needle`` as a substring; false for anything else."""
    if isinstance(haystack, list):
        return any(equal(item, needle) for item in haystack)
    if isinstance(haystack, str) and isinstance(needle, str):
        return needle in haystack
    return False


def _starts_with(value: Value, prefix: Value) -> bool:
    return isinstance(value, str) and isinstance(prefix, str) and value.startswith(prefix)


def _ends_with(value: Value, suffix: Value) -> bool:
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


def _is_intersect(left: Value, right: Value) -> bool:
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


def _is_ipv4_addr(value: Value) -> bool:
    return isinstance(_parse_ip(value), ipaddress.IPv4Address)


def _is_ipv6_addr(value: Value) -> bool:
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
#
# Every node compiles to a _Code: a closure giving its value and one giving its truth, so a
# condition -- the usual use -- never builds a value just to test it (``a == 'x'`` is a bool
# already, ``recipients`` is true when the session's list is not empty, without copying it).
# The generic closures apply the rules above through the functions above. On top of them:
#
# * constant folding: a node whose operands are all constants is evaluated once, when compiled,
#   by its generic closure (it reads no variable, so nothing can differ at evaluation time);
# * ``&&`` and ``||`` chains become one closure over their operands' truth closures, a constant
#   operand dropped or deciding the whole chain;
# * an operator or function with a constant operand checks whether the other operand is exactly
#   a ``str`` -- what the session hands in -- and does the one operation the rules give for a
#   string and that constant (``v == c``, ``v.endswith(c)``, a cached CIDR lookup); anything
#   else goes to the generic function. A variable of the session is read inline there.
#
# tests/expr/test_fast_paths.py checks the result against a plain tree-walking reference
# evaluator for random expressions and variables.

Predicate: TypeAlias = Callable[[Mapping[str, object]], bool]
_T = TypeVar("_T")

_NO_VARIABLES: Mapping[str, object] = MappingProxyType({})
"""What a constant node is evaluated with when it is folded: it reads no variable."""

CIDR_CACHE_SIZE = 1024
"""Client addresses remembered per ``is_ip_in_cidr`` with literal networks: the same address
comes back at every stage of a session, and testing it costs more than the rest of a typical
expression. The memory is bounded: a full cache is emptied."""


@dataclass(frozen=True, slots=True)
class Compiled:
    """A compiled expression: ``value(variables)`` is its Value and ``test(variables)`` is
    ``truthy(value(variables))``, computed without building the value where it can be."""

    value: Evaluator
    test: Predicate


@dataclass(frozen=True, slots=True)
class _Code:
    """A compiled node, and what its parent may specialise on."""

    value: Evaluator
    test: Predicate
    is_constant: bool = False
    constant: Value = EMPTY
    variable: str | None = None
    """The variable's name when the node is a string variable (a variable whose empty value is
    ``""``): a fast path reads it inline, ``env.get(name)``."""
    list_variable: str | None = None
    """The variable's name when the node is a list variable (``recipients``)."""
    chain_op: str | None = None
    """``&&`` or ``||`` when the node is a chain of them, ``chain`` being its operands."""
    chain: tuple[_Code, ...] = ()


def compile_tree(node: Node, source: str) -> Evaluator:
    """The evaluator of a parsed expression; ``source`` is its text, for error messages.

    Raises ExpressionError as compile_node does.
    """
    return _compile(node, source, 0).value


def compile_node(node: Node, source: str) -> Compiled:
    """The value and truth evaluators of a parsed expression; ``source`` is its text.

    Raises ExpressionError for a literal regex or CIDR that is invalid, an ``email_part`` part
    other than ``'local'``/``'domain'``, or a tree deeper than MAX_DEPTH.
    """
    code = _compile(node, source, 0)
    return Compiled(code.value, code.test)


def _compile(node: Node, source: str, depth: int) -> _Code:
    if depth > MAX_DEPTH:
        raise ExpressionError(
            f"expression too deep (more than {MAX_DEPTH} levels of operators)",
            text=source,
            span=node.span,
        )
    depth += 1
    if isinstance(node, Literal):
        return _constant(node.value)
    if isinstance(node, ListLiteral):
        return _list([_compile(item, source, depth) for item in node.items])
    if isinstance(node, Variable):
        return _variable(node.name)
    if isinstance(node, Unary):
        operand = _compile(node.operand, source, depth)
        return _not(operand) if node.op == "!" else _negative(operand)
    if isinstance(node, Binary):
        return _compile_binary(node, source, depth)
    return _compile_call(node, source, depth)


# -- constants, lists, variables --


def _always_true(env: Mapping[str, object]) -> bool:
    return True


def _always_false(env: Mapping[str, object]) -> bool:
    return False


def _constant(value: Value) -> _Code:
    test = _always_true if truthy(value) else _always_false
    if isinstance(value, list):

        def fresh_list(env: Mapping[str, object]) -> Value:
            return _copy(value)  # the caller may keep or change the list it gets

        return _Code(fresh_list, test, is_constant=True, constant=value)

    def constant(env: Mapping[str, object]) -> Value:
        return value

    return _Code(constant, test, is_constant=True, constant=value)


def _copy(value: list[Value]) -> list[Value]:
    return [_copy(item) if isinstance(item, list) else item for item in value]


def _fold(code: _Code) -> _Code:
    """A node whose operands are all constants: its value, computed now."""
    return _constant(code.value(_NO_VARIABLES))


def _truth(value: Evaluator) -> Predicate:
    """The generic truth closure: the value, then ``truthy``."""

    def test(env: Mapping[str, object]) -> bool:
        result = value(env)
        if type(result) is str:
            return result != ""
        return truthy(result)

    return test


def _list(items: list[_Code]) -> _Code:
    if all(item.is_constant for item in items):
        return _constant([item.constant for item in items])
    values = tuple(item.value for item in items)

    def build(env: Mapping[str, object]) -> Value:
        return [value(env) for value in values]

    return _Code(build, _always_true)  # not empty: at least one item is not a constant


def _variable(name: str) -> _Code:
    if name in LIST_VARIABLES:

        def list_value(env: Mapping[str, object]) -> Value:
            return _read_list(env.get(name))

        def list_test(env: Mapping[str, object]) -> bool:
            raw = env.get(name)
            if type(raw) is list:
                return len(raw) > 0
            return truthy(_read_list(raw))

        return _Code(list_value, list_test, list_variable=name)

    def value(env: Mapping[str, object]) -> Value:
        raw = env.get(name)
        if type(raw) is str:
            return raw
        return from_host(raw)

    def test(env: Mapping[str, object]) -> bool:
        raw = env.get(name)
        if type(raw) is str:
            return raw != ""
        return truthy(from_host(raw))

    return _Code(value, test, variable=name)


def _read_list(raw: object) -> Value:
    """A list variable's value: as from_host makes it, ``[]`` when unknown or ``""``."""
    if type(raw) is list:
        return [item if isinstance(item, _SCALARS) else EMPTY for item in raw]
    value = from_host(raw, empty=[])
    return [] if value == "" else value


def _on_string(
    subject: _Code, on_str: Callable[[str], _T], generic: Callable[[Value], _T]
) -> Callable[[Mapping[str, object]], _T]:
    """A closure that gives ``on_str(x)`` when the subject's value ``x`` is exactly a ``str``
    and ``generic(x)`` otherwise; the two must agree on strings."""
    name = subject.variable
    if name is not None:

        def read_variable(env: Mapping[str, object]) -> _T:
            raw = env.get(name)
            if type(raw) is str:
                return on_str(raw)
            return generic(from_host(raw))

        return read_variable
    value = subject.value

    def read_value(env: Mapping[str, object]) -> _T:
        result = value(env)
        if type(result) is str:
            return on_str(result)
        return generic(result)

    return read_value


# -- operators --


def _not(operand: _Code) -> _Code:
    if operand.is_constant:
        return _constant(not truthy(operand.constant))
    test = operand.test

    def not_(env: Mapping[str, object]) -> bool:
        return not test(env)

    return _Code(not_, not_)


def _negative(operand: _Code) -> _Code:
    value = operand.value

    def negative(env: Mapping[str, object]) -> Value:
        return negate(value(env))

    code = _Code(negative, _truth(negative))
    return _fold(code) if operand.is_constant else code


def _compile_binary(node: Binary, source: str, depth: int) -> _Code:
    left = _compile(node.left, source, depth)
    right = _compile(node.right, source, depth)
    op = node.op
    if op in ("&&", "||"):
        return _chain(op, left, right)
    if left.is_constant and right.is_constant:
        return _fold(_generic_binary(op, left.value, right.value))
    if op in ("==", "!="):
        return _equality(op == "!=", left, right)
    if op in _ORDER:
        return _ordering(op, left, right)
    return _generic_binary(op, left.value, right.value)


def _generic_binary(op: str, left: Evaluator, right: Evaluator) -> _Code:
    if op in ("==", "!="):
        negated = op == "!="

        def equality(env: Mapping[str, object]) -> bool:
            same = equal(left(env), right(env))
            return not same if negated else same

        return _Code(equality, equality)
    if op in _ORDER:

        def ordering(env: Mapping[str, object]) -> bool:
            return compare(op, left(env), right(env))

        return _Code(ordering, ordering)
    if op == "+":

        def plus(env: Mapping[str, object]) -> Value:
            x, y = left(env), right(env)
            if type(x) is str and type(y) is str:
                return x + y
            return add(x, y)

        return _Code(plus, _truth(plus))

    def arithmetic_(env: Mapping[str, object]) -> Value:
        return arithmetic(op, left(env), right(env))

    return _Code(arithmetic_, _truth(arithmetic_))


def _chain(op: str, left: _Code, right: _Code) -> _Code:
    """``a || b || ...`` or ``a && b && ...`` as one closure over the operands' truth."""
    decisive = op == "||"  # the operand truth that decides the chain
    operands: list[_Code] = []
    for code in (left, right):
        for operand in code.chain if code.chain_op == op else (code,):
            if not operand.is_constant:
                operands.append(operand)
            elif truthy(operand.constant) is decisive:
                return _constant(decisive)  # nothing the others give can change it
    if not operands:
        return _constant(not decisive)
    tests = [operand.test for operand in operands]
    test = _any(tests) if decisive else _all(tests)
    return _Code(test, test, chain_op=op, chain=tuple(operands))


def _any(tests: Sequence[Predicate]) -> Predicate:
    """``a(env) or b(env) or ...`` written out, five at a time (cheaper than a loop)."""
    if len(tests) == 1:
        return tests[0]
    if len(tests) == 2:
        a, b = tests
        return lambda env: a(env) or b(env)
    if len(tests) == 3:
        a, b, c = tests
        return lambda env: a(env) or b(env) or c(env)
    if len(tests) == 4:
        a, b, c, d = tests
        return lambda env: a(env) or b(env) or c(env) or d(env)
    a, b, c, d = tests[:4]
    e = _any(tests[4:])
    return lambda env: a(env) or b(env) or c(env) or d(env) or e(env)


def _all(tests: Sequence[Predicate]) -> Predicate:
    """``a(env) and b(env) and ...``, as _any."""
    if len(tests) == 1:
        return tests[0]
    if len(tests) == 2:
        a, b = tests
        return lambda env: a(env) and b(env)
    if len(tests) == 3:
        a, b, c = tests
        return lambda env: a(env) and b(env) and c(env)
    if len(tests) == 4:
        a, b, c, d = tests
        return lambda env: a(env) and b(env) and c(env) and d(env)
    a, b, c, d = tests[:4]
    e = _all(tests[4:])
    return lambda env: a(env) and b(env) and c(env) and d(env) and e(env)


def _equality(negated: bool, left: _Code, right: _Code) -> _Code:
    """``==`` / ``!=`` of two operands, not both constant."""
    if not (left.is_constant or right.is_constant):
        left_value, right_value = left.value, right.value

        def equality(env: Mapping[str, object]) -> bool:
            x, y = left_value(env), right_value(env)
            if type(x) is str and type(y) is str:
                return (x == y) is not negated
            same = equal(x, y)
            return not same if negated else same

        return _Code(equality, equality)

    first = right.is_constant  # whether the constant is on the right, as in ``x == 'a'``
    subject, constant = (left, right.constant) if first else (right, left.constant)

    def generic(x: Value) -> bool:
        same = equal(x, constant) if first else equal(constant, x)
        return not same if negated else same

    name = subject.variable
    if type(constant) is str and name is not None:  # ``sender_domain == 'example.org'``

        def string_variable(env: Mapping[str, object]) -> bool:
            raw = env.get(name)
            if type(raw) is str:
                return (raw == constant) is not negated
            return generic(from_host(raw))

        return _Code(string_variable, string_variable)

    on_str: Callable[[str], bool]
    if type(constant) is str:

        def on_str(text: str) -> bool:
            return (text == constant) is not negated

    elif type(constant) is int or type(constant) is float:

        def on_str(text: str) -> bool:  # ``remote_port == 25``: numeric
            number = as_number(text)
            return (number is not None and number == constant) is not negated

    else:  # a boolean or a list is never equal to a string

        def on_str(text: str) -> bool:
            return negated

    test = _on_string(subject, on_str, generic)
    return _Code(test, test)


def _ordering(op: str, left: _Code, right: _Code) -> _Code:
    """``<`` ``<=`` ``>`` ``>=`` of two operands, not both constant."""
    order = _ORDER[op]
    if not (left.is_constant or right.is_constant):
        left_value, right_value = left.value, right.value

        def ordering(env: Mapping[str, object]) -> bool:
            x, y = left_value(env), right_value(env)
            if type(x) is str and type(y) is str:
                return bool(order(x, y))
            return compare(op, x, y)

        return _Code(ordering, ordering)

    first = right.is_constant
    subject, constant = (left, right.constant) if first else (right, left.constant)

    def generic(x: Value) -> bool:
        return compare(op, x, constant) if first else compare(op, constant, x)

    on_str: Callable[[str], bool]
    if type(constant) is str:

        def on_str(text: str) -> bool:
            return bool(order(text, constant) if first else order(constant, text))

    elif type(constant) is int or type(constant) is float:

        def on_str(text: str) -> bool:  # ``remote_port < 1024``: numeric, else false
            number = as_number(text)
            if number is None:
                return False
            return bool(order(number, constant) if first else order(constant, number))

    else:  # a boolean or a list is never ordered

        def on_str(text: str) -> bool:
            return False

    test = _on_string(subject, on_str, generic)
    return _Code(test, test)


# -- functions --

_PREDICATES = frozenset(
    {
        "is_empty",
        "contains",
        "starts_with",
        "ends_with",
        "matches",
        "is_ip_in_cidr",
        "is_ipv4_addr",
        "is_ipv6_addr",
        "is_intersect",
    }
)
"""The functions whose value is always a bool: their value closure is their truth closure."""

_STRING_MAPS: dict[str, Callable[[str], str]] = {
    "to_lowercase": str.lower,
    "to_uppercase": str.upper,
    "trim": str.strip,
}


def _compile_call(node: Call, source: str, depth: int) -> _Code:
    args = [_compile(arg, source, depth) for arg in node.args]
    if node.name == "matches":
        code = _compile_matches(node, source, args)
    elif node.name == "is_ip_in_cidr":
        code = _compile_cidr(node, source, args)
    else:
        if node.name == "email_part":
            part = node.args[1]
            if isinstance(part, Literal) and part.value not in ("local", "domain"):
                raise ExpressionError(
                    "email_part() takes 'local' or 'domain' as its second argument",
                    text=source,
                    span=part.span,
                )
        code = _function(node.name, args)
    if all(arg.is_constant for arg in args) and not code.is_constant:
        return _fold(code)
    return code


def _function(name: str, args: list[_Code]) -> _Code:
    special = _special_function(name, args)
    if special is not None:
        return special
    function = _SIMPLE[name]
    call: Evaluator
    if len(args) == 1:
        only = args[0].value

        def call(env: Mapping[str, object]) -> Value:
            return function(only(env))

    else:
        first, second = args[0].value, args[1].value

        def call(env: Mapping[str, object]) -> Value:
            return function(first(env), second(env))

    if name in _PREDICATES:
        return _Code(call, cast(Predicate, call))  # their functions return bools
    return _Code(call, _truth(call))


def _special_function(name: str, args: list[_Code]) -> _Code | None:
    """A faster closure for a call on a string or list variable or with a constant string, or
    None for the generic one."""
    subject = args[0]
    if len(args) == 1:
        if subject.list_variable is not None and name in ("is_empty", "len", "count"):
            return _list_variable_size(name, subject.list_variable)
        if name in _STRING_MAPS:
            mapped = _on_string(subject, _STRING_MAPS[name], _SIMPLE[name])
            return _Code(mapped, _truth(mapped))
        return None
    other = args[1]
    if not other.is_constant or subject.is_constant:
        return None
    needle = other.constant
    if name in ("starts_with", "ends_with"):
        if type(needle) is not str:
            return _constant(False)
        affix = _starts_with if name == "starts_with" else _ends_with
        method = str.startswith if name == "starts_with" else str.endswith
        test = _on_string(subject, lambda text: method(text, needle), lambda x: affix(x, needle))
        return _Code(test, test)
    if name == "contains" and type(needle) is str:
        if subject.list_variable is not None:
            test = _contains_in_list_variable(subject.list_variable, needle)
        else:
            test = _on_string(subject, lambda text: needle in text, lambda x: _contains(x, needle))
        return _Code(test, test)
    return None


def _list_variable_size(name: str, variable: str) -> _Code:
    """``is_empty``, ``len`` or ``count`` of ``recipients``, without copying the list."""
    function = _SIMPLE[name]
    if name == "is_empty":

        def is_empty(env: Mapping[str, object]) -> bool:
            raw = env.get(variable)
            if type(raw) is list or type(raw) is str:  # "" reads as []: empty either way
                return len(raw) == 0
            return _is_empty(_read_list(raw))

        return _Code(is_empty, is_empty)
    counts_text = name == "len"  # count() of a string is 0, len() its length

    def size(env: Mapping[str, object]) -> Value:
        raw = env.get(variable)
        if type(raw) is list or (counts_text and type(raw) is str):
            return len(raw)
        return function(_read_list(raw))

    return _Code(size, _truth(size))


def _contains_in_list_variable(variable: str, needle: str) -> Predicate:
    """``contains(recipients, 'a@b')``: the session's list searched without copying it."""

    def contains(env: Mapping[str, object]) -> bool:
        raw = env.get(variable)
        if type(raw) is list:
            for item in raw:
                if type(item) is str:
                    if item == needle:
                        return True
                elif equal(item if isinstance(item, _SCALARS) else EMPTY, needle):
                    return True
            return False
        return _contains(_read_list(raw), needle)

    return contains


def _compile_matches(node: Call, source: str, args: list[_Code]) -> _Code:
    """matches(regex, value): a literal regex is compiled now, so a bad one is a compile error;
    a constant one that is not a literal (``'a' + 'b'``) is compiled now too, silently."""
    regex_node = node.args[0]
    subject = args[1]
    if isinstance(regex_node, Literal):
        if not isinstance(regex_node.value, str):
            raise ExpressionError(
                "matches() takes a string regex", text=source, span=regex_node.span
            )
        try:
            regex = re.compile(regex_node.value)
        except (re.error, OverflowError, RecursionError, ValueError) as error:
            raise ExpressionError(
                f"invalid regex: {error}", text=source, span=regex_node.span
            ) from None
    elif args[0].is_constant:
        pattern = args[0].constant
        found = _runtime_regex(pattern) if isinstance(pattern, str) else None
        if found is None:
            return _constant(False)
        regex = found
    else:
        dynamic, value = args[0].value, subject.value

        def match_dynamic(env: Mapping[str, object]) -> bool:
            pattern = dynamic(env)
            return isinstance(pattern, str) and _matches(_runtime_regex(pattern), value(env))

        return _Code(match_dynamic, match_dynamic)
    search = regex.search
    test = _on_string(subject, lambda text: search(text) is not None, lambda x: _matches(regex, x))
    return _Code(test, test)


def _compile_cidr(node: Call, source: str, args: list[_Code]) -> _Code:
    """is_ip_in_cidr(ip, cidr or [cidr, ...]): literal networks are checked and parsed now, and
    other constant ones parsed now (an invalid one skipped, as at evaluation time)."""
    cidr_node = node.args[1]
    literals: list[Literal] | None = None
    if isinstance(cidr_node, Literal):
        literals = [cidr_node]
    elif isinstance(cidr_node, ListLiteral) and all(
        isinstance(item, Literal) for item in cidr_node.items
    ):
        literals = [item for item in cidr_node.items if isinstance(item, Literal)]
    networks: list[IPNetwork] = []
    if literals is not None:
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
    elif args[1].is_constant:
        networks = _networks(args[1].constant)
    else:
        ip, dynamic = args[0].value, args[1].value

        def in_dynamic(env: Mapping[str, object]) -> bool:
            return _in_networks(ip(env), _networks(dynamic(env)))

        return _Code(in_dynamic, in_dynamic)
    if not networks:
        return _constant(False)
    return _cidr(args[0], tuple(networks))


def _cidr(subject: _Code, networks: tuple[IPNetwork, ...]) -> _Code:
    """is_ip_in_cidr with networks known at compile time: the answer for a string address is
    remembered (see CIDR_CACHE_SIZE)."""
    cache: dict[str, bool] = {}

    def on_str(ip: str) -> bool:
        found = cache.get(ip)
        if found is None:
            found = _in_networks(ip, networks)
            if len(cache) >= CIDR_CACHE_SIZE:
                cache.clear()
            cache[ip] = found
        return found

    def generic(x: Value) -> bool:
        return _in_networks(x, networks)

    name = subject.variable
    if name is None:
        test = _on_string(subject, on_str, generic)
        return _Code(test, test)

    def in_networks(env: Mapping[str, object]) -> bool:
        raw = env.get(name)
        if type(raw) is str:
            found = cache.get(raw)
            return on_str(raw) if found is None else found
        return generic(from_host(raw))

    return _Code(in_networks, in_networks)
