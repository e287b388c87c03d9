"""Run an ASGI app under a real uvicorn server in a thread on a free 127.0.0.1 port (tests only)."""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import uvicorn


def sidecar_app():
    """The real sidecar app (webhooks + credits API) when it is installed, else the credits API alone."""
    try:
        from billing_core.webapp import create_app
    except ImportError:
        from starlette.applications import Starlette

        from billing_core.credits_api import routes
        return Starlette(routes=routes())
    return create_app()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(app, *, port: int | None = None) -> Iterator[str]:
    """Yields the server's base URL; stops the server on exit."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
