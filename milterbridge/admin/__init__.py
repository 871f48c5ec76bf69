"""The admin HTTP listener (design §10, §11): metrics, liveness, readiness; later the API."""

from .endpoints import AdminApp, serve_admin
from .health import Readiness

__all__ = ["AdminApp", "Readiness", "serve_admin"]
