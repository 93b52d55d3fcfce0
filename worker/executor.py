"""Runs compiled jobs in one AsyncSession transaction each, together with the ledger and guards.

The ledger row is written in the same transaction as the updates, so a job's effect and its
recorded reply commit together or not at all. Transient faults are retried here with jittered
exponential backoff; permanent ones are recorded so a redelivery gets the same answer.
"""

from __future__ import annotations

import asyncio
import logging
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
from worker.errors import (
    DATABASE_BACKOFF,
    Backoff,
    ExpectationFailed,
    IdConflict,
    Unavailable,
    WorkerError,
    classify,
)
from worker.jobs import Job, Reply, UpdateResult
from worker.values import to_json

log = logging.getLogger(__name__)

#: Execution option marking the executor's connections, whose SQLite transactions write.
_WRITES = "update_worker_writes"


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
        backoff: Backoff = DATABASE_BACKOFF,
    ) -> None:
        self._sessions = async_sessionmaker(
            engine.execution_options(**{_WRITES: True}), expire_on_commit=False, autoflush=False
        )
        self._worker = worker
        self._max_attempts = max_attempts
        self._max_returning = max_returning
        self._backoff = backoff

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
            await asyncio.sleep(self._backoff.delay(number))
            number += 1

    async def replay(self, job: Job) -> Reply | None:
        """The stored reply of a job that already finished, or None if it never did."""
        attempt = _Attempt(job=job, number=1, started=time.perf_counter(), worker=self._worker)
        return await self._stored(attempt)

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
        """The reply of the delivery whose ledger insert won over ours."""
        reply = await self._stored(attempt)
        if reply is None:
            # Inserted by nobody we can see: only possible if it was pruned in between. Try again.
            raise Unavailable(f"ledger row for {attempt.job.id!r} vanished", reason="ledger_race")
        return reply

    async def _stored(self, attempt: _Attempt) -> Reply | None:
        job = attempt.job
        async with self._session() as session:
            entry = await ledger.lookup(session, job.id)
        if entry is None:
            return None
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


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-connection limits, so no transaction waits or idles forever. 0 turns one off."""

    statement_ms: int = 30_000
    lock_ms: int = 5_000
    idle_in_transaction_ms: int = 60_000


def create_engine(
    database_url: str, *, pool_size: int, timeouts: Timeouts | None = None
) -> AsyncEngine:
    """The engine for ``database_url``, tuned for short write transactions.

    No ``pool_pre_ping``: it would double the round trips of every job. A dropped connection
    instead surfaces as a disconnect, which invalidates the whole pool and which
    :func:`classify` treats as transient, so the job is retried on a fresh connection.
    """
    timeouts = timeouts or Timeouts()
    connect_args: dict[str, Any] = {}
    if database_url.startswith("postgresql"):
        # Sent in the startup packet: no extra round trip, and they hold for every transaction.
        connect_args["server_settings"] = {
            "statement_timeout": str(timeouts.statement_ms),
            "lock_timeout": str(timeouts.lock_ms),
            "idle_in_transaction_session_timeout": str(timeouts.idle_in_transaction_ms),
        }
    engine = create_async_engine(
        database_url, pool_size=pool_size, max_overflow=2, connect_args=connect_args
    )
    if engine.dialect.name == "sqlite":
        _tune_sqlite(engine, busy_timeout_ms=timeouts.lock_ms)
    return engine


def _tune_sqlite(engine: AsyncEngine, *, busy_timeout_ms: int) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the driver so BEGIN IMMEDIATE below is ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            "PRAGMA journal_mode=WAL",
            f"PRAGMA busy_timeout={int(busy_timeout_ms)}",
            "PRAGMA foreign_keys=ON",
            # PostgreSQL's LIKE is case-sensitive; SQLite's is not by default. Same job, same rows.
            "PRAGMA case_sensitive_like=ON",
        ):
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(connection: Any) -> None:
        # Jobs take the write lock up front: a deferred transaction that upgrades later can
        # fail with SQLITE_BUSY at once, without waiting out busy_timeout. Everything else
        # (start-up reflection, checks) only reads, so it must not queue behind writers.
        writes = connection.get_execution_options().get(_WRITES, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")
