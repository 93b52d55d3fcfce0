"""Prometheus metrics and the health endpoints (DESIGN.md §8), served when WORKER_METRICS_PORT
is set.

- ``GET /metrics``: Prometheus text. The stream length and pending count are read from Redis
  at scrape time, so they are never staler than the scrape.
- ``GET /healthz``: liveness. 200 while the worker's loop keeps turning; 503 when it has not
  turned for ``liveness_s`` (or no answer at all, when the event loop itself is stuck).
- ``GET /readyz``: readiness. 200 when Redis answers PING and the database ``SELECT 1``
  within the deadline; 503 with one line per failing component otherwise.

Each worker has a registry of its own (no process-wide state), which is what tests scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from worker.job.replies import Reply

log = logging.getLogger(__name__)

# No ``*_created`` series beside every counter: they double the output and nobody graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream

#: Job duration buckets, in seconds: a one-row job takes about a millisecond, a big one minutes.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: The ``table`` label of a job that spans tables, and of one that never parsed.
SEVERAL_TABLES, NO_TABLE = "(several)", "(none)"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter("update_worker_jobs", "Jobs answered, by status (ok or the error code)"
                            " and table", ["status", "table"], registry=self.registry)  # fmt: skip
        self.rows = Counter("update_worker_rows_updated", "Rows matched by applied updates",
                            ["table"], registry=self.registry)  # fmt: skip
        self.duration = Histogram("update_worker_job_duration_seconds", "Time a job spent queued "
                                  "(XADD to start) and executing", ["phase"], buckets=_BUCKETS,
                                  registry=self.registry)  # fmt: skip
        self.retries = Counter("update_worker_retries", "Transient failures retried, by reason",
                               ["reason"], registry=self.registry)  # fmt: skip
        self.dead_letters = Counter("update_worker_dead_letters", "Entries dead-lettered, by "
                                    "reason", ["reason"], registry=self.registry)  # fmt: skip
        self.stream_length = Gauge("update_worker_stream_length", "Entries in the ingest and "
                                   "partition streams (backlog plus pending)",
                                   registry=self.registry)  # fmt: skip
        self.pending = Gauge("update_worker_pending_entries", "Entries handed out to the group "
                             "and not yet acked", registry=self.registry)  # fmt: skip
        self.in_flight = Gauge("update_worker_in_flight_jobs", "Entries this worker holds",
                               registry=self.registry)  # fmt: skip
        self.owned = Gauge("update_worker_partitions_owned", "Partitions this worker serves",
                           registry=self.registry)  # fmt: skip
        self.takeovers = Counter("update_worker_takeovers", "Partitions this worker took over",
                                 registry=self.registry)  # fmt: skip
        self.lane_waits = Counter("update_worker_lane_waits", "Units that waited for an earlier "
                                  "job on the same order key", registry=self.registry)  # fmt: skip
        self.ingest = Gauge("update_worker_ingest_entries", "Entries in the ingest stream not "
                            "yet moved to their partitions", registry=self.registry)  # fmt: skip
        #: On a Redis Cluster: primary -> how many of this worker's partitions it holds.
        self.by_primary: Callable[[], Mapping[str, int]] | None = None
        self.registry.register(_ByPrimary(self))
        self.last_turn = time.monotonic()
        # labels() takes a lock and builds a key on every call: the children, kept per label
        # values (a handful: statuses x tables from the schema), cost a dict lookup per job.
        self._jobs = functools.cache(self.jobs.labels)
        self._rows = functools.cache(self.rows.labels)
        self._queue = self.duration.labels("queue")
        self._execution = self.duration.labels("execution")

    def turned(self) -> None:
        """The worker's loop went round once: the liveness signal."""
        self.last_turn = time.monotonic()

    def retried(self, reason: str) -> None:
        self.retries.labels(reason).inc()

    def queued(self, enqueued_ms: int) -> None:
        """A job starts: its queue wait, from the stream entry's own timestamp."""
        self._queue.observe(max(0.0, time.time() - enqueued_ms / 1000))

    def answered(self, reply: Reply, tables: Sequence[str]) -> None:
        """A reply went out for a job on ``tables`` (one per update; none if it never parsed)."""
        status = "ok" if reply.error is None else reply.error.code
        distinct = set(tables)
        label = tables[0] if len(distinct) == 1 else SEVERAL_TABLES if distinct else NO_TABLE
        self._jobs(status, label).inc()
        if reply.duration_ms:
            self._execution.observe(reply.duration_ms / 1000)
        if reply.status != "ok" or reply.replayed or reply.dry_run:
            return  # nothing was written this time
        counts = [result.rowcount for result in reply.results or ()] or [reply.rowcount]
        for table, count in zip(tables, counts, strict=False):
            self._rows(table).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ByPrimary(Collector):
    """``update_worker_partitions_by_primary{primary}``, read at scrape time (a cluster only)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("update_worker_partitions_by_primary", "Partitions this "
                                   "worker serves, by the Redis Cluster primary that holds "
                                   "them", labels=["primary"])  # fmt: skip
        for primary, count in sorted((self._metrics.by_primary or dict)().items()):
            family.add_metric([primary], count)
        yield family


@dataclass(frozen=True, slots=True)
class Probes:
    """What the endpoints ask the worker; each call is bounded by ``deadline_s``."""

    #: Problems with Redis and the database, one line each, naming the component.
    problems: Callable[[], Awaitable[list[str]]]
    #: The backlog (ingest plus partitions), the pending count, and the ingest's length.
    backlog: Callable[[], Awaitable[tuple[int, int, int]]]
    liveness_s: float
    deadline_s: float = 2.0


async def serve_http(port: int, metrics: Metrics, probes: Probes) -> asyncio.Server:
    """Start the endpoints on ``port`` (all interfaces); close the returned server to stop."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), probes.deadline_s)
            parts = request.split(b" ", 2)
            path = parts[1].decode("ascii", "replace").split("?")[0] if len(parts) > 1 else ""
            status, kind, body = await _respond(path, metrics, probes)
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}"
                    "\r\nConnection: close\r\n\r\n")  # fmt: skip
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a client that went away or never finished asking
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host="0.0.0.0", port=port)  # noqa: S104


async def _respond(path: str, metrics: Metrics, probes: Probes) -> tuple[str, str, bytes]:
    text = "text/plain; charset=utf-8"
    if path == "/metrics":
        try:
            length, pending, ingest = await asyncio.wait_for(probes.backlog(), probes.deadline_s)
            metrics.stream_length.set(length)
            metrics.pending.set(pending)
            metrics.ingest.set(ingest)
        except Exception as error:  # noqa: BLE001 - the scrape still serves the rest
            log.warning("metrics: reading the stream's backlog failed: %s", error)
        return "200 OK", CONTENT_TYPE_LATEST, metrics.render()
    if path == "/healthz":
        idle = time.monotonic() - metrics.last_turn
        if idle <= probes.liveness_s:
            return "200 OK", text, f"alive: the loop turned {idle:.1f} s ago\n".encode()
        message = f"stuck: the loop has not turned for {idle:.1f} s\n"
        return "503 Service Unavailable", text, message.encode()
    if path == "/readyz":
        try:
            problems = await asyncio.wait_for(probes.problems(), probes.deadline_s)
        except TimeoutError:
            problems = [f"checks: no answer within {probes.deadline_s} s"]
        if not problems:
            return "200 OK", text, b"ready\n"
        return "503 Service Unavailable", text, "".join(f"{line}\n" for line in problems).encode()
    return "404 Not Found", text, b"not found: try /metrics, /healthz or /readyz\n"
