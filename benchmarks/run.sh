#!/usr/bin/env bash
# Every figure of issue #9 on this machine, one markdown table per figure, in one run.
#
#     sudo benchmarks/run.sh [--quick]        # from anywhere; root for the Postfix rows
#     PYTHON=/path/to/venv/bin/python benchmarks/run.sh
#
# Tables go to stdout, progress to stderr; the exit status is 1 if any script reported a
# problem (its table still appears, with the problem in it). Each script measures its rows
# side by side, round by round, so that the machine's noise hits both sides of a ratio alike.
# --quick runs every script with small counts: a smoke test of the tooling, not figures.
#
#   a, d  benchmarks/protocol.py          bench -> C filter vs bench -> bridge -> C filter;
#                                         the bridge with --workers 1 vs 2
#   b, c  benchmarks/postfix_vs_bridge.py smtp-source -> Postfix -> C filter(s), directly vs
#                                         through the bridge; fan-out to three 50 ms filters
#   e     benchmarks/memory.py            RSS with 1,000 idle sessions; a 50 MB message
#         benchmarks/generator_ceiling.py what the load generator drives on its own
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
# 1,000 idle sessions, each with its socket, in the bridge and in the memory script.
ulimit -n 65536 2>/dev/null || ulimit -n 4096 2>/dev/null || true

quick=0
[ "${1:-}" = "--quick" ] && quick=1

if [ "$quick" = 1 ]; then
    protocol=(--duration 3 --rounds 1 --latency-messages 20 --warmup 10)
    postfix=(--messages 60 --rounds 1 --latency-messages 10 --warmup 5)
    memory=(--sessions 100 --size-mb 5)
    ceiling=(--duration 3 --warmup 20)
else
    protocol=(--duration 20 --rounds 3 --latency-messages 200 --warmup 40)
    postfix=(--messages 2000 --concurrency 20 --rounds 3 --latency-messages 50 --warmup 20
             --timeout 900)
    memory=(--sessions 1000 --size-mb 50)
    ceiling=(--duration 10)
fi

status=0
run() {
    local title=$1
    shift
    echo "## $title"
    echo
    echo "[$(date +%H:%M:%S)] $title: $*" >&2
    "$PYTHON" "$@" || status=1
    echo
}

echo "# milterbridge benchmarks"
echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo |
    cut -d: -f2- | sed 's/^ *//')), $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo

run "a, d: protocol level (bench -> C filter, -> bridge -> C filter; --workers 1 vs 2)" \
    benchmarks/protocol.py "${protocol[@]}"
if [ "$(id -u)" = 0 ] && [ -x /usr/sbin/smtp-source ]; then
    run "b, c: through Postfix (smtp-source -> Postfix -> C filters, direct vs via the bridge)" \
        benchmarks/postfix_vs_bridge.py --filter c "${postfix[@]}"
else
    echo "## b, c: through Postfix"
    echo
    echo "skipped: needs root and Postfix's smtp-source (apt-get install postfix)"
    echo
    status=1
fi
run "e: memory" benchmarks/memory.py "${memory[@]}"
run "the load generator's own ceiling" benchmarks/generator_ceiling.py "${ceiling[@]}"
exit $status
