"""Reads py-spy's raw output (``py-spy record -f raw``: one line per distinct stack, frames
joined by ``;``, then a space and the sample count) into the short summary the benchmark
README quotes: the functions that were on CPU most (self) and those whose callees were
(inclusive). Kept as text so that a profile can be pasted next to the figure it explains."""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

_LINE = re.compile(r":\d+\)$")


def _function(frame: str) -> str:
    """``name (file:line)`` -> ``name (file)``: lines of one function add up."""
    return _LINE.sub(")", frame.strip())


def summarize_raw(path: Path, top: int = 25) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_function(f) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return "(no samples)"
    lines = [f"{total} samples", "self (on CPU in the function itself):"]
    lines += [f"  {100 * own[f] / total:5.1f} %  {f}" for f in _top(own, top)]
    lines.append("inclusive (the function and what it calls):")
    lines += [f"  {100 * inclusive[f] / total:5.1f} %  {f}" for f in _top(inclusive, top)]
    return "\n".join(lines)


def _top(counter: Counter[str], top: int) -> list[str]:
    return [name for name, _ in counter.most_common(top)]


if __name__ == "__main__":
    print(summarize_raw(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 25))
