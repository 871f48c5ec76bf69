"""deploy/prometheus and the live /metrics, checked with promtool."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.deploy.tools import DEPLOY, ROOT, require_tool, run
from tests.integration.bridge_process import BridgeProcess, free_port
from tests.promql import exported_names, metric_names

PROMETHEUS = DEPLOY / "prometheus"
#: Series Prometheus makes itself: the alerts may read them too.
SYNTHETIC = {"up"}


def alert_expressions() -> dict[str, str]:
    """Each rule's expression: ``expr: ...`` on one line, or a ``|`` block indented below it.

    The test environment has no YAML library; the file's layout is regular enough, and promtool
    checks the same file properly in the test above.
    """
    found: dict[str, str] = {}
    lines = (PROMETHEUS / "alerts.yml").read_text().splitlines()
    name = ""
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("- alert: "):
            name = stripped.removeprefix("- alert: ")
        elif stripped.startswith("expr: "):
            value = stripped.removeprefix("expr: ")
            if value == "|":
                indent = len(line) - len(line.lstrip()) + 2
                block = []
                for following in lines[index + 1 :]:
                    if following.strip() and len(following) - len(following.lstrip()) < indent:
                        break
                    block.append(following.strip())
                value = " ".join(part for part in block if part)
            found[name] = value
    return found


def test_alert_rules_pass_promtool_check_rules() -> None:
    """The rules file parses and every expression is valid PromQL."""
    output = run([require_tool("promtool"), "check", "rules", str(PROMETHEUS / "alerts.yml")])
    assert "SUCCESS: 8 rules found" in output


def test_alert_rules_behave_as_their_comments_say() -> None:
    """promtool's rule unit tests: each alert fires on its condition and not short of it."""
    tests = Path(__file__).parent / "alerts_test.yml"
    output = run([require_tool("promtool"), "test", "rules", str(tests)])
    assert "SUCCESS" in output


def test_alert_rules_read_only_exported_metrics() -> None:
    """Every metric an alert reads is one the service exports (or Prometheus's own ``up``)."""
    expressions = alert_expressions()
    assert len(expressions) == 8
    exported = exported_names() | SYNTHETIC
    unknown = {name: metric_names(expr) - exported for name, expr in expressions.items()}
    assert not any(unknown.values()), unknown


def test_prometheus_config_passes_promtool_check_config() -> None:
    """The scrape config is valid and finds its rules file."""
    output = run([require_tool("promtool"), "check", "config", str(PROMETHEUS / "prometheus.yml")])
    assert "SUCCESS: 1 rule files found" in output
    text = (PROMETHEUS / "prometheus.yml").read_text()
    assert '"127.0.0.1:8900"' in text


def test_dashboard_expressions_are_valid_promql(tmp_path: Path) -> None:
    """Every dashboard expression parses (as a recording rule, Grafana's variables filled in)."""
    dashboard = json.loads((ROOT / "grafana" / "milterbridge.json").read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    rules = {"groups": [{"name": "dashboard", "rules": []}]}
    for index, expr in enumerate(exprs):
        filled = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
        filled = filled.replace("$filter", ".*")
        rules["groups"][0]["rules"].append({"record": f"dashboard:expr_{index}", "expr": filled})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    output = run([require_tool("promtool"), "check", "rules", str(path)])
    assert f"SUCCESS: {len(exprs)} rules found" in output


def test_live_scrape_passes_promtool_check_metrics(tmp_path: Path) -> None:
    """A running bridge's /metrics passes promtool's lint, in the process `run` really uses."""
    promtool = require_tool("promtool")
    config = tmp_path / "milterbridge.toml"
    config.write_text(
        f'[[milter]]\nname = "rspamd"\nhostname = "127.0.0.1"\nport = {free_port()}\n'
        'timeoutConnect = "1s"\n'
    )
    args = ["--config", str(config), "--admin-listen", "127.0.0.1:0"]
    with BridgeProcess(tmp_path / "bridge", args=args) as bridge:
        (listening,) = bridge.events("listening")
        response = httpx.get(f"http://{listening['admin']}/metrics", timeout=10)
    assert response.status_code == 200
    scrape = response.content
    assert b'milterbridge_filter_circuit_open{filter="rspamd"} 0.0' in scrape
    assert b"process_cpu_seconds_total" in scrape
    assert b"_created" not in scrape  # `run` turns the creation-time series off
    output = run([promtool, "check", "metrics"], stdin=scrape)
    assert output.strip() == "", output
