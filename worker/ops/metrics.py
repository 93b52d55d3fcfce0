"""Prometheus metrics (DESIGN.md §8); worker/ops/health.py serves them with the health
endpoints.

Each worker has a registry of its own (no process-wide state), which is what tests scrape.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import (
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

    def answered_by_status(self) -> dict[str, int]:
        """Replies sent so far, by ``ok`` or error code (all tables): the heartbeat carries it
        to the dashboard."""
        totals: dict[str, int] = {}
        for family in self.jobs.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    status = sample.labels["status"]
                    totals[status] = totals.get(status, 0) + int(sample.value)
        return totals

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
