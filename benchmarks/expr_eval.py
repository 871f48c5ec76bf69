"""How long one `enable` evaluation takes: a five-clause expression, median of repeated runs.

    PYTHONPATH=. python benchmarks/expr_eval.py

The aim (issue #5) is under 5 microseconds per evaluation on the project's machines. The first
line is the expression's truth (``CompiledExpression.truthy``); the second is the same
expression as the ``if`` of a ``{match, else}`` table, through ``CompiledRules.evaluate``, the
call the session makes.
"""

from __future__ import annotations

import statistics
import timeit
from collections.abc import Callable

from milterbridge.expr import compile_expression, compile_rules

EXPRESSION = (
    "is_ip_in_cidr(remote_ip, '10.0.0.0/8') || sender_domain == 'example.org' || "
    "ends_with(rcpt_domain, '.test') || authenticated_as != '' || "
    "contains(recipients, 'postmaster@example.org')"
)
VARIABLES: dict[str, str | list[str]] = {
    "remote_ip": "192.0.2.10",
    "sender_domain": "sender.test",
    "rcpt_domain": "rcpt.example",
    "authenticated_as": "",
    "recipients": ["a@rcpt.example", "b@rcpt.example"],
}


def measure(label: str, call: Callable[[], object]) -> None:
    number = 20_000
    runs = timeit.repeat(call, number=number, repeat=15)
    per_call = [run / number * 1e6 for run in runs]
    print(f"{label}: median {statistics.median(per_call):.2f} µs")
    print(f"(min {min(per_call):.2f} µs, max {max(per_call):.2f} µs over {len(runs)} x {number})")


def main() -> None:
    compiled = compile_expression(EXPRESSION)
    assert compiled.truthy(VARIABLES) is False  # every clause is evaluated
    measure("five-clause expression, all clauses false", lambda: compiled.truthy(VARIABLES))
    rules = compile_rules([(EXPRESSION, "false")], "true")
    assert rules.evaluate(VARIABLES) is True
    measure("the same as a rule, then else", lambda: rules.evaluate(VARIABLES))


if __name__ == "__main__":
    main()
