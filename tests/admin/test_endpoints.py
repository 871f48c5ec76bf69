"""The admin endpoints over real HTTP: httpx on trio against the listener on a free port."""

from __future__ import annotations

import ssl

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from milterbridge.admin import Readiness, serve_admin
from milterbridge.metrics import Metrics

pytestmark = pytest.mark.usefixtures("time_limit")

#: Built once: httpx would load the CA bundle for every client (plain HTTP needs none).
TLS = ssl.create_default_context()


@pytest.fixture
async def time_limit() -> object:
    with trio.fail_after(10):
        yield


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry, ["rspamd", "opendkim"])


@pytest.fixture
def readiness() -> Readiness:
    return Readiness(["rspamd", "opendkim"])


@pytest.fixture
async def client(
    nursery: trio.Nursery, registry: CollectorRegistry, readiness: Readiness, metrics: Metrics
) -> object:
    address = await nursery.start(serve_admin, "127.0.0.1:0", registry, readiness)
    async with httpx.AsyncClient(verify=TLS, base_url=f"http://{address}") as http:
        yield http


def ready(readiness: Readiness) -> None:
    readiness.listening = readiness.config_loaded = True
    readiness.filter_reachable("rspamd")
    readiness.filter_reachable("opendkim")


async def test_metrics_in_prometheus_text_format(
    client: httpx.AsyncClient, metrics: Metrics
) -> None:
    """A plain GET gets the classic text format with the service's samples."""
    metrics.session_opened()
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "milterbridge_sessions_total 1.0" in response.text
    assert 'milterbridge_filter_circuit_open{filter="rspamd"} 0.0' in response.text
    assert "# EOF" not in response.text


async def test_metrics_in_openmetrics_when_asked(client: httpx.AsyncClient) -> None:
    """An Accept header asking for OpenMetrics (as Prometheus sends it) gets OpenMetrics."""
    accept = (
        "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1"
    )
    response = await client.get("/metrics", headers={"Accept": accept})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    assert "# TYPE milterbridge_sessions counter" in response.text


async def test_healthz(client: httpx.AsyncClient) -> None:
    """Liveness answers ok whatever the readiness."""
    response = await client.get("/healthz")
    assert (response.status_code, response.text) == (200, "ok\n")


async def test_readyz_is_503_with_every_reason(
    client: httpx.AsyncClient, readiness: Readiness
) -> None:
    """Not listening, no config, one filter unreachable, one unknown: each is a reason."""
    readiness.filter_unreachable("rspamd", "refused: connection refused")
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["ready"] is False
    assert body["reasons"] == [
        "milter listeners are not accepting connections",
        "no configuration is loaded",
        "filter rspamd is unreachable: refused: connection refused",
        "filter opendkim is unknown: not probed yet",
    ]
    assert body["filters"]["rspamd"] == {
        "state": "unreachable",
        "circuitOpen": False,
        "ready": False,
        "reason": "refused: connection refused",
    }


async def test_readyz_is_200_when_everything_is_up(
    client: httpx.AsyncClient, readiness: Readiness
) -> None:
    """Listening, configured and every filter reachable: ready, no reasons."""
    ready(readiness)
    response = await client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["ready"] is True
    assert body["reasons"] == []
    assert body["listening"] is True
    assert body["configLoaded"] is True
    assert {name: f["state"] for name, f in body["filters"].items()} == {
        "rspamd": "reachable",
        "opendkim": "reachable",
    }


async def test_readyz_counts_an_open_circuit_as_ready(
    client: httpx.AsyncClient, readiness: Readiness
) -> None:
    """A dead filter whose circuit is open is being coped with: the bridge stays ready."""
    ready(readiness)
    readiness.filter_unreachable("opendkim", "connect_timeout: no answer in 30 s")
    assert (await client.get("/readyz")).status_code == 503
    readiness.filter_circuit("opendkim", True)
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["filters"]["opendkim"]["circuitOpen"] is True


@pytest.mark.parametrize("path", ["/", "/nope", "/metrics/x", "/api", "/api/session"])
async def test_unknown_paths_and_the_api_are_404(client: httpx.AsyncClient, path: str) -> None:
    """Anything but the three endpoints is 404, the admin API included (not served yet)."""
    assert (await client.get(path)).status_code == 404


async def test_api_post_is_404_too(client: httpx.AsyncClient) -> None:
    """A JMAP request to /api is not mistaken for a bad method on a known endpoint."""
    response = await client.post("/api", json={"using": [], "methodCalls": []})
    assert response.status_code == 404


async def test_other_methods_are_405(client: httpx.AsyncClient) -> None:
    """The endpoints are read-only; the Allow header says what they take."""
    response = await client.post("/metrics", content=b"x")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"


async def test_head_has_the_headers_and_no_body(client: httpx.AsyncClient) -> None:
    """HEAD gets GET's status and length, without the body."""
    response = await client.head("/healthz")
    assert response.status_code == 200
    assert response.headers["content-length"] == "3"
    assert response.content == b""


async def test_query_string_is_ignored(client: httpx.AsyncClient) -> None:
    """A query string does not change the route."""
    assert (await client.get("/healthz?verbose=1")).status_code == 200


async def test_scrapes_log_nothing_above_debug(client: httpx.AsyncClient) -> None:
    """Each request is one debug line at most: scrapes never fill the info log."""
    with capture_logs() as logs:
        for path in ("/metrics", "/healthz", "/readyz", "/nope"):
            await client.get(path)
    assert logs, "no request was logged at all"
    assert {line["log_level"] for line in logs} == {"debug"}
    assert [line["path"] for line in logs if line["event"] == "admin_request"] == [
        "/metrics",
        "/healthz",
        "/readyz",
        "/nope",
    ]


async def test_listener_reports_its_bound_port(
    nursery: trio.Nursery, registry: CollectorRegistry, readiness: Readiness
) -> None:
    """Port 0 is reported as the real port, in the HOST:PORT form of [admin] listen."""
    address = await nursery.start(serve_admin, "127.0.0.1:0", registry, readiness)
    host, _, port = address.rpartition(":")
    assert host == "127.0.0.1"
    assert int(port) > 0


async def test_ipv6_listener(
    nursery: trio.Nursery, registry: CollectorRegistry, readiness: Readiness
) -> None:
    """An IPv6 address in brackets binds and is reported in brackets."""
    address = await nursery.start(serve_admin, "[::1]:0", registry, readiness)
    assert address.startswith("[::1]:")
    async with httpx.AsyncClient(verify=TLS) as http:
        assert (await http.get(f"http://{address}/healthz")).status_code == 200
