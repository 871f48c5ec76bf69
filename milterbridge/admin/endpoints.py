"""The admin listener's endpoints: ``/metrics``, ``/healthz``, ``/readyz`` and ``/api``.

``/api`` (the JMAP-shaped admin API of design §10, admin/api.py) is served only when a
``[[admin.token]]`` is configured; without one it is answered 404 like any unknown path, so a
client learns that management is off rather than getting an error that looks like a failed
call, and a listener without tokens has nothing that could be guessed at.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import msgspec
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from ..config import AdminToken, parse_host_port
from .api import AdminApi
from .health import Readiness
from .http import Request, Response, plain_refusal, serve_http, text_response
from .store import FilterStore

_json = msgspec.json.Encoder()


class AdminApp:
    """Routes a request to its endpoint; ``/api`` answers POST, the others GET and HEAD.

    Args:
        store: the filters ``/api`` manages; with ``tokens`` it turns ``/api`` on.
        tokens: ``[[admin.token]]``; none (or no store): ``/api`` answers 404.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        readiness: Readiness,
        *,
        store: FilterStore | None = None,
        tokens: Sequence[AdminToken] = (),
    ) -> None:
        self.registry = registry
        self.readiness = readiness
        self.api = AdminApi(store, tokens) if store is not None and tokens else None
        self._routes: dict[str, Callable[[Request], Response]] = {
            "/metrics": self._metrics,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
        }

    async def __call__(self, request: Request) -> Response:
        if request.path == "/api" and self.api is not None:
            return await self.api(request)
        if request.path == "/api" or request.path.startswith("/api/"):
            return text_response(404, "not found: the admin API is off (no [[admin.token]])")
        route = self._routes.get(request.path)
        if route is None:
            return text_response(404, "not found")
        if request.method not in ("GET", "HEAD"):
            return text_response(405, "method not allowed", Allow="GET, HEAD")
        return route(request)

    def refuse(self, request: Request, status: int, detail: str) -> Response:
        """Words the HTTP layer's refusal of a request (too large, too slow): ``/api`` as the
        API answers (a problem document, after authentication), the rest as plain text."""
        if request.path == "/api" and self.api is not None:
            return self.api.refuse(request, status, detail)
        return plain_refusal(request, status, detail)

    def _metrics(self, request: Request) -> Response:
        # Prometheus asks for OpenMetrics in its Accept header and gets it; everyone else
        # (curl, older scrapers) gets the classic text format.
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(200, encode(self.registry), content_type)

    def _healthz(self, request: Request) -> Response:
        return text_response(200, "ok")

    def _readyz(self, request: Request) -> Response:
        report = self.readiness.report()
        return Response(
            200 if report.ready else 503,
            _json.encode(report) + b"\n",
            "application/json",
            headers=[("Cache-Control", "no-store")],
        )


async def serve_admin(
    listen: str,
    registry: CollectorRegistry,
    readiness: Readiness,
    *,
    store: FilterStore | None = None,
    tokens: Sequence[AdminToken] = (),
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin endpoints on ``listen`` (``HOST:PORT``) until cancelled.

    Reports the bound ``HOST:PORT`` (with the real port when 0 was asked for). ``store`` and
    ``tokens`` turn ``/api`` on (see :class:`AdminApp`).

    Raises:
        ValueError: ``listen`` is not ``HOST:PORT`` (the config loader has checked it already).
        OSError: the address cannot be bound.
    """
    host, port = parse_host_port(listen)
    app = AdminApp(registry, readiness, store=store, tokens=tokens)
    await serve_http(host, port, app, refuse=app.refuse, task_status=task_status)


__all__ = ["AdminApp", "serve_admin"]
