"""The metric names a PromQL expression reads, and the names the service exports.

A small lexical reading of PromQL, enough for the dashboard and the alert rules: strings, label
matchers, range selectors and grouping clauses are blanked out, and what is left that looks like
an identifier, is not a keyword and is not called like a function is a metric name. The syntax
itself is checked by promtool (tests/deploy).
"""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry

from milterbridge.metrics import Metrics

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
    | {"unless", "offset", "atan2", "inf", "nan"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects."""
    text = _STRING.sub('""', expr)
    for pattern in (_MATCHERS, _RANGE, _GROUPING):
        text = pattern.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        if match.group().lower() in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue
        names.add(match.group())
    return names


def exported_names() -> set[str]:
    """Every series name a fresh service registry exports (counters as ``_total``, histograms
    as ``_bucket``/``_sum``/``_count``, info metrics as ``_info``)."""
    registry = CollectorRegistry()
    Metrics(registry, ["some-filter"])
    names: set[str] = set()
    for family in registry.collect():
        match family.type:
            case "counter":
                names.add(f"{family.name}_total")
            case "histogram":
                names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
            case "info":
                names.add(f"{family.name}_info")
            case _:
                names.add(family.name)
    return names
