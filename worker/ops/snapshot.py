"""One look at a deployment, for ``update-worker stats``: the ingest, every partition (its
owner, backlog, pending and oldest pending age), the consumers, and the dead letters.
Read-only."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from worker.stream import deployment
from worker.stream.client import AnyRedis, primary_of
from worker.stream.names import Names, entry_ms, text


@dataclass(frozen=True, slots=True)
class Consumer:
    name: str
    pending: int
    idle_s: float


@dataclass(frozen=True, slots=True)
class Partition:
    number: int
    owner: str | None
    length: int
    pending: int
    oldest_pending_age_s: float | None
    #: On a Redis Cluster, the primary (``host:port``) that holds the partition's slot.
    primary: str | None = None
    #: Entries of this partition answered, ever (read by the group and no longer pending).
    answered: int = 0
    #: Age of its oldest entry not yet answered (read or not), since its XADD.
    lag_s: float | None = None

    @property
    def unread(self) -> int:
        return max(0, self.length - self.pending)


@dataclass(frozen=True, slots=True)
class Snapshot:
    taken: float
    #: Entries in the ingest and the partitions, unread plus pending.
    stream_length: int
    pending: int
    #: Entries the group has read minus those pending: the answered ones, ever.
    answered: int
    oldest_pending_age_s: float | None
    dead_letters: int
    #: Ingest entries not yet moved to their partitions.
    ingest: int = 0
    consumers: list[Consumer] = field(default_factory=list)
    partitions: list[Partition] = field(default_factory=list)
    #: Consumers whose worker is running: its deployment record is fresh.
    alive: frozenset[str] = frozenset()
    #: Every worker's deployment record, live or gone.
    records: list[deployment.Record] = field(default_factory=list)

    def rate(self, earlier: Snapshot) -> float:
        """Jobs answered per second since ``earlier``."""
        elapsed = self.taken - earlier.taken
        return max(0, self.answered - earlier.answered) / elapsed if elapsed > 0 else 0.0


async def snapshot(redis: AnyRedis, names: Names, group: str) -> Snapshot:
    count = await deployment.recorded_partitions(redis, names) or 0
    ingest = int(await redis.xlen(names.stream))
    views, answered = [], 0
    pending_by: Counter[str] = Counter()
    idle_by: dict[str, float] = {}
    for number in range(count):
        stream = names.partition(number)
        info = await _group(redis, stream, group)
        oldest = None
        if info and int(info.get("pending", 0)):
            summary = await redis.xpending(stream, group)
            oldest = max(0.0, time.time() - entry_ms(text(summary["min"])) / 1000)
            for entry in await redis.xinfo_consumers(stream, group):
                name = text(entry["name"])
                pending_by[name] += int(entry["pending"])
                idle_by[name] = min(idle_by.get(name, 1e12), int(entry["idle"]) / 1000)
        owner = await redis.get(names.owner(number))
        pending = int(info.get("pending", 0))
        done = int(info.get("entries-read") or 0) - pending
        answered += done
        length = int(await redis.xlen(stream))
        lag = None
        if length and (first := await redis.xrange(stream, count=1)):  # answered ones are gone
            lag = max(0.0, time.time() - entry_ms(text(first[0][0])) / 1000)
        views.append(Partition(number, None if owner is None else text(owner), length, pending,
                               oldest, primary_of(redis, stream), done, lag))  # fmt: skip
    records = await deployment.records(redis, names)
    alive = frozenset(record.consumer for record in records if record.live)
    for name in alive | {view.owner for view in views if view.owner}:
        pending_by.setdefault(name, 0)
    ages = [view.oldest_pending_age_s for view in views if view.oldest_pending_age_s is not None]
    return Snapshot(
        taken=time.monotonic(),
        stream_length=ingest + sum(view.length for view in views),
        pending=sum(view.pending for view in views),
        answered=answered,
        oldest_pending_age_s=max(ages, default=None),
        dead_letters=int(await redis.xlen(names.dead)),
        ingest=ingest,
        consumers=sorted(
            (Consumer(name, held, idle_by.get(name, 0.0)) for name, held in pending_by.items()),
            key=lambda c: c.name,
        ),
        partitions=views,
        alive=alive,
        records=records,
    )


async def _group(redis: AnyRedis, stream: str, group: str) -> dict[str, Any]:
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:
        return {}
    return next((found for found in groups if text(found.get("name")) == group), {})
