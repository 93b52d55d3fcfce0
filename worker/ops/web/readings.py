"""What the dashboard shows, read every few seconds by one sampler that every viewer shares:
the streams (worker/ops/snapshot.py), rates from the answered counts between two samples,
and the replies by status and error code, which each worker's heartbeat carries
(worker/stream/deployment.py).

A viewer never makes Redis or the database do more work: a page renders the latest readings.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from redis.exceptions import RedisError

from worker.errors import classify
from worker.ops.logs import mask_secrets
from worker.ops.snapshot import Partition, Snapshot, snapshot
from worker.stream import deployment
from worker.stream.client import AnyRedis
from worker.stream.names import Names

log = logging.getLogger(__name__)

#: How far back the jobs/s chart goes.
HISTORY_S = 600
#: The replies by status cover this much of the recent past.
REPLIES_WINDOW_S = 300
#: A partition with entries outstanding and none answered for this long is stalled.
STALL_S = 15


@dataclass(frozen=True, slots=True)
class PartitionView:
    number: int
    owner: str | None
    owner_live: bool
    unread: int
    pending: int
    oldest_pending_s: float | None
    lag_s: float | None
    primary: str | None
    rate: float
    #: Why the partition stands out, or None.
    stalled: str | None


@dataclass(frozen=True, slots=True)
class WorkerView:
    name: str
    live: bool
    partitions: tuple[int, ...]
    #: Seconds since the worker's last heartbeat (None: it never announced itself).
    seen_s: float | None
    pending: int
    rate: float


@dataclass(frozen=True, slots=True)
class Readings:
    taken_at: float = 0.0
    #: Entries not yet read: the ingest plus each partition's unread ones.
    backlog: int = 0
    ingest: int = 0
    pending: int = 0
    dead_letters: int = 0
    rate: float = 0.0
    #: (wall time, jobs/s), oldest first.
    history: tuple[tuple[float, float], ...] = ()
    #: ("ok" or an error code, in the replies window, since the live workers started), most
    #: first.
    replies: tuple[tuple[str, int, int], ...] = ()
    #: Where the replies window starts: the dashboard's first reading, at most
    #: REPLIES_WINDOW_S ago.
    replies_since: float | None = None
    partitions: tuple[PartitionView, ...] = ()
    workers: tuple[WorkerView, ...] = ()
    #: What failed at the last reading (the figures are then the last good ones).
    problems: tuple[str, ...] = field(default=("no reading yet",))

    @property
    def live_workers(self) -> int:
        return sum(worker.live for worker in self.workers)

    @property
    def stalled(self) -> int:
        return sum(view.stalled is not None for view in self.partitions)


class Sampler:
    def __init__(
        self,
        redis: AnyRedis,
        names: Names,
        group: str,
        *,
        interval_s: float = 2.0,
        stall_s: float = STALL_S,
    ) -> None:
        self._redis, self._names, self._group = redis, names, group
        self.interval_s, self._stall_s = interval_s, stall_s
        self.latest = Readings()
        self._previous: Snapshot | None = None
        #: partition -> (its answered count, wall time it last moved or had nothing to do)
        self._progress: dict[int, tuple[int, float]] = {}
        self._history: deque[tuple[float, float]] = deque(maxlen=int(HISTORY_S / interval_s))
        #: (wall time, replies since the sample before, by code)
        self._replies: deque[tuple[float, Counter[str]]] = deque()
        #: consumer -> its heartbeat's counts at the last sample
        self._answered: dict[str, Mapping[str, int]] | None = None
        self._since: float | None = None

    async def run(self) -> None:
        """Sample until cancelled. A failure is shown on every page (and fails ``/healthz``)
        until a sample succeeds; it never stops the sampling."""
        while True:
            try:
                await self.sample()
            except Exception as error:
                log.exception("dashboard: sampling failed")
                self.latest = replace(self.latest, problems=(f"dashboard: {error!r}",))
            await asyncio.sleep(self.interval_s)

    async def sample(self) -> Readings:
        try:
            taken = await snapshot(self._redis, self._names, self._group)
        except (RedisError, OSError) as error:
            self.latest = replace(self.latest, problems=(problem_line("redis", error),))
            return self.latest
        grown = self._count_replies(taken.records)
        self.latest = self._readings(taken, grown)
        self._previous = taken
        return self.latest

    def _readings(self, now: Snapshot, grown: Mapping[str, int]) -> Readings:
        wall = time.time()
        records = now.records
        previous = self._previous
        elapsed = now.taken - previous.taken if previous else 0.0
        before = {view.number: view.answered for view in previous.partitions} if previous else {}
        views = []
        for view in now.partitions:
            done = view.answered - before.get(view.number, view.answered)
            rate = max(0, done) / elapsed if elapsed > 0 else 0.0
            live = view.owner is not None and view.owner in now.alive
            views.append(
                PartitionView(
                    view.number,
                    view.owner,
                    live,
                    view.unread,
                    view.pending,
                    view.oldest_pending_age_s,
                    view.lag_s,
                    view.primary,
                    rate,
                    self._stall(view, live, wall),
                )
            )
        rate = now.rate(previous) if previous else 0.0
        if previous:
            self._history.append((wall, rate))
        recent, started = Counter[str](), Counter[str]()
        for _, counts in self._replies:
            recent.update(counts)
        for record in records:
            if record.live:
                started.update(record.answered)
        codes = sorted(recent.keys() | started.keys(), key=lambda code: (-started[code], code))
        return Readings(
            taken_at=wall,
            backlog=now.ingest + sum(view.unread for view in now.partitions),
            ingest=now.ingest,
            pending=now.pending,
            dead_letters=now.dead_letters,
            rate=rate,
            history=tuple(self._history),
            replies=tuple((code, recent[code], started[code]) for code in codes),
            replies_since=self._since,
            partitions=tuple(views),
            workers=_workers(
                now,
                records,
                views,
                wall,
                rates={name: count / elapsed for name, count in grown.items() if elapsed > 0},
            ),
            problems=(),
        )

    def _stall(self, view: Partition, live: bool, wall: float) -> str | None:
        answered, since = self._progress.get(view.number, (view.answered, wall))
        if view.answered != answered or view.length == 0:
            since = wall
        self._progress[view.number] = (view.answered, since)
        if view.length == 0:
            return None
        if not live:
            return "no live owner"
        if wall - since >= self._stall_s:
            return f"no job answered for {wall - since:.0f} s"
        return None

    def _count_replies(self, records: list[deployment.Record]) -> dict[str, int]:
        """What each worker answered since the last sample: the growth of its counts. A
        worker first seen after the first sample started meanwhile: all its counts are new."""
        wall = time.time()
        before = self._answered
        fresh, by_worker = Counter[str](), Counter[str]()
        for record in records if before is not None else ():
            earlier = before.get(record.consumer, {}) if before else {}
            for code, value in record.answered.items():
                grown = value - earlier.get(code, 0)
                grown = value if grown < 0 else grown  # < 0: the worker restarted
                fresh[code] += grown
                by_worker[record.consumer] += grown
        self._answered = {record.consumer: record.answered for record in records}
        self._replies.append((wall, fresh))
        self._since = self._since or wall
        while self._replies and self._replies[0][0] < wall - REPLIES_WINDOW_S:
            self._replies.popleft()
            self._since = self._replies[0][0] if self._replies else wall
        return by_worker


def _workers(
    now: Snapshot,
    records: list[deployment.Record],
    views: list[PartitionView],
    wall: float,
    rates: Mapping[str, float],
) -> tuple[WorkerView, ...]:
    """Each worker that announced itself, owns a partition or holds entries; its jobs/s from
    its heartbeat's counts, else from the partitions it owns."""
    seen = {record.consumer: wall - record.seen_s for record in records}
    pending = {consumer.name: consumer.pending for consumer in now.consumers}
    names = set(seen) | set(pending) | {view.owner for view in views if view.owner}
    return tuple(
        WorkerView(
            name=name,
            live=name in now.alive,
            partitions=tuple(view.number for view in views if view.owner == name),
            seen_s=seen.get(name),
            pending=pending.get(name, 0),
            rate=rates.get(name, sum(view.rate for view in views if view.owner == name)),
        )
        for name in sorted(names)
    )


def problem_line(component: str, error: BaseException) -> str:
    message = mask_secrets(classify(error).message)
    return message if message.startswith(f"{component}:") else f"{component}: {message}"
