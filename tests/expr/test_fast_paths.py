"""The compiled evaluator's fast paths -- constant folding, flattened && / || chains, closures
specialised on a constant operand and a string variable, the CIDR cache -- give exactly what the
plain tree-walking reference evaluator (reference.py) gives, for random expressions and random
variable values, including values of the types the session never sends."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from milterbridge.expr import (
    FUNCTIONS,
    VARIABLES,
    ExpressionError,
    Value,
    compile_expression,
    compile_rules,
)
from milterbridge.expr.evaluate import CIDR_CACHE_SIZE, compile_node, compile_tree
from milterbridge.expr.parser import Binary, Call, ListLiteral, Node, Unary, parse_expression
from tests.expr import reference


class Text(str):
    """A str subclass: the session never sends one, so the fast paths, which test for exactly
    ``str``, must hand it to the generic code."""

    __slots__ = ()


STRING_VARIABLES = sorted(VARIABLES - {"recipients"})

TEXTS = st.one_of(
    st.sampled_from(
        [
            "", "", "0", "25", "025", "+25", "-1.5", "1.", ".5", "1e3", "1e999", "nan", "٣",
            "24", "26", "1.5", "-1", "1000", "abc",
            "ABC", " abc ", "example.org", "a@example.org", "<A@Example.ORG>", "postmaster",
            "192.0.2.1", "10.1.2.3", "[10.0.0.1]", "::ffff:10.0.0.1", "2001:db8::1", "(", "^a",
            "10.0.0.0/8", "local", "domain", "true", "9" * 5000,
        ]
    ),
    st.text(max_size=6),
)  # fmt: skip
SCALARS = st.one_of(
    TEXTS,
    TEXTS.map(Text),
    st.integers(-3, 30),
    st.sampled_from([0.0, -0.0, 1.5, 25.0, math.inf, -math.inf, math.nan, 1e308]),
    st.booleans(),
    st.none(),
    st.binary(max_size=2),
)
VALUES = st.one_of(
    TEXTS,
    TEXTS,
    st.sampled_from(["", [], ["a@example.org"], ["10.1.2.3", ""], "25", "10.1.2.3"]),
    SCALARS,
    st.lists(TEXTS, max_size=3),
    st.lists(SCALARS, max_size=3),
    st.tuples(TEXTS),
    st.dictionaries(st.text(max_size=2), st.text(max_size=2), max_size=1),
)
# What the session hands in: strings, and a list of strings for recipients (a variable the
# session does not know yet is missing).
SESSIONS = st.fixed_dictionaries(
    {},
    optional={
        **dict.fromkeys(STRING_VARIABLES, TEXTS),
        "recipients": st.lists(TEXTS, max_size=3),
    },
)
# Anything at all, every variable present or not.
ENVIRONMENTS = st.fixed_dictionaries({}, optional=dict.fromkeys(sorted(VARIABLES), VALUES))

CONSTANTS = st.sampled_from(
    [
        "''", "'25'", "'025'", "'1.5'", "'abc'", "'example.org'", "'a@example.org'",
        "'postmaster'", "'192.0.2.1'", "'10.0.0.0/8'", "'local'", "'domain'", "'^a'", "'('",
        "0", "25", "1.5", "25.0", "1e999", "true", "false", "[]", "['a@example.org', 25]",
        "['10.0.0.0/8', '2001:db8::/32']", "-1",
    ]
)  # fmt: skip
LEAVES = st.one_of(st.sampled_from(sorted(VARIABLES)), CONSTANTS)
BINARY = ["||", "&&", "==", "!=", "<", "<=", ">", ">=", "+", "-", "*", "/"]


def _extend(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    binary = st.tuples(children, st.sampled_from(BINARY), children).map(
        lambda parts: f"({parts[0]} {parts[1]} {parts[2]})"
    )
    unary = st.tuples(st.sampled_from(["!", "-"]), children).map(lambda p: f"{p[0]}({p[1]})")
    calls = st.sampled_from(sorted(FUNCTIONS)).flatmap(
        lambda name: st.lists(children, min_size=FUNCTIONS[name], max_size=FUNCTIONS[name]).map(
            lambda args: f"{name}({', '.join(args)})"
        )
    )
    lists = st.lists(children, max_size=3).map(lambda items: "[" + ", ".join(items) + "]")
    return st.one_of(binary, binary, unary, calls, calls, lists)


EXPRESSIONS = st.recursive(LEAVES, _extend, max_leaves=8)

# The shapes the fast paths are written for, so that every one of them is tried often: a
# variable (or a call on one) against a constant, either way round, and chains of them.
SUBJECTS = st.one_of(
    st.sampled_from(sorted(VARIABLES)),
    st.sampled_from(["recipients", "remote_port", "sender_domain"]),
    st.sampled_from(sorted(VARIABLES)).map(lambda name: f"to_lowercase({name})"),
)
COMPARISONS = st.one_of(
    st.tuples(SUBJECTS, st.sampled_from(BINARY[2:8]), CONSTANTS).map(" ".join),
    st.tuples(CONSTANTS, st.sampled_from(BINARY[2:8]), SUBJECTS).map(" ".join),
    st.tuples(
        st.sampled_from(["contains", "starts_with", "ends_with", "is_ip_in_cidr", "email_part"]),
        SUBJECTS,
        CONSTANTS,
    ).map(lambda p: f"{p[0]}({p[1]}, {p[2]})"),
    st.tuples(CONSTANTS, SUBJECTS).map(lambda p: f"matches({p[0]}, {p[1]})"),
    st.tuples(
        st.sampled_from(["is_empty", "len", "count", "trim", "to_uppercase", "is_ipv4_addr"]),
        SUBJECTS,
    ).map(lambda p: f"{p[0]}({p[1]})"),
    SUBJECTS,
)
CHAINS = st.lists(
    st.tuples(st.sampled_from(["", "!"]), COMPARISONS).map(lambda p: f"{p[0]}({p[1]})"),
    min_size=1,
    max_size=7,
).flatmap(
    lambda clauses: st.lists(
        st.sampled_from(["||", "&&"]), min_size=len(clauses) - 1, max_size=len(clauses) - 1
    ).map(lambda ops: _join(clauses, ops))
)


def _join(clauses: list[str], ops: list[str]) -> str:
    """``a || b && c ...``, unparenthesized: the parser groups the chains."""
    return clauses[0] + "".join(f" {op} {c}" for op, c in zip(ops, clauses[1:], strict=True))


def same(actual: object, expected: object) -> bool:
    """Equal values of the same type, item by item; NaN is the same as NaN."""
    if type(actual) is not type(expected):
        return False
    if isinstance(actual, list) and isinstance(expected, list):
        return len(actual) == len(expected) and all(map(same, actual, expected))
    if isinstance(actual, float) and isinstance(expected, float):
        return actual == expected or (math.isnan(actual) and math.isnan(expected))
    return actual == expected


def check(source: str, variables: Mapping[str, object]) -> None:
    """The expression and every part of it (so that one clause of a chain that another clause
    hides is checked too) give what the reference gives."""
    try:
        tree = compile_expression(source).tree
    except ExpressionError:  # a bad literal regex, CIDR or email_part part
        return
    for node in subtrees(tree):
        compiled = compile_node(node, source)
        expected = reference.evaluate(node, variables)
        value = compiled.value(variables)
        assert same(value, expected), (str(node), variables, value, expected)
        truth = compiled.test(variables)
        assert truth is reference.truthy(expected), (str(node), variables)


def subtrees(node: Node) -> Iterator[Node]:
    yield node
    children: tuple[Node, ...] = ()
    if isinstance(node, ListLiteral | Call):
        children = node.items if isinstance(node, ListLiteral) else node.args
    elif isinstance(node, Binary):
        children = (node.left, node.right)
    elif isinstance(node, Unary):
        children = (node.operand,)
    for child in children:
        yield from subtrees(child)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(EXPRESSIONS, SESSIONS, ENVIRONMENTS)
@example("remote_port == 25", {"remote_port": "25"}, {})
@example("recipients == ''", {"recipients": ""}, {})
@example("contains(recipients, '')", {"recipients": [None, b"x"]}, {})
@example("len(recipients) + count(recipients)", {"recipients": "abc"}, {})
@example("('1e999' - '1e999') == ('1e999' - '1e999')", {}, {})
def test_random_expressions_agree_with_the_reference(
    source: str, session: dict[str, object], anything: dict[str, object]
) -> None:
    check(source, session)
    check(source, anything)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CHAINS, SESSIONS, ENVIRONMENTS)
@example(
    "sender_domain == 'example.org' || authenticated_as != ''", {"sender_domain": Text("")}, {}
)
@example("!recipients", {"recipients": []}, {})
@example("25 < remote_port", {"remote_port": "1e3"}, {})
@example("is_ip_in_cidr(remote_ip, '10.0.0.0/8')", {"remote_ip": "[10.0.0.1]"}, {})
@example("contains(recipients, 'a@example.org')", {"recipients": ("a@example.org",)}, {})
def test_specialised_shapes_agree_with_the_reference(
    source: str, session: dict[str, object], anything: dict[str, object]
) -> None:
    check(source, session)
    check(source, anything)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(CHAINS, CHAINS), max_size=3), CHAINS, st.one_of(SESSIONS, ENVIRONMENTS))
def test_rules_agree_with_the_reference(
    match: list[tuple[str, str]], else_: str, variables: dict[str, object]
) -> None:
    try:
        rules = compile_rules(match, else_)
    except ExpressionError:
        return
    expected = reference.evaluate_rules(
        [(parse_expression(c), parse_expression(t)) for c, t in match],
        parse_expression(else_),
        variables,
    )
    assert rules.evaluate(variables) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "source",
    [
        "[1, [2, 'a']]",
        "[1] + [[2]]",
        "to_lowercase(['A', 'B'])",
        "recipients",
        "[recipients]",
        "email_part(recipients, 'domain')",
    ],
)
def test_a_list_value_is_new_at_every_evaluation(source: str) -> None:
    """Constant lists are folded once but handed out as copies, and a variable's list is never
    the session's own: a caller changing a value changes nothing else."""
    compiled = compile_expression(source)
    session: dict[str, str | list[str]] = {"recipients": ["A@b", "c@D"]}
    first = compiled.evaluate(session)
    expected = copy.deepcopy(first)
    assert isinstance(first, list)
    first.append("x")
    if first and isinstance(first[0], list):
        first[0].append("y")
    assert compiled.evaluate(session) == expected
    assert session == {"recipients": ["A@b", "c@D"]}


