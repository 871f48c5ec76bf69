"""deploy/docker and deploy/kubernetes: read, since neither docker nor a cluster is at hand.

What can be checked without them is checked: the configurations they ship load as the service
would load them and listen where the ports, probes and monitors look; the probes name the
admin endpoints the service serves.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from milterbridge.config import parse_config, parse_host_port
from tests.deploy.tools import DEPLOY

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
KUBERNETES = DEPLOY / "kubernetes"


def instructions(path: Path) -> list[tuple[str, str]]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    found = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def test_dockerfile_runs_unprivileged_and_checks_its_health() -> None:
    """python:3.11-slim, a numeric non-root user, both ports, a HEALTHCHECK on /healthz."""
    steps = instructions(DOCKERFILE)
    assert [rest for keyword, rest in steps if keyword == "FROM"][-1] == "python:3.11-slim"
    (user,) = [rest for keyword, rest in steps if keyword == "USER"]
    assert not user.startswith(("0", "root"))
    assert ("EXPOSE", "8899 8900") in steps
    (health,) = [rest for keyword, rest in steps if keyword == "HEALTHCHECK"]
    assert "http://127.0.0.1:8900/healthz" in health


def test_container_config_listens_where_the_image_exposes() -> None:
    """The image's config loads and binds 0.0.0.0 on the exposed ports."""
    path = DEPLOY / "docker" / "milterbridge.toml"
    steps = instructions(DOCKERFILE)
    assert ("COPY", f"deploy/docker/{path.name} /etc/milterbridge/milterbridge.toml") in steps
    config = parse_config(path.read_bytes(), path)
    assert config.server.listen == ["inet:0.0.0.0:8899"]
    assert parse_host_port(config.admin.listen) == ("0.0.0.0", 8900)


def configmap_toml() -> str:
    """The ``milterbridge.toml: |`` block of the ConfigMap."""
    text = (KUBERNETES / "configmap.yaml").read_text()
    block = text.split("milterbridge.toml: |\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line.strip() and not line.startswith("    "):
            break
        lines.append(line)
    return textwrap.dedent("\n".join(lines))


def test_configmap_holds_a_valid_config_on_the_pod_ports() -> None:
    """The ConfigMap's TOML loads, on the ports the Deployment names milter and admin."""
    config = parse_config(configmap_toml(), KUBERNETES / "configmap.yaml")
    assert config.server.listen == ["inet:0.0.0.0:8899"]
    assert parse_host_port(config.admin.listen) == ("0.0.0.0", 8900)
    deployment = (KUBERNETES / "deployment.yaml").read_text()
    assert re.search(r"- name: milter\n\s+containerPort: 8899\n", deployment)
    assert re.search(r"- name: admin\n\s+containerPort: 8900\n", deployment)


def test_probes_use_the_admin_endpoints() -> None:
    """Liveness asks /healthz, readiness /readyz, both on the admin port."""
    deployment = (KUBERNETES / "deployment.yaml").read_text()
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        pattern = rf"{probe}:\n\s+httpGet:\n\s+path: {path}\n\s+port: admin\n"
        assert re.search(pattern, deployment), probe


def test_podmonitor_scrapes_the_admin_port_as_job_milterbridge() -> None:
    """The PodMonitor scrapes /metrics on the admin port, with the job label the alerts use."""
    monitor = (KUBERNETES / "podmonitor.yaml").read_text()
    assert "kind: PodMonitor" in monitor
    assert re.search(r"- port: admin\n\s+path: /metrics\n", monitor)
    assert "jobLabel: app.kubernetes.io/name" in monitor
    assert "app.kubernetes.io/name: milterbridge" in (KUBERNETES / "deployment.yaml").read_text()


def test_kustomization_lists_every_manifest() -> None:
    """kubectl apply -k deploy/kubernetes applies every file there."""
    kustomization = (KUBERNETES / "kustomization.yaml").read_text()
    manifests = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(re.findall(r"^  - (\S+)$", kustomization, re.M)) == manifests


def test_example_config_loads() -> None:
    """The systemd unit's example config (deploy/milterbridge.toml) loads, admin included."""
    path = DEPLOY / "milterbridge.toml"
    config = parse_config(path.read_bytes(), path)
    assert config.admin.listen == "127.0.0.1:8900"
