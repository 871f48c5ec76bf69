"""atheris harness for the milter codec, both roles (run by hand; CI runs the Hypothesis twin).

    .venv/bin/pip install atheris
    PYTHONPATH=. .venv/bin/python tests/fuzz/fuzz_codec.py -atheris_runs=10000000

The first input byte picks the role and the read size; the rest is the stream. Any exception
other than RemoteProtocolError is a finding.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from milterbridge.milter import ALL_ACTIONS, ALL_PROTOCOL, OptNeg, Role
    from tests.milter.fuzz_target import feed


def one_input(data: bytes) -> None:
    if not data:
        return
    selector, stream = data[0], data[1:]
    role = Role.MTA if selector & 1 else Role.FILTER
    first = OptNeg(6, ALL_ACTIONS, ALL_PROTOCOL) if role is Role.MTA and selector & 2 else None
    respond = role is Role.FILTER and bool(selector & 2)
    feed(role, stream, (selector >> 2) + 1, first=first, respond=respond)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
