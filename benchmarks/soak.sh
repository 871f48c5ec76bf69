#!/usr/bin/env bash
# The soak test of issue #10 item 3, by hand: 100,000 messages through
# smtp-source -> Postfix -> milterbridge -> three C filters while filters are killed at random.
#
#     sudo benchmarks/soak.sh [--messages N] [--kill-every S] [...]   # from anywhere
#     PYTHON=/path/to/venv/bin/python benchmarks/soak.sh --messages 2000
#
# Every option goes to benchmarks/soak.py (--help lists them). The markdown table goes to
# stdout, progress to stderr; the exit status is 1 if a message was lost, duplicated or
# half-edited, or the bridge leaked memory or file descriptors. The full run takes 30-60
# minutes on a loaded 2-core machine; run it with nice and in the background if you like.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
ulimit -n 65536 2>/dev/null || ulimit -n 4096 2>/dev/null || true
exec "$PYTHON" benchmarks/soak.py "$@"
