"""A plain tree-walking evaluator of the expression language, for the tests only.

It applies the value rules of milterbridge/expr/evaluate.py's module docstring as directly as
they can be written: no compile step, no constant folding, no fast path for strings, no caches,
and none of the package's value functions. It is slow on purpose; test_fast_paths.py checks that
the real evaluator gives exactly what it gives.

Only trees that compile are evaluated here, so a literal regex or CIDR is valid.
"""

from __future__ import annotations

import ipaddress
import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

from milterbridge.expr import Value
from milterbridge.expr.parser import Binary, Call, ListLiteral, Literal, Node, Unary, Variable

SCALARS = (str, int, float)
ORDER: dict[str, Callable[[Any, Any], Any]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
ARITHMETIC: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
}
STRING_MAPS: dict[str, Callable[[str], str]] = {
    "to_lowercase": str.lower,
    "to_uppercase": str.upper,
    "trim": str.strip,
}


def evaluate(node: Node, variables: Mapping[str, object]) -> Value:
    """The value of ``node`` for these variables."""
    if isinstance(node, Literal):
        return node.value
    if isinstance(node, ListLiteral):
        return [evaluate(item, variables) for item in node.items]
    if isinstance(node, Variable):
        return read_variable(node.name, variables)
    if isinstance(node, Unary):
        operand = evaluate(node.operand, variables)
        if node.op == "!":
            return not truthy(operand)
        number = as_number(operand)
        return "" if number is None else -number
    if isinstance(node, Binary):
        return binary(node, variables)
    return call(node, variables)


def evaluate_rules(
    rules: list[tuple[Node, Node]], otherwise: Node, variables: Mapping[str, object]
) -> bool:
    """``{match = [{if, then}, ...], else}``."""
    for condition, then in rules:
        if truthy(evaluate(condition, variables)):
            return truthy(evaluate(then, variables))
    return truthy(evaluate(otherwise, variables))


def read_variable(name: str, variables: Mapping[str, object]) -> Value:
    """Strings, numbers and booleans as they are; a list or tuple as a list of its scalars, ""
    for anything else in it; anything else, or "" for recipients, the variable's empty value."""
    raw = variables.get(name)
    empty: Value = [] if name == "recipients" else ""
    if isinstance(raw, SCALARS):
        value: Value = raw
    elif isinstance(raw, list | tuple):
        value = [item if isinstance(item, SCALARS) else "" for item in raw]
    else:
        value = empty
    if name == "recipients" and value == "":
        return []
    return value


