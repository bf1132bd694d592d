"""Run the service with uvicorn in this process, and stop it gracefully.

SIGTERM or SIGINT: uvicorn stops accepting connections, closes idle ones, lets every request
already accepted finish (its answer sent), then the application stops (the batcher runs what is
queued) and :func:`serve` returns. uvicorn raises the signal again once it has stopped, for the
process's own handler; :func:`serve` holds handlers that take it as done, so a graceful stop is
a normal return (exit status 0), not a death by signal.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator

from ..errors import ArcdeployError

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
BACKLOG = 2048


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (0: a free port), or a one-line reason."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ArcdeployError(f"--host {host}: not an address of this machine ({exc.strerror or exc})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ArcdeployError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def _stop_signals_return() -> Iterator[None]:
    """While uvicorn runs (it installs its own handlers and puts these back after): a stop signal
    that uvicorn raises again after its graceful shutdown is taken as handled."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: None)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def serve(
    app,
    host: str = "127.0.0.1",
    port: int = 8000,
    on_listening: Callable[[str, int], None] | None = None,
    graceful_timeout_s: int | None = None,
    access_log: bool = False,
) -> None:
    """Serve ``app`` on ``host``:``port`` until SIGTERM or SIGINT, then drain and return.

    ``on_listening(host, port)`` is called once the socket listens (``port`` 0 picks a free one).
    ``graceful_timeout_s``: the longest the drain may take (None: until every request is answered).
    """
    import uvicorn

    sock = listen(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=access_log,
        lifespan="on",
        timeout_graceful_shutdown=graceful_timeout_s,
        server_header=False,
    )
    server = uvicorn.Server(config)
    if on_listening is not None:
        on_listening(bound_host, bound_port)
    try:
        with _stop_signals_return():
            server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise ArcdeployError("the server did not start (see the lines above)")
