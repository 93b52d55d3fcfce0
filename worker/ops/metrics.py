"""Prometheus metrics (DESIGN.md §8); worker/ops/health.py serves them with the health
endpoints.

Each worker has a registry of its own (no process-wide state), which is what tests scrape.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import logging
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from worker.job.replies import Reply

log = logging.getLogger(__name__)

# No ``*_created`` series beside every counter: they double the output and nobody graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream

#: Job duration buckets, in seconds: a one-row job takes about a millisecond, a big one minutes.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: The buckets' ``le`` labels, as prometheus_client writes them (``1.0``, ``+Inf``).
_BOUNDS = (*map(floatToGoString, _BUCKETS), "+Inf")
#: The ``table`` label of a job that spans tables, and of one that never parsed.
SEVERAL_TABLES, NO_TABLE = "(several)", "(none)"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter("update_worker_jobs", "Jobs answered, by status (ok or the error code)"
                            " and table", ["status", "table"], registry=self.registry)  # fmt: skip
        self.rows = Counter("update_worker_rows_updated", "Rows matched by applied updates",
                            ["table"], registry=self.registry)  # fmt: skip
        self.duration = _Durations(("queue", "execution"))
        self.registry.register(self.duration)
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
        self._queue = self.duration.phases["queue"]
        self._execution = self.duration.phases["execution"]

    def turned(self) -> None:
        """The worker's loop went round once: the liveness signal."""
        self.last_turn = time.monotonic()

    def retried(self, reason: str) -> None:
        self.retries.labels(reason).inc()

    def queued(self, *enqueued_ms: int) -> None:
        """Jobs start: the queue wait of each, from its stream entry's own timestamp."""
        now_ms = time.time() * 1000
        for stamp in enqueued_ms:
            self._queue.observe(max(0.0, (now_ms - stamp) / 1000))

    def answered(self, reply: Reply, tables: Sequence[str]) -> None:
        """A reply went out for a job on ``tables`` (one per update; none if it never parsed)."""
        self.answered_many([(reply, tables)])

    def answered_many(self, answers: Iterable[tuple[Reply, Sequence[str]]]) -> None:
        """:meth:`answered` for a group: each counter child is touched once, not per job."""
        jobs: Tally[tuple[str, str]] = Tally()
        rows: Tally[str] = Tally()
        for reply, tables in answers:
            status = "ok" if reply.error is None else reply.error.code
            distinct = set(tables)
            label = tables[0] if len(distinct) == 1 else SEVERAL_TABLES if distinct else NO_TABLE
            jobs[status, label] += 1
            if reply.duration_ms:
                self._execution.observe(reply.duration_ms / 1000)
            if reply.status != "ok" or reply.replayed or reply.dry_run:
                continue  # nothing was written this time
            counts = [result.rowcount for result in reply.results or ()] or [reply.rowcount]
            for table, count in zip(tables, counts, strict=False):
                rows[table] += count
        for (status, label), count in jobs.items():
            self._jobs(status, label).inc(count)
        for table, count in rows.items():
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


class _Phase:
    """One phase's histogram: plain counts, as a single-threaded worker needs no lock (the
    scrape runs on the same event loop). prometheus_client's Histogram took two locks and
    walked its buckets in Python at every observation, and a job makes two."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKETS) + 1)  # the last: above every bound (+Inf)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(_BUCKETS, seconds)] += 1  # the first bound >= seconds
        self.total += seconds


class _Durations(Collector):
    """``update_worker_job_duration_seconds{phase}``, a histogram over ``_BUCKETS``."""

    def __init__(self, phases: Sequence[str]) -> None:
        self.phases = {phase: _Phase() for phase in phases}

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            "update_worker_job_duration_seconds",
            "Time a job spent queued (XADD to start) and executing",
            labels=["phase"],
        )
        for phase, observed in self.phases.items():
            buckets = list(zip(_BOUNDS, itertools.accumulate(observed.counts), strict=True))
            family.add_metric([phase], buckets, observed.total)
        yield family
