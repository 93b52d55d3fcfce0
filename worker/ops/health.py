"""The worker's own endpoints (DESIGN.md §8), served when WORKER_METRICS_PORT is set.

- ``GET /metrics``: Prometheus text. The stream length and pending count are read from Redis
  at scrape time, so they are never staler than the scrape.
- ``GET /healthz``: liveness. 200 while the worker's loop keeps turning; 503 when it has not
  turned for ``liveness_s`` (or no answer at all, when the event loop itself is stuck).
- ``GET /readyz``: readiness. 200 when Redis answers PING and the database ``SELECT 1``
  within the deadline; 503 with one line per failing component otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from worker.ops.metrics import Metrics
from worker.ops.serving import Served, serve_app

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Probes:
    """What the endpoints ask the worker; each call is bounded by ``deadline_s``."""

    #: Problems with Redis and the database, one line each, naming the component.
    problems: Callable[[], Awaitable[list[str]]]
    #: The backlog (ingest plus partitions), the pending count, and the ingest's length.
    backlog: Callable[[], Awaitable[tuple[int, int, int]]]
    liveness_s: float
    deadline_s: float = 2.0


def health_app(metrics: Metrics, probes: Probes) -> Starlette:
    async def scrape(_request: Request) -> Response:
        try:
            length, pending, ingest = await asyncio.wait_for(probes.backlog(), probes.deadline_s)
            metrics.stream_length.set(length)
            metrics.pending.set(pending)
            metrics.ingest.set(ingest)
        except Exception as error:  # noqa: BLE001 - the scrape still serves the rest
            log.warning("metrics: reading the stream's backlog failed: %s", error)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def alive(_request: Request) -> Response:
        idle = time.monotonic() - metrics.last_turn
        if idle <= probes.liveness_s:
            return PlainTextResponse(f"alive: the loop turned {idle:.1f} s ago\n")
        return PlainTextResponse(f"stuck: the loop has not turned for {idle:.1f} s\n", 503)

    async def ready(_request: Request) -> Response:
        try:
            problems = await asyncio.wait_for(probes.problems(), probes.deadline_s)
        except TimeoutError:
            problems = [f"checks: no answer within {probes.deadline_s} s"]
        if not problems:
            return PlainTextResponse("ready\n")
        return PlainTextResponse("".join(f"{line}\n" for line in problems), 503)

    async def not_found(_request: Request, _error: Exception) -> Response:
        return PlainTextResponse("not found: try /metrics, /healthz or /readyz\n", 404)

    routes = [Route("/metrics", scrape), Route("/healthz", alive), Route("/readyz", ready)]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})


async def serve_http(port: int, metrics: Metrics, probes: Probes) -> Served:
    """Serve the endpoints on ``port``, all interfaces; ``await close()`` stops them."""
    return await serve_app(health_app(metrics, probes), host="0.0.0.0", port=port)  # noqa: S104
