"""Runs compiled jobs in one AsyncSession transaction each, together with the ledger and guards.

The ledger row is written in the same transaction as the updates, so a job's effect and its
recorded reply commit together or not at all. Transient faults are retried here with jittered
exponential backoff; permanent ones are recorded so a redelivery gets the same answer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import event
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from worker import ledger
from worker.compiler import Plan, Statement
from worker.errors import ExpectationFailed, IdConflict, Unavailable, WorkerError, classify
from worker.jobs import Job, Reply, UpdateResult
from worker.values import to_json

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Attempt:
    """One try at a job: everything a reply needs besides its outcome."""

    job: Job
    number: int
    started: float
    worker: str

    def reply(self, **outcome: Any) -> Reply:
        return Reply(id=self.job.id, **self._stamp(), **outcome)

    def failure(self, error: WorkerError) -> Reply:
        return Reply.failure(self.job.id, error, **self._stamp())

    def _stamp(self) -> dict[str, Any]:
        return {
            "dry_run": self.job.dry_run,
            "attempts": self.number,
            "duration_ms": round((time.perf_counter() - self.started) * 1000, 3),
            "worker": self.worker,
        }


class Executor:
    """Applies jobs to the database exactly once. One AsyncSession per unit of work."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        worker: str,
        max_attempts: int = 5,
        max_returning: int = 1000,
        backoff_base_s: float = 0.02,
        backoff_cap_s: float = 2.0,
    ) -> None:
        self._sessions = async_sessionmaker(engine, expire_on_commit=False, autoflush=False)
        self._worker = worker
        self._max_attempts = max_attempts
        self._max_returning = max_returning
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s

    async def execute(self, job: Job, plan: Plan) -> Reply:
        """Apply ``job``, or replay its stored reply when its id was already applied."""
        return await self._with_retries(job, lambda attempt: self._apply(attempt, plan))

    async def reject(self, job: Job, error: WorkerError) -> Reply:
        """Answer a job the compiler refused, recording the verdict like any other."""
        return await self._with_retries(job, lambda attempt: self._record(attempt, error))

    async def _with_retries(self, job: Job, unit: Callable[[_Attempt], Awaitable[Reply]]) -> Reply:
        started = time.perf_counter()
        number = 1
        while True:
            attempt = _Attempt(job=job, number=number, started=started, worker=self._worker)
            try:
                return await unit(attempt)
            except Unavailable as error:
                if number >= self._max_attempts:
                    # Not final: the caller leaves the entry pending for a later delivery.
                    return attempt.failure(error)
                log.warning(
                    "job %s: %s (%s), attempt %d of %d; retrying",
                    job.id, error.reason, error.message, number, self._max_attempts,
                )  # fmt: skip
            number += 1
            await asyncio.sleep(self._backoff(number - 1))

    def _backoff(self, failures: int) -> float:
        ceiling = min(self._backoff_cap_s, self._backoff_base_s * 2 ** (failures - 1))
        return random.uniform(0, ceiling)  # noqa: S311 - jitter, not cryptography

    async def _apply(self, attempt: _Attempt, plan: Plan) -> Reply:
        job = attempt.job
        try:
            async with self._session() as session:
                results = [
                    await self._run(session, statement, label=_label(job, index, statement))
                    for index, statement in enumerate(plan.statements)
                ]
                reply = attempt.reply(status="ok", **_outcome(job, results))
                if job.dry_run:
                    return reply  # leaving the block rolls back
                if await _record_reply(session, job, reply):
                    await session.commit()
                    return reply
        except Unavailable:
            raise
        except WorkerError as error:
            return await self._record(attempt, error)
        return await self._replay(attempt)

    async def _record(self, attempt: _Attempt, error: WorkerError) -> Reply:
        job = attempt.job
        reply = attempt.failure(error)
        if job.dry_run or not error.recorded:
            return reply
        async with self._session() as session:
            if await _record_reply(session, job, reply):
                await session.commit()
                return reply
        return await self._replay(attempt)

    async def _replay(self, attempt: _Attempt) -> Reply:
        job = attempt.job
        async with self._session() as session:
            entry = await ledger.lookup(session, job.id)
        if entry is None:
            # Inserted by nobody we can see: only possible if it was pruned in between. Try again.
            raise Unavailable(f"ledger row for {job.id!r} vanished", reason="ledger_race")
        if entry.payload_hash != job.payload_hash:
            return attempt.failure(
                IdConflict(f"id {job.id!r} was already used for a different job")
            )
        stored = Reply.model_validate_json(entry.reply)
        return stored.model_copy(
            update={"replayed": True, "attempts": attempt.number, "worker": self._worker}
        )

    async def _run(
        self, session: AsyncSession, statement: Statement, *, label: str
    ) -> UpdateResult:
        result = cast(CursorResult[Any], await session.execute(statement.update))
        if statement.returns_rows:
            rows = result.mappings().all()
            rowcount = len(rows)
            returning: list[dict[str, Any]] | None = [
                {name: to_json(value) for name, value in row.items()}
                for row in rows[: self._max_returning]
            ]
        else:
            rowcount, returning = result.rowcount, None
        if violation := statement.guards.violation(rowcount):
            raise ExpectationFailed(f"{label}: {violation}; rolled back")
        return UpdateResult(rowcount=rowcount, returning=returning)

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[AsyncSession]:
        """A session whose driver errors come out classified; uncommitted work rolls back."""
        try:
            async with self._sessions() as session:
                yield session
        except WorkerError:
            raise
        except Exception as error:
            raise classify(error) from error


async def _record_reply(session: AsyncSession, job: Job, reply: Reply) -> bool:
    stored = reply.model_dump_json(exclude_none=True)
    return await ledger.record(session, job_id=job.id, payload_hash=job.payload_hash, reply=stored)


def _label(job: Job, index: int, statement: Statement) -> str:
    return f"updates[{index}] ({statement.table})" if job.batch else statement.table


def _outcome(job: Job, results: list[UpdateResult]) -> dict[str, Any]:
    if job.batch:
        return {"rowcount": sum(result.rowcount for result in results), "results": results}
    return {"rowcount": results[0].rowcount, "returning": results[0].returning}


def create_engine(database_url: str, *, pool_size: int) -> AsyncEngine:
    """The engine for ``database_url``, tuned for short write transactions.

    No ``pool_pre_ping``: it would double the round trips of every job. A dropped connection
    instead surfaces as ``connection_invalidated``, which :func:`classify` treats as transient,
    so the job is retried on a fresh connection.
    """
    engine = create_async_engine(database_url, pool_size=pool_size, max_overflow=2)
    if engine.dialect.name == "sqlite":
        _tune_sqlite(engine)
    return engine


def _tune_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the driver so BEGIN IMMEDIATE below is ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA busy_timeout=5000",
            "PRAGMA foreign_keys=ON",
            # PostgreSQL's LIKE is case-sensitive; SQLite's is not by default. Same job, same rows.
            "PRAGMA case_sensitive_like=ON",
        ):
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(connection: Any) -> None:
        # Take the write lock up front: a deferred transaction that upgrades later can fail
        # with SQLITE_BUSY at once, without waiting out busy_timeout.
        connection.exec_driver_sql("BEGIN IMMEDIATE")
