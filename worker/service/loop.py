"""The loop: partitions -> jobs -> lanes -> executor -> replies, and shutdown.

It only wires the other modules together: no SQL here, and no Redis command names. What it
reads comes from the partitions this worker owns (ownership.py), the entries claimed at
a takeover first; what it runs goes through lanes (lanes.py), so jobs that share an
order key apply one after another, in stream order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from redis.exceptions import ResponseError

from worker.db.executor import Executor
from worker.db.schema import Schema
from worker.errors import classify
from worker.job.plans import Policy
from worker.ops.metrics import Metrics
from worker.service.answers import SUMMARY_S, Answers
from worker.service.lanes import Lanes
from worker.service.ownership import Ownership
from worker.service.units import Pace, Work, order_key, prepare, units
from worker.settings import Settings
from worker.stream.client import primary_of
from worker.stream.mover import Mover
from worker.stream.names import Entry
from worker.stream.reading import Reader
from worker.stream.transport import Transport

log = logging.getLogger(__name__)

_READ_RETRY_S = 1.0
#: Longest wait for new entries in one go: partitions taken meanwhile join the next read.
_WAIT_MS = 500


def _key(entry: Entry) -> tuple[int, str]:
    return entry.partition, entry.id


@dataclass
class Worker:
    settings: Settings
    answers: Answers
    reader: Reader
    ownership: Ownership
    mover: Mover
    pace: Pace
    _running: dict[int, set[asyncio.Task[None]]] = field(
        default_factory=lambda: defaultdict(set), init=False
    )

    @property
    def schema(self) -> Schema:
        return self.answers.schema

    @property
    def executor(self) -> Executor:
        return self.answers.executor

    @property
    def transport(self) -> Transport:
        return self.answers.transport

    @property
    def metrics(self) -> Metrics:
        return self.answers.metrics

    @functools.cached_property
    def policy(self) -> Policy:
        settings = self.settings
        return Policy(max_rows_default=settings.max_rows_default, allow_all=settings.allow_all)

    async def run(self, stop: asyncio.Event | None = None, *, burst: bool = False) -> None:
        """Serve jobs until ``stop`` is set; with ``burst``, until nothing new is left.

        On stop, in-flight jobs get ``shutdown_grace_s`` to finish; whatever is left stays
        pending, and the partitions are handed over at once.
        """
        stop = stop or asyncio.Event()
        held: dict[tuple[int, str], asyncio.Task[None]] = {}  # entries held -> their task
        tasks: set[asyncio.Task[None]] = set()
        lanes = Lanes()
        slots = asyncio.Semaphore(self.settings.concurrency)  # transactions at once
        metrics = self.answers.metrics
        metrics.in_flight.set_function(lambda: len(held))  # read at scrape time
        metrics.owned.set_function(lambda: len(self.ownership.generations))
        if self.transport.cluster:
            redis, names = self.transport.redis, self.transport.names
            metrics.by_primary = lambda: Counter(
                primary_of(redis, names.partition(number)) or "?"
                for number in self.ownership.generations
            )
        self.ownership.settle = self._settle
        helpers = asyncio.Event()  # stops the ownership and mover loops, after the drain
        if burst:
            await self.ownership.tick()
            await self.mover.drain()
        background = [
            asyncio.create_task(self.ownership.run(helpers), name="ownership"),
            asyncio.create_task(self.mover.run(helpers, idle_block_ms=self.settings.block_ms),
                                name="ingest mover"),
            asyncio.create_task(self._summaries(helpers), name="summaries"),
        ]  # fmt: skip
        try:
            while not stop.is_set():
                metrics.turned()
                room = self.pace.window() - len(held)
                if len(tasks) >= 2 * self.settings.concurrency or room <= 0:
                    # A timeout, so the loop (and the liveness it reports) turns meanwhile.
                    await asyncio.wait(tasks, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                    continue
                entries = await self._next(stop, count=min(self.settings.batch_size, room),
                                           wait=not burst)  # fmt: skip
                if not entries:
                    if burst and not tasks and not self.ownership.backlog:
                        break
                    if burst:
                        await asyncio.wait(tasks, timeout=1.0)
                    continue
                # An entry claimed at a takeover may still be held by a unit of this worker's
                # own earlier ownership of the partition (its lease lapsed, then came back):
                # that unit is fenced and answers nothing, so the entry runs again here, after
                # it in the lane. Skipping it would leave it pending, and later jobs on its key
                # would go first.
                works = [self._prepare(entry) for entry in entries
                         if entry.claimed or _key(entry) not in held]  # fmt: skip
                for unit in units(works, group_size=self.settings.group_size):
                    task = self._start(unit, lanes, slots)
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    held.update(dict.fromkeys((_key(work.entry) for work in unit), task))
                    task.add_done_callback(functools.partial(_forget, held, unit))
                # Let the new units send their first statement before the next read goes out:
                # a lone job's reply comes ~0.15 ms sooner.
                await asyncio.sleep(0)
        finally:
            await self._drain(tasks)
            helpers.set()
            await asyncio.gather(*background, return_exceptions=True)
            await self.reader.close()

    async def _summaries(self, stop: asyncio.Event) -> None:
        """An INFO line every SUMMARY_S with the jobs answered meanwhile, and a last one."""
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), SUMMARY_S)
                self.answers.summarize()
        finally:
            self.answers.summarize()

    def _prepare(self, entry: Entry) -> Work:
        settings = self.settings
        return prepare(entry, schema=self.answers.schema, max_job_bytes=settings.max_job_bytes,
                       max_deliveries=settings.max_deliveries, policy=self.policy)  # fmt: skip

    def _start(
        self, unit: list[Work], lanes: Lanes, slots: asyncio.Semaphore
    ) -> asyncio.Task[None]:
        keys = {key for work in unit if (key := order_key(work)) is not None}
        before, done = lanes.enter(keys)
        partitions = {work.entry.partition for work in unit}
        fences = {number: self.ownership.generations.get(number, -1) for number in partitions}

        async def run() -> None:
            try:
                if before:
                    self.answers.metrics.lane_waits.inc()
                    # wait, not gather: a cancelled waiter must not cancel the units it waits on
                    await asyncio.wait(before)
                if stale := await self.answers.handle(unit, slots, fences=fences):
                    await self.ownership.fenced({number: fences[number] for number in stale})
                self.pace.finished(len(unit))
            finally:
                lanes.leave(keys, done)

        task = asyncio.create_task(run())
        for number in partitions:
            self._running[number].add(task)
            task.add_done_callback(self._running[number].discard)
        return task

    async def _settle(self, partition: int, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) for the running units of ``partition``: a handover."""
        if running := set(self._running.get(partition, ())):
            await asyncio.wait(running, timeout=timeout_s)

    async def _next(self, stop: asyncio.Event, *, count: int, wait: bool) -> list[Entry]:
        """Entries claimed at a takeover first, then new entries of the owned partitions."""
        backlog = self.ownership.backlog
        if backlog:
            return [backlog.popleft() for _ in range(min(count, len(backlog)))]
        owned = self.ownership.owned()
        if not owned:
            if wait:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.ownership.tick_s)
            return []
        try:
            batch = await self.reader.read(owned, count=count)
            for number in batch.lost:
                self.ownership.lost(number)
            if not batch.entries and wait:
                waiting = asyncio.ensure_future(
                    self.reader.wait(batch.idle, block_ms=min(self.settings.block_ms, _WAIT_MS))
                )
                stopped = asyncio.ensure_future(stop.wait())
                await asyncio.wait({waiting, stopped}, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                if not waiting.done():
                    waiting.cancel()
                    await asyncio.wait({waiting})  # never swallows our own cancellation
                else:
                    waiting.result()  # raises a Redis fault, handled below
        except ResponseError as error:
            if "NOGROUP" in str(error):
                # A stream or the group vanished (a Redis restart without persistence, a DEL).
                log.warning("the consumer group is missing on a partition; recreating it")
                await self.transport.ensure_groups(self.settings.partitions)
                return []
            if not classify(error).retryable:  # a failover passes; anything else is a bug
                raise
            await self._after_read_fault(error, stop)
            return []
        except Exception as error:  # noqa: BLE001 - classified and logged, then retried
            await self._after_read_fault(error, stop)
            return []
        # Entries of a partition lost meanwhile are not served here: the new owner claims them.
        return self.ownership.serving(batch.entries)

    async def _after_read_fault(self, error: Exception, stop: asyncio.Event) -> None:
        log.warning("reading jobs failed (%s); retrying", classify(error).message)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), _READ_RETRY_S)

    async def _drain(self, in_flight: set[asyncio.Task[None]]) -> None:
        """Give running jobs the grace period, then cancel them; they stay pending."""
        if not in_flight:
            return
        _, late = await asyncio.wait(in_flight, timeout=self.settings.shutdown_grace_s)
        for task in late:
            task.cancel()
        if late:
            log.warning("%d unit(s) unfinished after the grace period; left pending", len(late))
            await asyncio.wait(late)


def _forget(
    held: dict[tuple[int, str], asyncio.Task[None]], unit: list[Work], done: asyncio.Task[None]
) -> None:
    for work in unit:
        if held.get(key := _key(work.entry)) is done:  # not a later unit's hold on it
            del held[key]
