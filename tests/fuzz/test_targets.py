"""The Hypothesis twins of the atheris harnesses: the same targets, fed in CI."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz.targets import expression, hook_answer

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
_types = st.sampled_from(
    [
        "changeFrom",
        "addRcpt",
        "addRecipient",
        "deleteRcpt",
        "deleteRecipient",
        "replaceContents",
        "addHeader",
        "insertHeader",
        "changeHeader",
        "deleteHeader",
        "bogus",
    ]
)
_modification = st.fixed_dictionaries(
    {"type": _types},
    optional={
        "index": st.integers(-2, 6) | _json_values,
        "name": st.sampled_from(["Subject", "X-A", "from", "Bad Name", ""]) | _json_values,
        "value": st.text(max_size=20) | _json_values,
        "parameters": st.dictionaries(st.text(max_size=6), _json_values, max_size=3) | st.none(),
    },
)
_answers = st.fixed_dictionaries(
    {"action": st.sampled_from(["accept", "reject", "discard", "quarantine", "nope"])},
    optional={
        "response": st.fixed_dictionaries(
            {},
            optional={
                "status": st.integers(0, 700) | _json_values,
                "enhancedStatus": st.text(max_size=8),
                "message": st.text(max_size=30),
                "disconnect": st.booleans(),
            },
        ),
        "modifications": st.lists(_modification, max_size=5),
    },
)


@settings(max_examples=400)
@given(_answers)
def test_hook_answers_shaped_like_the_real_thing(document: object) -> None:
    hook_answer(json.dumps(document).encode())


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_hook_answers_of_random_bytes(data: bytes) -> None:
    hook_answer(data)


_tokens = st.sampled_from(
    [
        "sender",
        "rcpt_domain",
        "recipients",
        "remote_ip",
        "'x'",
        '"y"',
        "1",
        "2.5",
        "-",
        "+",
        "*",
        "/",
        "==",
        "!=",
        "<",
        ">=",
        "&&",
        "||",
        "!",
        "(",
        ")",
        "[",
        "]",
        ",",
        "true",
        "false",
        "len(",
        "contains(",
        "matches(",
        "is_ip_in_cidr(",
        "'10.0.0.0/8'",
        "'^a'",
        "email_part(",
        "'domain'",
        "is_intersect(",
        "trim(",
        "'\\u00e9'",
        "ü",
    ]
)


@settings(max_examples=400)
@given(st.lists(_tokens, max_size=14))
def test_expressions_from_tokens(tokens: list[str]) -> None:
    expression(" ".join(tokens).encode())


@settings(max_examples=200)
@given(st.binary(max_size=80))
def test_expressions_of_random_bytes(data: bytes) -> None:
    expression(data)
