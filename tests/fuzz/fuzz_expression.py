"""atheris harness for tests/fuzz/targets.py:expression (run by hand; CI runs the Hypothesis twin
in tests/fuzz/test_targets.py).

    PYTHONPATH=. .venv/bin/python tests/fuzz/fuzz_expression.py -atheris_runs=10000000

Any exception the target does not catch is a finding.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from tests.fuzz.targets import expression

if __name__ == "__main__":
    atheris.Setup(sys.argv, expression)
    atheris.Fuzz()
