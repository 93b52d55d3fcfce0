"""Runs compiled jobs in one AsyncSession transaction each, together with the ledger and guards.

The ledger row is written in the same transaction as the updates, so a job's effect and its
recorded reply commit together or not at all. Transient faults are retried here with jittered
exponential backoff; permanent ones are recorded so a redelivery gets the same answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
)

from worker.db import fencing, groups, ledger, oneshot, orm
from worker.db.attempts import Attempt, label
from worker.db.engine import WRITES
from worker.errors import (
    DATABASE_BACKOFF,
    Backoff,
    ExpectationFailed,
    Fenced,
    IdConflict,
    Unavailable,
    WorkerError,
    classify,
)
from worker.job.models import Job
from worker.job.plans import Plan, Statement
from worker.job.replies import Reply, UpdateResult
from worker.ops.metrics import Metrics

log = logging.getLogger(__name__)

#: Partition -> the generation this worker holds it at (worker/db/fencing.py).
Fences = Mapping[int, int]
NO_FENCES: Fences = {}


class Executor:
    """Applies jobs to the database exactly once. One AsyncSession per unit of work."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        worker: str,
        max_attempts: int = 5,
        max_returning: int = 1000,
        backoff: Backoff = DATABASE_BACKOFF,
        metrics: Metrics | None = None,
    ) -> None:
        self._sessions = async_sessionmaker(
            engine.execution_options(**{WRITES: True}), expire_on_commit=False, autoflush=False
        )
        self._statements = async_sessionmaker(  # one statement, one implicit transaction
            engine.execution_options(**oneshot.AUTOCOMMIT), expire_on_commit=False, autoflush=False
        )
        self._postgres = engine.dialect.name == "postgresql"
        # SQLite has one writer at a time. Queued here, a transaction starts the moment the
        # previous one ends; queued in SQLite's busy handler, it would sleep 1, 2, 5, 10 ms...
        self._writer = contextlib.nullcontext() if self._postgres else asyncio.Lock()
        self.worker = worker
        self._max_attempts = max_attempts
        self.max_returning = max_returning
        self._backoff = backoff
        self._metrics = metrics or Metrics()

    async def execute(self, job: Job, plan: Plan, *, fences: Fences = NO_FENCES) -> Reply:
        """Apply ``job``, or replay its stored reply when its id was already applied.

        ``fences`` (partition -> generation) are checked in the same transaction: raises
        :class:`Fenced`, with nothing applied, when this worker no longer owns one of them.
        """
        return await self._with_retries(job, lambda attempt: self._apply(attempt, plan, fences))

    async def reject(self, job: Job, error: WorkerError) -> Reply:
        """Answer a job the compiler refused: replied, never recorded.

        A refusal made before the database is touched (an unknown table or column, a
        read-only column, a type that does not fit, ``all`` under WORKER_ALLOW_ALL=false)
        follows from this worker's schema and settings, which another worker, or this one
        after a restart, may not share: once they allow the job, the same id must run. An id
        that already has a reply in the ledger (it ran on a worker that allowed it) gets that
        reply, replayed.
        """
        return await self._with_retries(job, lambda attempt: self._refuse(attempt, error))

    async def _refuse(self, attempt: Attempt, error: WorkerError) -> Reply:
        stored = await self._stored(attempt)
        return attempt.failure(error) if stored is None else stored

    async def _with_retries(self, job: Job, unit: Callable[[Attempt], Awaitable[Reply]]) -> Reply:
        started = time.perf_counter()
        number = 1
        while True:
            attempt = Attempt(job=job, number=number, started=started, worker=self.worker)
            try:
                return await unit(attempt)
            except Unavailable as error:
                if number >= self._max_attempts:
                    # Not final: the caller leaves the entry pending for a later delivery.
                    return attempt.failure(error)
                self._metrics.retried(error.reason)
                log.warning(
                    "job %s: %s (%s), attempt %d of %d; retrying",
                    job.id, error.reason, error.message, number, self._max_attempts,
                )  # fmt: skip
            await asyncio.sleep(self._backoff.delay(number))
            number += 1

    async def replay(self, job: Job) -> Reply | None:
        """The stored reply of a job that already finished, or None if it never did."""
        attempt = Attempt(job=job, number=1, started=time.perf_counter(), worker=self.worker)
        return await self._stored(attempt)

    async def _apply(self, attempt: Attempt, plan: Plan, fences: Fences) -> Reply:
        job = attempt.job
        if self._postgres and not job.dry_run and oneshot.eligible(plan) and len(fences) <= 1:
            return await self._apply_at_once(attempt, plan.statements[0], fences)
        try:
            async with self.session() as session:
                await fencing.check(session, fences)
                results = [
                    await self._run(session, statement, label=label(job, index, statement))
                    for index, statement in enumerate(plan.statements)
                ]
                reply = attempt.succeeded(results)
                if job.dry_run:
                    return reply  # leaving the block rolls back
                if await _record_reply(session, job, reply):
                    await session.commit()
                    return reply
        except (Unavailable, Fenced):
            raise
        except WorkerError as error:
            return await self._record(attempt, error)
        return await self._replay(attempt)

    async def _apply_at_once(self, attempt: Attempt, statement: Statement, fences: Fences) -> Reply:
        """A lone one-row job in one statement (worker/db/oneshot.py); same outcome as _apply."""
        job = attempt.job
        verdicts = [self._verdict(attempt, statement, count) for count in (0, 1)]
        encoded = tuple(verdict.rendered for verdict in verdicts)
        try:
            async with self._statements() as session:
                count = await oneshot.run(session, statement, job, replies=encoded, fences=fences)
        except Fenced:
            raise
        except Exception as error:
            if oneshot.duplicate(error):
                return await self._replay(attempt)
            if isinstance(failure := classify(error), Unavailable):
                raise failure from error
            return await self._record(attempt, failure)
        return self._verdict(attempt, statement, count)

    def _verdict(self, attempt: Attempt, statement: Statement, rowcount: int) -> Reply:
        job = attempt.job
        try:
            result = statement.outcome(rowcount, None, max_returning=self.max_returning,
                                       label=label(job, 0, statement))  # fmt: skip
        except ExpectationFailed as error:
            return attempt.failure(error)
        return attempt.succeeded([result])

    async def _record(self, attempt: Attempt, error: WorkerError) -> Reply:
        job = attempt.job
        reply = attempt.failure(error)
        if job.dry_run or not error.recorded:
            return reply
        async with self.session() as session:
            if await _record_reply(session, job, reply):
                await session.commit()
                return reply
        return await self._replay(attempt)

    async def _replay(self, attempt: Attempt) -> Reply:
        """The reply of the delivery whose ledger insert won over ours."""
        reply = await self._stored(attempt)
        if reply is None:
            # Inserted by nobody we can see: only possible if it was pruned in between. Try again.
            raise Unavailable(f"ledger row for {attempt.job.id!r} vanished", reason="ledger_race")
        return reply

    async def _stored(self, attempt: Attempt) -> Reply | None:
        async with self.session() as session:
            entry = await ledger.lookup(session, attempt.job.id)
        return None if entry is None else self.replayed(attempt, entry)

    def replayed(self, attempt: Attempt, entry: ledger.Entry) -> Reply:
        """The recorded reply, marked as a replay; ``id_conflict`` if the payload differs."""
        job = attempt.job
        if entry.payload_hash != job.payload_hash:
            return attempt.failure(
                IdConflict(f"id {job.id!r} was already used for a different job")
            )
        stored = Reply.model_validate_json(entry.reply)
        return stored.model_copy(
            update={"replayed": True, "attempts": attempt.number, "worker": self.worker}
        )

    # -- group commit (groups.py) ------------------------------------------------------------------

    async def execute_group(
        self, items: Sequence[tuple[Job, Plan]], *, fences: Fences = NO_FENCES
    ) -> list[Reply | None]:
        """Apply many single-row jobs in one transaction: see :func:`groups.execute_group`."""
        return await groups.execute_group(self, items, fences=fences)

    async def _run(
        self, session: AsyncSession, statement: Statement, *, label: str
    ) -> UpdateResult:
        if statement.orm is not None:
            return await orm.run(session, statement, max_returning=self.max_returning, label=label)
        result = cast(
            CursorResult[Any], await session.execute(statement.update, statement.params or None)
        )
        limit = self.max_returning
        if statement.returns_rows:
            rows = result.mappings().all()
            return statement.outcome(len(rows), rows, max_returning=limit, label=label)
        return statement.outcome(result.rowcount, None, max_returning=limit, label=label)

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session whose driver errors come out classified; uncommitted work rolls back."""
        try:
            async with self._writer, self._sessions() as session:
                yield session
        except (WorkerError, Fenced):
            raise
        except Exception as error:
            raise classify(error) from error


async def _record_reply(session: AsyncSession, job: Job, reply: Reply) -> bool:
    stored = reply.rendered
    return await ledger.record(session, job_id=job.id, payload_hash=job.payload_hash, reply=stored)