def truthy(value: Value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    return len(value) > 0


def is_number(value: Value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def as_number(value: Value) -> int | float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        try:
            if re.fullmatch(r"[+-]?[0-9]+", value):
                return int(value)
            if re.fullmatch(
                r"[+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(?=[eE]))(?:[eE][+-]?[0-9]+)?", value
            ):
                return float(value)
        except ValueError:
            return None
    return None


def numbers(left: Value, right: Value) -> tuple[int | float, int | float] | None:
    """Both as numbers, when one of them is a number (not for two strings)."""
    if not (is_number(left) or is_number(right)):
        return None
    x, y = as_number(left), as_number(right)
    return None if x is None or y is None else (x, y)


def equal(left: Value, right: Value) -> bool:
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool) and left == right
    pair = numbers(left, right)
    if pair is not None:
        return pair[0] == pair[1]
    if isinstance(left, str) and isinstance(right, str):
        return left == right
    if isinstance(left, list) and isinstance(right, list):
        if len(left) != len(right):
            return False
        return all(equal(x, y) for x, y in zip(left, right, strict=True))
    return False


def binary(node: Binary, variables: Mapping[str, object]) -> Value:
    op = node.op
    left = evaluate(node.left, variables)
    if op == "&&":
        return truthy(left) and truthy(evaluate(node.right, variables))
    if op == "||":
        return truthy(left) or truthy(evaluate(node.right, variables))
    right = evaluate(node.right, variables)
    if op == "==":
        return equal(left, right)
    if op == "!=":
        return not equal(left, right)
    if op in ORDER:
        pair = numbers(left, right)
        if pair is not None:
            return bool(ORDER[op](*pair))
        if isinstance(left, str) and isinstance(right, str):
            return bool(ORDER[op](left, right))
        return False
    if op == "+":
        if isinstance(left, str) and isinstance(right, str):
            return left + right
        if isinstance(left, list) and isinstance(right, list):
            return left + right
        pair = numbers(left, right)
    else:
        x, y = as_number(left), as_number(right)
        pair = None if x is None or y is None else (x, y)
    if pair is None or (op == "/" and pair[1] == 0):
        return ""
    try:
        result: Value = ARITHMETIC[op](*pair)
    except OverflowError:
        return ""
    return result


def call(node: Call, variables: Mapping[str, object]) -> Value:
    args = [evaluate(arg, variables) for arg in node.args]
    name = node.name
    if name in STRING_MAPS:
        return map_strings(STRING_MAPS[name], args[0])
    if name == "is_empty":
        return isinstance(args[0], str | list) and len(args[0]) == 0
    if name == "len":
        return len(args[0]) if isinstance(args[0], str | list) else 0
    if name == "count":
        return len(args[0]) if isinstance(args[0], list) else 0
    if name == "contains":
        haystack, needle = args
        if isinstance(haystack, list):
            return any(equal(item, needle) for item in haystack)
        return isinstance(haystack, str) and isinstance(needle, str) and needle in haystack
    if name in ("starts_with", "ends_with"):
        text, affix = args
        if not (isinstance(text, str) and isinstance(affix, str)):
            return False
        return text.startswith(affix) if name == "starts_with" else text.endswith(affix)
    if name == "matches":
        return matches(args[0], args[1])
    if name == "is_ip_in_cidr":
        return in_cidr(args[0], args[1])
    if name == "is_ipv4_addr":
        return isinstance(parse_ip(args[0]), ipaddress.IPv4Address)
    if name == "is_ipv6_addr":
        return isinstance(parse_ip(args[0]), ipaddress.IPv6Address)
    if name == "email_part":
        return email_part(args[0], args[1])
    assert name == "is_intersect"
    left, right = args
    if not (isinstance(left, list) and isinstance(right, list)):
        return False
    return any(equal(x, y) for x in left for y in right)


def map_strings(function: Callable[[str], str], value: Value) -> Value:
    if isinstance(value, str):
        return function(value)
    if isinstance(value, list):
        return [function(item) if isinstance(item, str) else item for item in value]
    return ""


def matches(pattern: Value, value: Value) -> bool:
    if not isinstance(pattern, str):
        return False
    try:
        regex = re.compile(pattern)
    except (re.error, OverflowError, RecursionError, ValueError):
        return False
    if isinstance(value, list):
        return any(isinstance(item, str) and regex.search(item) is not None for item in value)
    return isinstance(value, str) and regex.search(value) is not None


def parse_ip(value: Value) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not isinstance(value, str):
        return None
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def in_cidr(ip: Value, cidr: Value) -> bool:
    address = parse_ip(ip)
    if address is None:
        return False
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    for item in cidr if isinstance(cidr, list) else [cidr]:
        if not isinstance(item, str):
            continue
        try:
            network = ipaddress.ip_network(item, strict=True)
        except ValueError:
            continue
        if address in network or (mapped is not None and mapped in network):
            return True
    return False


def email_part(address: Value, part: Value) -> Value:
    if part not in ("local", "domain"):
        return ""
    if isinstance(address, list):
        return [email_part(item, part) for item in address]
    if not isinstance(address, str):
        return ""
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if "@" in text:
        local, _at, domain = text.rpartition("@")
    else:
        local, domain = text, ""
    return local if part == "local" else domain
