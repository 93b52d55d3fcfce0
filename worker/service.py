"""The loop: transport -> jobs -> compiler -> executor -> transport, and shutdown.

It only wires the other modules together: no SQL here, and no Redis command names.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from dataclasses import dataclass

from worker.compiler import Plan, Policy
from worker.errors import classify
from worker.executor import Executor
from worker.jobs import Job, Rejection, Reply
from worker.logs import FIELDS
from worker.metrics import Metrics
from worker.recovery import Recovery
from worker.schema import Schema
from worker.settings import Settings
from worker.streams import Entry, entry_ms
from worker.transport import Transport
from worker.units import Pace, Work, prepare, units

log = logging.getLogger(__name__)

#: The dead-letter reason of an entry that is no job at all (see jobs.parse_entry).
UNPARSABLE = "unparsable"

_READ_RETRY_S = 1.0


@dataclass
class Worker:
    settings: Settings
    transport: Transport
    executor: Executor
    schema: Schema
    recovery: Recovery
    pace: Pace
    metrics: Metrics

    async def run(self, stop: asyncio.Event | None = None, *, burst: bool = False) -> None:
        """Serve jobs until ``stop`` is set; with ``burst``, until the stream has nothing new.

        On stop, in-flight jobs get ``shutdown_grace_s`` to finish; whatever is left stays
        pending in the group, for any worker to claim.
        """
        stop = stop or asyncio.Event()
        in_flight: dict[str, asyncio.Task[None]] = {}  # entry id -> the task answering it
        tasks: set[asyncio.Task[None]] = set()
        slots = asyncio.Semaphore(self.settings.concurrency)  # transactions at once
        self.metrics.in_flight.set_function(lambda: len(in_flight))  # read at scrape time
        renewing = asyncio.create_task(self.recovery.keep_claims(lambda: list(in_flight)))
        try:
            while not stop.is_set():
                self.metrics.turned()
                # Read only when a transaction slot is free: what piled up meanwhile then
                # fills whole groups, instead of trickling in one entry at a time.
                free = self.settings.concurrency - len(tasks)
                room = self.pace.window() - len(in_flight)
                if free <= 0 or room <= 0:
                    # A timeout, so the loop (and the liveness it reports) turns meanwhile.
                    await asyncio.wait(tasks, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                    continue
                count = min(self.settings.batch_size, room)
                entries = await self._next(stop, count=count, burst=burst)
                if entries is None:
                    break
                if not entries and burst:
                    if not tasks:
                        break
                    await asyncio.wait(tasks)
                # An entry claimed back while still running here is not started twice.
                works = [self._prepare(entry) for entry in entries if entry.id not in in_flight]
                for unit in units(works, group_size=self.settings.group_size):
                    task = asyncio.create_task(self.handle(unit, slots))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    in_flight.update(dict.fromkeys((work.entry.id for work in unit), task))
                    task.add_done_callback(functools.partial(_forget, in_flight, unit))
        finally:
            await self._drain(tasks)
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing

    @functools.cached_property
    def policy(self) -> Policy:
        settings = self.settings
        return Policy(max_rows_default=settings.max_rows_default, allow_all=settings.allow_all)

    def _prepare(self, entry: Entry) -> Work:
        settings = self.settings
        return prepare(entry, schema=self.schema, max_job_bytes=settings.max_job_bytes,
                       max_deliveries=settings.max_deliveries, policy=self.policy)  # fmt: skip

    async def handle(self, unit: list[Work], slots: asyncio.Semaphore) -> None:
        """Answer a unit: one entry, or a group sharing a transaction. Never raises: the
        loop must outlive any job; an entry left unanswered stays pending for a claim."""
        try:
            if len(unit) == 1:
                await self._answer(unit[0], slots)
            else:
                async with slots:
                    for work in unit:
                        self.metrics.queued(entry_ms(work.entry.id))
                    replies = await self.executor.execute_group([_ready(work) for work in unit])
                answers = list(zip(unit, replies, strict=True))
                await self.transport.reply_many(
                    [(work.entry.id, reply, work.job.reply_to) for work, reply in answers]
                )
                for work, reply in answers:
                    self._answered(work.entry, work.job, reply)
            self.pace.finished(len(unit))
        except Exception:
            log.exception(
                "%d entr(y/ies) from %s: not answered, left pending", len(unit), unit[0].entry.id
            )

    async def _answer(self, work: Work, slots: asyncio.Semaphore) -> None:
        entry, job = work.entry, work.job
        if isinstance(job, Rejection):
            await self._reject(entry, job)
            return
        async with slots:
            if work.exhausted:
                await self.recovery.give_up(entry, job)
                return
            self.metrics.queued(entry_ms(entry.id))
            if work.error is not None:
                reply = await self.executor.reject(job, work.error)
            else:
                reply = await self.executor.execute(*_ready(work))
        await self.transport.reply(entry.id, reply, channel=job.reply_to, ack=reply.final)
        self._answered(entry, job, reply)

    def _answered(self, entry: Entry, job: Job | Rejection, reply: Reply) -> None:
        """Count the reply, and log it as one line with the job's fields."""
        tables = [spec.table for spec in job.updates] if isinstance(job, Job) else []
        self.metrics.answered(reply, tables)
        if log.isEnabledFor(logging.INFO):
            status = reply.status if reply.error is None else reply.error.code
            fields = {"job_id": reply.id, "entry_id": entry.id, "table": ",".join(tables) or None,
                      "status": status, "rowcount": reply.rowcount,
                      "duration_ms": reply.duration_ms, "attempt": reply.attempts,
                      "replayed": reply.replayed or None,
                      "dry_run": reply.dry_run or None}  # fmt: skip
            log.info("job %s: %s", reply.id, status, extra={FIELDS: fields})

    async def _reject(self, entry: Entry, rejection: Rejection) -> None:
        reply = Reply.failure(rejection.id, rejection.error, worker=self.settings.consumer)
        if rejection.dead_letter_reason is None:
            await self.transport.reply(entry.id, reply, channel=rejection.reply_to)
        else:
            log.warning("entry %s: dead-lettered: %s", entry.id, rejection.dead_letter_reason)
            # ``reason`` is a code (also a metrics label); the message goes beside it.
            details = {"error_code": rejection.error.code, "error": rejection.dead_letter_reason}
            await self.transport.dead_letter(
                entry, reason=UNPARSABLE, reply=reply, channel=rejection.reply_to, details=details
            )
        self._answered(entry, rejection, reply)

    async def _next(self, stop: asyncio.Event, *, count: int, burst: bool) -> list[Entry] | None:
        """Entries others left behind when a claim is due, else new ones; None once stopped."""
        if self.recovery.until_claim_ms() == 0:
            try:
                # Small bites: claimed entries were handed out before; finish them first.
                bite = min(count, self.settings.concurrency)
                if claimed := await self.recovery.claim(count=bite):
                    return claimed
            except Exception as error:  # noqa: BLE001 - classified and logged; claimed next time
                log.warning("claiming idle entries failed (%s)", classify(error).message)
        # Wake up in time for the next claim, so orphans never wait on an idle stream.
        block_ms = min(self.settings.block_ms, max(1, self.recovery.until_claim_ms()))
        return await self._read(stop, count=count, block_ms=None if burst else block_ms)

    async def _read(
        self, stop: asyncio.Event, *, count: int, block_ms: int | None
    ) -> list[Entry] | None:
        """The next entries, [] on a passing Redis fault, or None once stopped with nothing.

        A stop does not cancel a read under way: Redis may already have handed it entries,
        which would then sit pending until a claim. It is awaited (at most its BLOCK time)
        and what it brings is served within the grace period.
        """
        read = asyncio.ensure_future(self.transport.read(count=count, block_ms=block_ms))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({read, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not read.done():
            done, _ = await asyncio.wait({read}, timeout=(block_ms or 0) / 1000 + 1)
            if not done:
                read.cancel()  # whatever it was handed stays pending, for a claim
                return None
        try:
            return read.result()
        except Exception as error:  # noqa: BLE001 - classified and logged, then retried
            log.warning("reading jobs failed (%s); retrying", classify(error).message)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _READ_RETRY_S)
            return []

    async def _drain(self, in_flight: set[asyncio.Task[None]]) -> None:
        """Give running jobs the grace period, then cancel them; they stay pending."""
        if not in_flight:
            return
        _, late = await asyncio.wait(in_flight, timeout=self.settings.shutdown_grace_s)
        for task in late:
            task.cancel()
        if late:
            log.warning("%d job(s) unfinished after the grace period; left pending", len(late))
            await asyncio.wait(late)


def _ready(work: Work) -> tuple[Job, Plan]:
    assert isinstance(work.job, Job) and work.plan is not None  # noqa: PT018, S101 - compiled
    return work.job, work.plan


def _forget(
    in_flight: dict[str, asyncio.Task[None]], unit: list[Work], _done: asyncio.Task[None]
) -> None:
    for work in unit:
        in_flight.pop(work.entry.id, None)
