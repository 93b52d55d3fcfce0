"""The loop: transport -> jobs -> compiler -> executor -> transport, and shutdown.

It only wires the other modules together: no SQL here, and no Redis command names.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

from worker.compiler import Plan
from worker.engine import Timeouts, create_engine
from worker.errors import classify
from worker.executor import Executor
from worker.jobs import Job, Rejection, Reply
from worker.ledger import ensure_ledger
from worker.recovery import Recovery
from worker.schema import Schema, build_schema, load_models, reflect_schema
from worker.settings import Settings, mask_url
from worker.streams import Entry, Names
from worker.transport import Transport, connect
from worker.units import Pace, Work, prepare, units

log = logging.getLogger(__name__)

_READ_RETRY_S = 1.0


@dataclass
class Worker:
    settings: Settings
    transport: Transport
    executor: Executor
    schema: Schema
    recovery: Recovery
    pace: Pace

    async def run(self, stop: asyncio.Event | None = None, *, burst: bool = False) -> None:
        """Serve jobs until ``stop`` is set; with ``burst``, until the stream has nothing new.

        On stop, in-flight jobs get ``shutdown_grace_s`` to finish; whatever is left stays
        pending in the group, for any worker to claim.
        """
        stop = stop or asyncio.Event()
        in_flight: dict[str, asyncio.Task[None]] = {}  # entry id -> the task answering it
        tasks: set[asyncio.Task[None]] = set()
        slots = asyncio.Semaphore(self.settings.concurrency)  # transactions at once
        renewing = asyncio.create_task(self.recovery.keep_claims(lambda: list(in_flight)))
        try:
            while not stop.is_set():
                # Read only when a transaction slot is free: what piled up meanwhile then
                # fills whole groups, instead of trickling in one entry at a time.
                free = self.settings.concurrency - len(tasks)
                room = self.pace.window() - len(in_flight)
                if free <= 0 or room <= 0:
                    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
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

    def _prepare(self, entry: Entry) -> Work:
        settings = self.settings
        return prepare(entry, schema=self.schema, max_job_bytes=settings.max_job_bytes,
                       max_deliveries=settings.max_deliveries)  # fmt: skip

    async def handle(self, unit: list[Work], slots: asyncio.Semaphore) -> None:
        """Answer a unit: one entry, or a group sharing a transaction. Never raises: the
        loop must outlive any job; an entry left unanswered stays pending for a claim."""
        try:
            if len(unit) == 1:
                await self._answer(unit[0], slots)
            else:
                async with slots:
                    replies = await self.executor.execute_group([_ready(work) for work in unit])
                answers = zip(unit, replies, strict=True)
                await self.transport.reply_many(
                    [(work.entry.id, reply, work.job.reply_to) for work, reply in answers]
                )
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
            if work.error is not None:
                reply = await self.executor.reject(job, work.error)
            else:
                reply = await self.executor.execute(*_ready(work))
        await self.transport.reply(entry.id, reply, channel=job.reply_to, ack=reply.final)
        log.debug("job %s: %s rowcount=%d", reply.id, reply.status, reply.rowcount)

    async def _reject(self, entry: Entry, rejection: Rejection) -> None:
        reply = Reply.failure(rejection.id, rejection.error, worker=self.settings.consumer)
        if rejection.dead_letter_reason is None:
            await self.transport.reply(entry.id, reply, channel=rejection.reply_to)
            return
        log.warning("entry %s: dead-lettered: %s", entry.id, rejection.dead_letter_reason)
        await self.transport.dead_letter(
            entry, reason=rejection.dead_letter_reason, reply=reply, channel=rejection.reply_to
        )

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


@contextlib.asynccontextmanager
async def open_worker(settings: Settings) -> AsyncIterator[Worker]:
    """Connect to the database and Redis, load the schema, and yield a ready Worker."""
    timeouts = Timeouts(
        statement_ms=settings.statement_timeout_ms,
        lock_ms=settings.lock_timeout_ms,
        idle_in_transaction_ms=settings.idle_in_transaction_timeout_ms,
    )
    engine = create_engine(settings.database_url, pool_size=settings.concurrency, timeouts=timeouts)
    transport = Transport(
        connect(settings.redis_url, block_ms=settings.block_ms),
        Names(settings.prefix),
        group=settings.group,
        consumer=settings.consumer,
        result_ttl=settings.result_ttl,
        write_attempts=settings.max_attempts,
    )
    try:
        async with engine.begin() as connection:
            await ensure_ledger(connection)
        narrowing = {
            "tables": settings.tables,
            "readonly_columns": settings.readonly_columns,
            "writable_keys": settings.writable_keys,
        }
        if settings.models:
            schema = build_schema(load_models(settings.models), **narrowing)
        else:
            schema = await reflect_schema(engine, **narrowing)
        await transport.ensure_group()
        executor = Executor(
            engine,
            worker=settings.consumer,
            max_attempts=settings.max_attempts,
            max_returning=settings.max_returning,
        )
        log.info(
            "worker %s ready: %d table(s), database %s, redis %s, stream %s",
            settings.consumer,
            len(schema.tables),
            mask_url(settings.database_url),
            mask_url(settings.redis_url),
            transport.names.stream,
        )
        recovery = Recovery(
            transport=transport,
            executor=executor,
            worker=settings.consumer,
            claim_idle_ms=settings.claim_idle_ms,
        )
        yield Worker(
            settings=settings,
            transport=transport,
            executor=executor,
            schema=schema,
            recovery=recovery,
            pace=Pace(
                floor=2 * settings.concurrency,
                ceiling=settings.concurrency * settings.group_size,
            ),
        )
    finally:
        await transport.aclose()
        await engine.dispose()


async def serve(settings: Settings, *, burst: bool = False) -> None:
    """Run a worker until SIGTERM or SIGINT; a second signal exits at once."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s: finishing in-flight jobs, then exiting", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    async with open_worker(settings) as worker:
        await worker.run(stop, burst=burst)
