"""Answering a unit of work: run it (or refuse it), reply, ack, count and log it.

A unit holds its lane until every entry in it has a final answer: a job whose transient faults
outlast its attempts replies ``unavailable`` (not final), waits, and runs again, up to
``WORKER_MAX_DELIVERIES``; then it is dead-lettered and the lane moves on. An unexpected fault
(a bug, Redis gone past its retries) runs the unit again after a pause, for the same reason:
letting the next job on the same key go first would apply them out of order. A fenced unit
(this worker lost the partition) answers nothing: the new owner does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

from worker.db.executor import Executor, Fences
from worker.db.schema import Schema
from worker.errors import Fenced
from worker.job.models import Job, Rejection
from worker.job.plans import Plan
from worker.job.replies import Reply
from worker.ops.logs import FIELDS
from worker.ops.metrics import Metrics
from worker.service.recovery import Recovery
from worker.service.units import Work
from worker.settings import Settings
from worker.stream.names import Entry, entry_ms
from worker.stream.reading import Reader
from worker.stream.transport import Transport

log = logging.getLogger(__name__)

#: The dead-letter reason of an entry that is no job at all (see jobs.parse_entry).
UNPARSABLE: Final = "unparsable"
#: Seconds between the INFO lines that sum up the jobs answered (each job's line is DEBUG).
SUMMARY_S: Final = 10.0
_FAULT_PAUSE_MAX_S: Final = 30.0


@dataclass
class Answers:
    settings: Settings
    transport: Transport
    executor: Executor
    schema: Schema
    recovery: Recovery
    metrics: Metrics
    reader: Reader
    #: Replies since the last summary line, by status (``ok`` or the error code).
    _tally: Counter[str] = field(default_factory=Counter, init=False)

    async def handle(
        self, unit: list[Work], slots: asyncio.Semaphore, *, fences: Fences
    ) -> list[int]:
        """Answer every entry of ``unit`` finally; returns only then, or when fenced: then
        the partitions it was fenced out of (nothing was answered)."""
        if claimed := [work.entry for work in unit if work.entry.claimed]:
            await self.reader.count_start(claimed)
        faults = 0
        while True:
            try:
                if len(unit) == 1:
                    await self._one(unit[0], slots, fences)
                else:
                    await self._group(unit, slots, fences)
            except Fenced as error:
                log.info("%s; %d entr(y/ies) left to the new owner", error.message, len(unit))
                return error.partitions
            except Exception:
                faults += 1
                pause = min(_FAULT_PAUSE_MAX_S, 0.1 * 2**faults)
                log.exception("%d entr(y/ies) from %s: not answered; again in %.1f s (their "
                              "lane waits)", len(unit), unit[0].entry.id, pause)  # fmt: skip
                await asyncio.sleep(pause)
            else:
                return []

    async def _group(self, unit: list[Work], slots: asyncio.Semaphore, fences: Fences) -> None:
        async with slots:
            self.metrics.queued(*(entry_ms(work.entry.id) for work in unit))
            replies = await self.executor.execute_group([_ready(work) for work in unit],
                                                        fences=fences)  # fmt: skip
        answers = [(work, reply) for work, reply in zip(unit, replies, strict=True) if reply]
        await self.transport.reply_many(
            [(work.entry, reply, work.job.reply_to) for work, reply in answers]
        )
        self._answered_many([(work.entry, work.job, reply) for work, reply in answers])
        # In stream order: a job without a final reply goes round again, and one that was not
        # run (its order key's earlier job had not finished) runs after it.
        for work, maybe in zip(unit, replies, strict=True):
            if maybe is None:
                await self._one(work, slots, fences)
            elif not maybe.final:
                await self._one(work, slots, fences, rounds=1)

    async def _one(
        self, work: Work, slots: asyncio.Semaphore, fences: Fences, *, rounds: int = 0
    ) -> None:
        entry, job = work.entry, work.job
        if isinstance(job, Rejection):
            await self._reject(entry, job)
            return
        while True:
            if rounds:  # the last round ended with faults that may pass: wait, then again
                await asyncio.sleep(self._pause(rounds))
            deliveries = entry.deliveries + rounds
            async with slots:
                if deliveries > self.settings.max_deliveries:
                    await self.recovery.give_up(dataclasses.replace(entry, deliveries=deliveries),
                                                job)  # fmt: skip
                    return
                self.metrics.queued(entry_ms(entry.id))
                if work.error is not None:
                    reply = await self.executor.reject(job, work.error)
                else:
                    reply = await self.executor.execute(*_ready(work), fences=fences)
            await self.transport.reply(entry, reply, channel=job.reply_to, ack=reply.final)
            self._answered(entry, job, reply)
            if reply.final:
                return
            rounds += 1

    def _pause(self, rounds: int) -> float:
        """Between rounds of a job whose transient faults outlasted its attempts."""
        return float(min(self.settings.claim_idle_ms / 1000, 0.25 * 2**rounds))

    async def _reject(self, entry: Entry, rejection: Rejection) -> None:
        reply = Reply.failure(rejection.id, rejection.error, worker=self.settings.consumer)
        if rejection.dead_letter_reason is None:
            await self.transport.reply(entry, reply, channel=rejection.reply_to)
        else:
            log.warning("entry %s: dead-lettered: %s", entry.id, rejection.dead_letter_reason)
            # ``reason`` is a code (also a metrics label); the message goes beside it.
            details = {"error_code": rejection.error.code, "error": rejection.dead_letter_reason}
            await self.transport.dead_letter(
                entry, reason=UNPARSABLE, reply=reply, channel=rejection.reply_to, details=details
            )
        self._answered(entry, rejection, reply)

    def summarize(self) -> None:
        """One INFO line: how many jobs were answered since the last one, by status."""
        if not self._tally:
            return
        total = sum(self._tally.values())
        statuses = ", ".join(f"{status} {count}" for status, count in sorted(self._tally.items()))
        log.info("answered %d job(s): %s", total, statuses,
                 extra={FIELDS: {"answered": total, "statuses": dict(self._tally)}})  # fmt: skip
        self._tally.clear()

    def _answered(self, entry: Entry, job: Job | Rejection, reply: Reply) -> None:
        self._answered_many([(entry, job, reply)])

    def _answered_many(self, answers: list[tuple[Entry, Job | Rejection, Reply]]) -> None:
        """Count the replies, and log each as one DEBUG line with its job's fields."""
        tabled = [(entry, reply, [spec.table for spec in job.updates] if isinstance(job, Job)
                   else []) for entry, job, reply in answers]  # fmt: skip
        self.metrics.answered_many((reply, tables) for _, reply, tables in tabled)
        tally, debug = self._tally, log.isEnabledFor(logging.DEBUG)
        for entry, reply, tables in tabled:
            status = reply.status if reply.error is None else reply.error.code
            tally[status] += 1
            if debug:
                fields = {"job_id": reply.id, "entry_id": entry.id,
                          "table": ",".join(tables) or None, "status": status,
                          "rowcount": reply.rowcount, "duration_ms": reply.duration_ms,
                          "attempt": reply.attempts, "replayed": reply.replayed or None,
                          "partition": entry.partition,
                          "dry_run": reply.dry_run or None}  # fmt: skip
                log.debug("job %s: %s", reply.id, status, extra={FIELDS: fields})


def _ready(work: Work) -> tuple[Job, Plan]:
    assert isinstance(work.job, Job) and work.plan is not None  # noqa: PT018, S101 - compiled
    return work.job, work.plan