def test_constant_subtrees_are_folded_and_still_agree() -> None:
    for source in ("1 + 2 * 3", "!('' || 0)", "len('abc') == 3", "-'2' * 2", "[1, 'a'] + []"):
        compiled = compile_expression(source)
        assert same(compiled.evaluate({}), reference.evaluate(compiled.tree, {}))
    # a chain with a decisive constant is that constant, whatever the variables are
    assert compile_expression("sender == 'x' || true").truthy({}) is True
    assert compile_expression("false && matches('a', sender)").evaluate({"sender": "a"}) is False
    # a constant regex or CIDR that is not a literal is used as at evaluation time
    assert compile_expression("matches('^' + 'a', sender)").evaluate({"sender": "ab"}) is True
    assert compile_expression("matches('(' + '', sender)").evaluate({"sender": "("}) is False
    cidr = compile_expression("is_ip_in_cidr(remote_ip, ['10.0.0.0/8', -1, 'bad'])")
    assert cidr.evaluate({"remote_ip": "10.1.1.1"}) is True


def test_compile_tree_gives_the_value() -> None:
    source = "sender_domain == 'example.org' || count(recipients)"
    evaluator = compile_tree(parse_expression(source), source)
    assert evaluator({"sender_domain": "example.org"}) is True
    assert evaluator({"recipients": ["a"]}) is True
    assert evaluator({}) is False


