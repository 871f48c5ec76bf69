"""grafana/milterbridge.json: a current Grafana dashboard built only on metrics we export."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.promql import exported_names, metric_names

DASHBOARD = Path(__file__).resolve().parents[1] / "grafana" / "milterbridge.json"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [
        target["expr"]
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def variable_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    return {
        variable["name"]: variable["definition"]
        for variable in dashboard["templating"]["list"]
        if variable["type"] == "query"
    }


def test_every_expression_reads_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    """Each PromQL expression, panels and variables, names only series the code exports."""
    exported = exported_names()
    used: dict[str, set[str]] = {}
    for expr in expressions(dashboard):
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        used[expr] = names
    for query in variable_queries(dashboard).values():
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
        assert match, query
        used[query] = {match.group(1)}
    unknown = {expr: names - exported for expr, names in used.items() if names - exported}
    assert not unknown, unknown


def test_every_service_metric_has_a_panel(dashboard: dict[str, Any]) -> None:
    """No milterbridge_* family is left off the dashboard."""
    used = set().union(*(metric_names(expr) for expr in expressions(dashboard)))
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in exported_names()}
    missing = {
        name
        for name in families
        if name.startswith("milterbridge_")
        and not any(u == name or re.sub(r"_bucket$", "", u) == name for u in used)
    }
    assert not missing


def test_dashboard_model(dashboard: dict[str, Any]) -> None:
    """Current schema, the datasource and filter variables, every panel on ${datasource}."""
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] == "milterbridge"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variable_queries(dashboard)["filter"] == "label_values(milterbridge_filter_up, filter)"
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


def test_filter_panels_honour_the_filter_variable(dashboard: dict[str, Any]) -> None:
    """Every expression on a per-filter metric is narrowed by $filter."""
    for expr in expressions(dashboard):
        if any(name.startswith("milterbridge_filter_") for name in metric_names(expr)):
            assert 'filter=~"$filter"' in expr, expr


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'histogram_quantile(0.99, sum by (le, stage) (rate(a_bucket{stage="eom"}[5m])))',
            {"a_bucket"},
        ),
        ("sum(rate(x_total[$__rate_interval])) by (job) / on (job) group_left y", {"x_total", "y"}),
        ('rate(p{instance=~"$instance"}[1m]) and on (job, instance) b_info', {"p", "b_info"}),
        ("1e3 * up offset 5m > bool 0.5", {"up"}),
    ],
)
def test_metric_name_reader(expr: str, names: set[str]) -> None:
    """The reader finds metric names, and not functions, labels, keywords or numbers."""
    assert metric_names(expr) == names
