"""A package as an HTTP service that batches faces across requests (``arcdeploy serve``).

Needs ``pip install 'arcdeploy[serve]'`` (FastAPI, uvicorn, python-multipart, prometheus-client,
msgpack); ``--ray`` also needs ``'arcdeploy[ray]'``. :func:`create_app` gives the ASGI application
for your own stack; :func:`serve` runs it with uvicorn on one machine.
"""

from __future__ import annotations

import importlib.util

from ..errors import ArcdeployError

INSTALL_HINT = "pip install 'arcdeploy[serve]'"
REQUIRED = ("fastapi", "uvicorn", "python_multipart", "prometheus_client", "msgpack")

__all__ = ["INSTALL_HINT", "ServeSettings", "create_app", "require_serve", "serve"]


def require_serve() -> None:
    """Say what to install when a library the service needs is missing."""
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        raise ArcdeployError(f"serving needs {', '.join(missing)}: {INSTALL_HINT}")


def __getattr__(name: str):
    # the web libraries are imported when the service is asked for, not with arcdeploy.serve
    if name in ("create_app", "ServeSettings"):
        require_serve()
        from . import app

        return getattr(app, name)
    if name == "serve":
        require_serve()
        from .server import serve

        return serve
    raise AttributeError(name)