def test_the_cidr_cache_stays_bounded_and_right() -> None:
    compiled = compile_expression("is_ip_in_cidr(remote_ip, '10.0.0.0/8')")
    for round_ in range(2):
        for n in range(CIDR_CACHE_SIZE + 10):
            inside = f"10.0.{n // 256}.{n % 256}"
            outside = f"11.0.{n // 256}.{n % 256}"
            assert compiled.truthy({"remote_ip": inside}) is True, round_
            assert compiled.truthy({"remote_ip": outside}) is False, round_
    assert compiled.truthy({"remote_ip": "::ffff:10.9.8.7"}) is True
    assert compiled.truthy({"remote_ip": ["10.0.0.1"]}) is False


def test_a_subclass_of_str_takes_the_generic_path() -> None:
    variables: dict[str, Value] = {"sender_domain": Text("example.org"), "remote_port": Text("25")}
    for source, expected in [
        ("sender_domain == 'example.org'", True),
        ("sender_domain != 'example.org'", False),
        ("ends_with(sender_domain, '.org')", True),
        ("contains(sender_domain, 'ample')", True),
        ("remote_port == 25", True),
        ("remote_port < 100", True),
        ("sender_domain + '.'", "example.org."),
    ]:
        assert compile_expression(source).evaluate(variables) == expected  # type: ignore[arg-type]
