"""atheris harness for tests/fuzz/targets.py:hook_answer (run by hand; CI runs the Hypothesis twin
in tests/fuzz/test_targets.py).

    PYTHONPATH=. .venv/bin/python tests/fuzz/fuzz_hook_answer.py -atheris_runs=10000000

Any exception the target does not catch is a finding.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from tests.fuzz.targets import hook_answer

if __name__ == "__main__":
    atheris.Setup(sys.argv, hook_answer)
    atheris.Fuzz()
