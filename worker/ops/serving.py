"""Serving an ASGI app from inside a running event loop, with uvicorn.

The worker serves ``/metrics`` beside its own loop, and ``update-worker web`` serves the
dashboard; both handle SIGTERM themselves, so uvicorn must not take the signal handlers (it
would swallow the worker's graceful stop). The socket is bound here first, so a taken port is
an ``OSError`` naming it, where uvicorn itself would exit the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn's server, leaving the process's signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Served:
    """A running app; ``await close()`` finishes the requests in flight and stops it."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task[None], port: int) -> None:
        self._server, self._task, self.port = server, task, port

    async def close(self) -> None:
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def wait(self) -> None:
        """Until the server stops (``close()``, or a failure, which is raised)."""
        await asyncio.shield(self._task)


async def serve_app(app: ASGIApp, *, host: str, port: int, access_log: bool = False) -> Served:
    """Start serving ``app`` on ``host:port`` (port 0: a free one, see ``Served.port``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, reuse_port=False)
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,  # the process's own logging (worker/ops/logs.py)
        access_log=access_log,
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=5,
    )
    server = _Server(config)
    # The socket listens already: a client that connects before uvicorn takes it over waits in
    # the backlog, so there is nothing to wait for here.
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"http {host}:{port}")
    task.add_done_callback(_report)
    return Served(server, task, sock.getsockname()[1])


def _report(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("%s stopped: %r", task.get_name(), error)
