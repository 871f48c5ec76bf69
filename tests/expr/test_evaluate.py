"""Evaluation: truthiness, coercions, every function, compile-time checks, compile_rules, and
the promise that evaluation never raises whatever the session hands in."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milterbridge.expr import (
    FUNCTIONS,
    VARIABLES,
    CompiledRules,
    ExpressionError,
    RuleError,
    Value,
    compile_expression,
    compile_rules,
)
from milterbridge.expr.evaluate import MAX_DEPTH, as_number, truthy

SESSION: dict[str, str | list[str]] = {
    "sender": "Alice@Example.COM",
    "sender_domain": "Example.COM",
    "rcpt": "bob@rcpt.test",
    "rcpt_domain": "rcpt.test",
    "recipients": ["bob@rcpt.test", "Carol@Other.test"],
    "authenticated_as": "",
    "listener": "inet:127.0.0.1:8899",
    "remote_ip": "192.0.2.7",
    "remote_port": "25",
    "local_ip": "2001:db8::1",
    "local_port": "587",
    "protocol": "ESMTPS",
    "is_tls": "1",
    "helo_domain": " mx.example.com ",
    "priority": "10",
    "queue_id": "4ABCD",
}


def ev(source: str, variables: Mapping[str, str | list[str]] = SESSION) -> Value:
    return compile_expression(source).evaluate(variables)


def test_names() -> None:
    assert "recipients" in VARIABLES and len(VARIABLES) == 16
    assert FUNCTIONS["matches"] == 2 and FUNCTIONS["trim"] == 1 and len(FUNCTIONS) == 15


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", False),
        ("0", True),
        ("false", True),
        (0, False),
        (0.0, False),
        (-1, True),
        (0.5, True),
        (False, False),
        (True, True),
        ([], False),
        ([""], True),
    ],
)
def test_truthiness(value: Value, expected: bool) -> None:
    assert truthy(value) is expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("''", False),
        ("'x'", True),
        ("0", False),
        ("0.0", False),
        ("[]", False),
        ("[0]", True),
        ("!''", True),
        ("!authenticated_as", True),
        ("!recipients", False),
    ],
)
def test_truthy_method(source: str, expected: bool) -> None:
    assert compile_expression(source).truthy(SESSION) is expected


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("25", 25),
        ("-3", -3),
        ("+3", 3),
        ("1.5", 1.5),
        ("1.", 1.0),
        (".5", 0.5),
        ("1e3", 1000.0),
        (" 25", None),
        ("25 ", None),
        ("0x19", None),
        ("1_000", None),
        ("٣", None),
        ("", None),
        ("abc", None),
        ("9" * 5000, None),
    ],
)
def test_numeric_strings(text: str, number: float | None) -> None:
    assert as_number(text) == number


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        # arithmetic
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("7 - 10", -3),
        ("7 / 2", 3.5),
        ("6 / 3", 2.0),
        ("-(2 + 3)", -5),
        ("1.5 * 2", 3.0),
        # division by zero and other failed operations are "" (false), never an error
        ("1 / 0", ""),
        ("1 / 0.0", ""),
        ("remote_port / 0", ""),
        ("(1 / 0) || true", True),
        ("'a' - 1", ""),
        ("'a' * 2", ""),
        ("-'a'", ""),
        ("-true", ""),
        ("true + 1", ""),
        ("[1] + 1", ""),
        ("'a' + 1", ""),
        ("10" + "0" * 400 + " * 1.5", ""),  # too large for a float
        # "+" joins strings and lists
        ("'a' + 'b'", "ab"),
        ("'1' + '2'", "12"),
        ("sender_domain + '.'", "Example.COM."),
        ("[1] + ['a']", [1, "a"]),
        # numeric strings are numbers next to a number, and always for - * / and unary -
        ("remote_port + 1", 26),
        ("remote_port - local_port", -562),
        ("remote_port * '2'", 50),
        ("-remote_port", -25),
        ("'1.5' * 2", 3.0),
        # logic gives booleans and short-circuits
        ("1 && 'x'", True),
        ("0 || ''", False),
        ("'' || 'x'", True),
        ("!0", True),
        ("!recipients", False),
    ],
)
def test_operators(source: str, expected: Value) -> None:
    result = ev(source)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("remote_port == 25", True),
        ("25 == remote_port", True),
        ("remote_port == 25.0", True),
        ("remote_port != 25", False),
        ("remote_port == '25'", True),
        ("remote_port == '025'", False),  # two strings compare as strings
        ("'1.0' == 1", True),
        ("'x' == 0", False),
        ("'' == 0", False),
        ("true == 1", False),
        ("true == true", True),
        ("false != false", False),
        ("'a' == 'A'", False),
        ("[1, 'a'] == ['1', 'a']", True),
        ("[1] == [1, 2]", False),
        ("[] == ''", False),
        ("recipients == ['bob@rcpt.test', 'Carol@Other.test']", True),
        ("remote_port < 1024", True),
        ("remote_port >= 25", True),
        ("remote_port > 25", False),
        ("local_port <= 587.0", True),
        ("'10' < '9'", True),  # two strings: code point order
        ("'a' < 'b'", True),
        ("'b' >= 'a'", True),
        ("'a' < 1", False),
        ("true > false", False),
        ("[1] < [2]", False),
        ("len(sender) > 3 && protocol == 'ESMTPS'", True),
    ],
)
def test_comparisons(source: str, expected: bool) -> None:
    assert ev(source) is expected


FUNCTION_CASES: list[tuple[str, Value]] = [
    ("is_empty(authenticated_as)", True),
    ("is_empty(sender)", False),
    ("is_empty([])", True),
    ("is_empty(recipients)", False),
    ("is_empty(0)", False),
    ("is_empty(false)", False),
    ("len(sender)", 17),
    ("len(recipients)", 2),
    ("len('')", 0),
    ("len(5)", 0),
    ("count(recipients)", 2),
    ("count([])", 0),
    ("count(sender)", 0),
    ("contains(recipients, 'bob@rcpt.test')", True),
    ("contains(recipients, 'BOB@rcpt.test')", False),
    ("contains([25], remote_port)", True),
    ("contains(sender, '@Example')", True),
    ("contains(sender, '')", True),
    ("contains(sender, 1)", False),
    ("contains(1, 1)", False),
    ("starts_with(listener, 'inet:')", True),
    ("starts_with(listener, 'unix:')", False),
    ("starts_with(recipients, 'bob')", False),
    ("ends_with(rcpt, '.test')", True),
    ("ends_with(rcpt, 1)", False),
    ("to_lowercase(sender)", "alice@example.com"),
    ("to_uppercase(queue_id + 'x')", "4ABCDX"),
    ("to_lowercase(recipients)", ["bob@rcpt.test", "carol@other.test"]),
    ("to_lowercase([1, 'A'])", [1, "a"]),
    ("to_lowercase(1)", ""),
    ("trim(helo_domain)", "mx.example.com"),
    ("trim(true)", ""),
    ("matches('^alice@', to_lowercase(sender))", True),
    ("matches('^alice@', sender)", False),
    ("matches('example', sender)", False),
    ("matches('(?i)example\\.com$', sender)", True),
    ("matches('other\\.test$', to_lowercase(recipients))", True),
    ("matches('x', 1)", False),
    ("matches(protocol, 'ESMTPS over TLS')", True),  # a regex from a variable
    ("matches(authenticated_as, sender)", True),  # "" matches everything
    ("matches(1 + 1, sender)", False),
    ("is_ip_in_cidr(remote_ip, '192.0.2.0/24')", True),
    ("is_ip_in_cidr(remote_ip, '198.51.100.0/24')", False),
    ("is_ip_in_cidr(remote_ip, '192.0.2.7')", True),
    ("is_ip_in_cidr(remote_ip, ['10.0.0.0/8', '192.0.2.0/28'])", True),
    ("is_ip_in_cidr(local_ip, '2001:db8::/32')", True),
    ("is_ip_in_cidr(local_ip, '192.0.2.0/24')", False),
    ("is_ip_in_cidr('::ffff:192.0.2.9', '192.0.2.0/24')", True),
    ("is_ip_in_cidr('[192.0.2.9]', '192.0.2.0/24')", True),
    ("is_ip_in_cidr('nonsense', '192.0.2.0/24')", False),
    ("is_ip_in_cidr(recipients, '192.0.2.0/24')", False),
    ("is_ip_in_cidr(remote_ip, sender)", False),  # a CIDR from a variable: invalid is false
    ("is_ip_in_cidr(remote_ip, remote_ip + '/32')", True),
    ("is_ip_in_cidr(remote_ip, [remote_ip, 'bad'])", True),
    ("is_ipv4_addr(remote_ip)", True),
    ("is_ipv4_addr(local_ip)", False),
    ("is_ipv6_addr(local_ip)", True),
    ("is_ipv6_addr(remote_ip)", False),
    ("is_ipv4_addr('256.1.1.1')", False),
    ("is_ipv4_addr(1)", False),
    ("email_part(sender, 'local')", "Alice"),
    ("email_part(sender, 'domain')", "Example.COM"),
    ("email_part(' <a@b@c.test> ', 'local')", "a@b"),
    ("email_part('<>', 'domain')", ""),
    ("email_part('postmaster', 'local')", "postmaster"),
    ("email_part('postmaster', 'domain')", ""),
    ("email_part(recipients, 'domain')", ["rcpt.test", "Other.test"]),
    ("email_part(1, 'domain')", ""),
    ("email_part(sender, protocol)", ""),  # a part from a variable that is not a part
    ("is_intersect(recipients, ['x@y', 'bob@rcpt.test'])", True),
    ("is_intersect(recipients, ['x@y'])", False),
    ("is_intersect([25], [remote_port])", True),
    ("is_intersect(recipients, 'bob@rcpt.test')", False),
    ("is_intersect([], [])", False),
]


@pytest.mark.parametrize(("source", "expected"), FUNCTION_CASES)
def test_functions(source: str, expected: Value) -> None:
    result = ev(source)
    assert result == expected
    assert type(result) is type(expected)


def test_every_function_is_tested() -> None:
    called = " ".join(source for source, _expected in FUNCTION_CASES)
    assert [name for name in FUNCTIONS if f"{name}(" not in called] == []


def test_variables_unknown_at_evaluation_time_are_empty() -> None:
    for name in VARIABLES:
        expected: Value = [] if name == "recipients" else ""
        assert ev(name, {}) == expected
    assert ev("is_empty(recipients) && count(recipients) == 0 && sender == ''", {}) is True
    assert ev("recipients", {"recipients": ""}) == []


@pytest.mark.parametrize(
    ("source", "message", "span"),
    [
        ("matches('(', sender)", "invalid regex: missing ), unterminated subpattern", (8, 11)),
        ("matches('a{2,1}', sender)", "invalid regex: min repeat greater than max", (8, 16)),
        ("matches(1, sender)", "matches() takes a string regex", (8, 9)),
        ("is_ip_in_cidr(remote_ip, '10.0.0.1/8')", "invalid CIDR '10.0.0.1/8'", (25, 37)),
        ("is_ip_in_cidr(remote_ip, '10.0.0.0/33')", "invalid CIDR '10.0.0.0/33'", (25, 38)),
        ("is_ip_in_cidr(remote_ip, ['10.0.0.0/8', 'x'])", "invalid CIDR 'x'", (40, 43)),
        ("is_ip_in_cidr(remote_ip, 7)", "invalid CIDR 7", (25, 26)),
        ("email_part(sender, 'host')", "email_part() takes 'local' or 'domain'", (19, 25)),
    ],
)  # fmt: skip
def test_compile_time_checks(source: str, message: str, span: tuple[int, int]) -> None:
    with pytest.raises(ExpressionError) as info:
        compile_expression(source)
    assert info.value.message.startswith(message)
    assert info.value.span == span


def test_compile_error_caret() -> None:
    with pytest.raises(ExpressionError) as info:
        compile_expression("remote_port == 25 && matches('[a-', helo_domain)")
    assert str(info.value) == (
        "invalid regex: unterminated character set at position 0\n"
        "    remote_port == 25 && matches('[a-', helo_domain)\n"
        "                                 ~~~~^"
    )


def test_depth_limit() -> None:
    assert ev("1" + " + 1" * MAX_DEPTH, {}) == MAX_DEPTH + 1
    with pytest.raises(ExpressionError, match="expression too deep"):
        compile_expression("1" + " + 1" * 5000)


def test_compile_rules_first_match_wins() -> None:
    rules = compile_rules(
        [
            ("is_ip_in_cidr(remote_ip, '192.0.2.0/24')", "false"),
            ("remote_port == 25", "true"),
            ("true", "false"),
        ],
        "true",
    )
    assert isinstance(rules, CompiledRules)
    assert rules.evaluate(SESSION) is False
    assert rules.evaluate({**SESSION, "remote_ip": "10.0.0.1"}) is True
    assert rules.evaluate({"remote_port": "587"}) is False
    assert compile_rules([], "false").evaluate(SESSION) is False
    assert compile_rules([], "true").evaluate({}) is True


def test_compile_rules_then_and_else_are_expressions() -> None:
    rules = compile_rules([("!is_empty(authenticated_as)", "remote_port == 587")], "is_tls")
    assert rules.evaluate({"authenticated_as": "u", "remote_port": "587"}) is True
    assert rules.evaluate({"authenticated_as": "u", "remote_port": "25"}) is False
    assert rules.evaluate({"is_tls": "1"}) is True
    assert rules.evaluate({}) is False


@pytest.mark.parametrize(
    ("match", "else_", "location", "printed"),
    [
        (
            [("true", "true"), ("sendr == ''", "true")],
            "true",
            "match[1].if",
            "match[1].if: unknown variable 'sendr'\n    sendr == ''\n    ~~~~^",
        ),
        (
            [("true", "ture")],
            "true",
            "match[0].then",
            "match[0].then: unknown variable 'ture'\n    ture\n    ~~~^",
        ),
        (
            [],
            "",
            "else",
            "else: expected an expression\n    \n    ^",
        ),
    ],
)
def test_compile_rules_errors(
    match: list[tuple[str, str]], else_: str, location: str, printed: str
) -> None:
    with pytest.raises(RuleError) as info:
        compile_rules(match, else_)
    assert isinstance(info.value, ExpressionError)
    assert info.value.location == location
    assert str(info.value) == printed
    assert (info.value.index, info.value.part) == (
        (None, "else") if location == "else" else (int(location[6]), location.split(".")[1])
    )


# -- never raises ----------------------------------------------------------------------------

# Expressions that use every variable, every function and every operator, most of them on
# operands of the "wrong" type once the variables are random.
CORPUS = [
    compile_expression(source)
    for source in [
        *sorted(VARIABLES),
        "sender + rcpt + remote_port",
        "remote_port - local_port * priority / queue_id",
        "priority / 0 || -priority || !priority",
        "remote_port == 25 || remote_port != '25' || remote_port < 1024 || local_port >= 1.5",
        "recipients + recipients == recipients && recipients < rcpt",
        "recipients > 1 || recipients <= [] || is_tls == true || is_tls > false",
        "is_empty(authenticated_as) && len(helo_domain) + count(recipients) > 0",
        "contains(recipients, rcpt) || contains(sender, sender_domain) || contains(queue_id, 1)",
        "starts_with(sender, rcpt) || ends_with(recipients, helo_domain)",
        "to_lowercase(sender) + to_uppercase(recipients) + trim(helo_domain)",
        "matches('^a.*@example\\.(com|org)$', sender) || matches('x', recipients)",
        "matches(protocol, helo_domain) || matches(recipients, sender)",
        "is_ip_in_cidr(remote_ip, '10.0.0.0/8') || is_ip_in_cidr(local_ip, ['::1/128'])",
        "is_ip_in_cidr(remote_ip, listener) || is_ip_in_cidr(recipients, [local_ip, sender])",
        "is_ipv4_addr(remote_ip) || is_ipv6_addr(recipients)",
        "email_part(sender, 'domain') == sender_domain || email_part(recipients, 'local')",
        "email_part(sender, protocol) + email_part(priority, 'local')",
        "is_intersect(recipients, [rcpt, sender]) || is_intersect(sender, recipients)",
        "-(remote_port + local_port) * ('1e308' * 10) / ('9' + '9')",
        "[sender, [recipients]] == [rcpt, recipients] || len([[]]) + 1",
    ]
]

SCALARS = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", "0", "25", "-1.5", "1e999", "nan", "192.0.2.1", "::1", "a@b", "(", "["]),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.none(),
    st.binary(max_size=4),
)
WEIRD = st.one_of(SCALARS, st.lists(SCALARS, max_size=4), st.tuples(SCALARS), st.dictionaries(
    st.text(max_size=2), st.text(max_size=2), max_size=2))  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(VARIABLES)), WEIRD))
def test_evaluation_never_raises(variables: dict[str, object]) -> None:
    for expression in CORPUS:
        value = expression.evaluate(variables)  # type: ignore[arg-type]
        assert isinstance(value, str | int | float | bool | list)
        assert isinstance(expression.truthy(variables), bool)  # type: ignore[arg-type]
    rules = compile_rules([(CORPUS[-1].text, CORPUS[-2].text)], CORPUS[-3].text)
    assert isinstance(rules.evaluate(variables), bool)  # type: ignore[arg-type]
