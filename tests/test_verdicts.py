"""Verdicts that depend on a worker's schema or settings are replied, never recorded; workers
that share a prefix but not a schema are reported (issue: stale verdicts)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import REDIS_URL, WorkerFactory
from tests.tables import items
from tests.test_operate import cli
from worker.client import UpdateClient
from worker.db.ledger import ledger
from worker.job.models import Job
from worker.job.replies import Reply
from worker.service.startup import open_worker
from worker.settings import Settings
from worker.stream import deployment
from worker.stream.names import Entry, Names


async def recorded(engine: AsyncEngine, job_id: str) -> bool:
    async with engine.connect() as connection:
        found = await connection.scalar(sa.select(ledger.c.job_id).where(ledger.c.job_id == job_id))
    return found is not None


async def serve_once(settings: Settings, job: dict[str, Any]) -> Reply:
    """What a freshly started worker with ``settings`` answers to ``job``, by the worker's own
    path (parse, compile or refuse, execute), without its loop racing another worker's."""
    async with open_worker(settings) as worker:
        entry = Entry("1-0", {b"job": json.dumps(job).encode()})
        work = worker._prepare(entry)
        assert isinstance(work.job, Job)
        if work.error is not None:
            return await worker.executor.reject(work.job, work.error)
        assert work.plan is not None
        return await worker.executor.execute(work.job, work.plan)


async def test_a_table_created_after_start_runs_once_the_worker_knows_it(
    start_worker: WorkerFactory, engine: AsyncEngine, prefix: str,
    make_settings: Callable[..., Settings],
) -> None:  # fmt: skip
    """``unknown_table`` used to go into the ledger, and the same id replayed it for 7 days."""
    await start_worker(consumer="before")
    async with engine.begin() as connection:
        await connection.execute(sa.text("CREATE TABLE later (id INTEGER PRIMARY KEY, n INTEGER)"))
        await connection.execute(sa.text("INSERT INTO later VALUES (1, 0)"))
    job = {"id": "later-1", "table": "later", "key": {"id": 1}, "inc": {"n": 5}}
    async with UpdateClient(REDIS_URL, prefix=prefix) as client:
        refused = await client.result(await client.submit(job), timeout=10)
    assert refused.error is not None
    assert refused.error.code == "unknown_table"
    assert not await recorded(engine, "later-1")
    # The restarted worker reflects the new table: the same id runs, once.
    reply = await serve_once(make_settings(consumer="after"), job)
    assert (reply.status, reply.rowcount, reply.replayed) == ("ok", 1, False)
    again = await serve_once(make_settings(consumer="after"), job)
    assert (again.status, again.replayed) == ("ok", True)
    async with engine.connect() as connection:
        assert await connection.scalar(sa.text("SELECT n FROM later WHERE id = 1")) == 5


async def test_a_refusal_never_hides_a_reply_the_ledger_holds(
    start_worker: WorkerFactory, engine: AsyncEngine, prefix: str,
    make_settings: Callable[..., Settings],
) -> None:  # fmt: skip
    """An id applied by a worker that allows the table is replayed, not refused, by one that
    does not (a redelivery after a deploy narrowed WORKER_TABLES)."""
    job = {"id": "narrow-1", "table": "items", "key": {"id": 3}, "inc": {"qty": 1}}
    await start_worker(consumer="wide")
    async with UpdateClient(REDIS_URL, prefix=prefix) as client:
        assert (await client.result(await client.submit(job), timeout=10)).status == "ok"
    narrow = make_settings(consumer="narrow", tables="books")
    replayed = await serve_once(narrow, job)
    assert (replayed.status, replayed.replayed, replayed.rowcount) == ("ok", True, 1)
    refused = await serve_once(narrow, {**job, "id": "narrow-2"})
    assert refused.error is not None
    assert refused.error.code == "unknown_table"
    assert not await recorded(engine, "narrow-2")


async def test_a_refusal_by_the_max_rows_setting_is_not_recorded(
    start_worker: WorkerFactory, engine: AsyncEngine, prefix: str
) -> None:
    await start_worker(consumer="capped", max_rows_default=2)
    job = {"id": "cap-1", "table": "items", "where": {"qty": {"gte": 0}}, "inc": {"qty": 1}}
    async with UpdateClient(REDIS_URL, prefix=prefix) as client:
        reply = await client.result(await client.submit(job), timeout=10)
        assert reply.error is not None
        assert reply.error.code == "expectation_failed"
        assert "WORKER_MAX_ROWS_DEFAULT" in reply.error.message
        assert not await recorded(engine, "cap-1")
        own = {"id": "cap-2", "table": "items", "where": {"qty": {"gte": 0}}, "inc": {"qty": 1},
               "expect": {"max_rows": 2}}  # fmt: skip
        reply = await client.result(await client.submit(own), timeout=10)
        assert reply.error is not None
        assert reply.error.code == "expectation_failed"
        assert await recorded(engine, "cap-2")  # the job's own guard: a verdict on its data
    async with engine.connect() as connection:
        assert await connection.scalar(sa.select(sa.func.sum(items.c.qty))) == 40


async def test_workers_with_different_tables_on_one_prefix_are_reported(
    start_worker: WorkerFactory, redis: Redis, database_url: str, prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    env = {"WORKER_REDIS_URL": REDIS_URL, "WORKER_DATABASE_URL": database_url,
           "WORKER_PREFIX": prefix}  # fmt: skip
    await start_worker(consumer="all-tables")
    assert (await cli("check", **env)).returncode == 0
    with caplog.at_level(logging.WARNING, logger="worker.service.startup"):
        await start_worker(consumer="books-only", tables="books")
    warned = [
        record.getMessage() for record in caplog.records if "deployment:" in record.getMessage()
    ]
    assert len(warned) == 1
    assert "all-tables" in warned[0]
    assert "tables only there: items" in warned[0]
    result = await cli("check", **env)
    assert result.returncode == 1
    assert (
        "deployment: worker books-only" in result.stderr
        or "deployment: worker all-tables" in result.stderr
    )
    assert "tables only" in result.stderr
    assert "users" in result.stderr
    records = await deployment.records(redis, Names(prefix))
    assert {record.consumer for record in records if record.live} == {"all-tables", "books-only"}
