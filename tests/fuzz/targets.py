"""Fuzz targets shared by the atheris harnesses (by hand) and their Hypothesis twins (in CI).

Each target takes arbitrary bytes and must raise nothing but the error its input deserves:
a hook answer that is not acceptable is a ``HookResponseError``; expression text that does not
compile is an ``ExpressionError``; a compiled expression never raises when evaluated, whatever
the variables hold.
"""

from __future__ import annotations

from milterbridge.engine.hook_answer import HookResponseError, answer_from_response
from milterbridge.expr import ExpressionError, compile_expression
from milterbridge.upstream.hook_response import decode_response

#: Headers the fuzzed hook answers are applied to (indices 0..3 exist).
HEADERS = [(b"From", b"a@x.test"), (b"To", b"b@y.test"), (b"Subject", b"hi"), (b"X-A", b"1")]


def hook_answer(data: bytes) -> None:
    """Decode a hook's answer and turn it into milter edits."""
    try:
        answer_from_response(decode_response(data), HEADERS[: len(data) % 5])
    except HookResponseError:
        pass


#: Variables the fuzzed expressions are evaluated with, of every type a variable can have.
VARIABLE_SETS: list[dict[str, str | list[str]]] = [
    {},
    {"sender": "a@x.test", "rcpt": "", "recipients": ["b@y.test", "ü@ß.test"], "remote_ip": "::1"},
    {"sender_domain": "123", "remote_port": "25", "recipients": [], "is_tls": "true"},
]


def expression(data: bytes) -> None:
    """Compile expression text; when it compiles, evaluate it with several variable sets."""
    text = data.decode("utf-8", "replace")
    try:
        compiled = compile_expression(text)
    except ExpressionError:
        return
    for variables in VARIABLE_SETS:
        compiled.evaluate(variables)
