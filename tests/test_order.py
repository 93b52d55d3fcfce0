"""Order (DESIGN.md §11): jobs on the same row take effect in the order they were sent, across
worker processes, through the ingest and straight to the partitions, on both backends.

Every job returns the row's value after it, so not only the end state but every step is
checked against applying the jobs one by one.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import REDIS_URL
from tests.faults import WorkerProcesses
from tests.test_operate import cli
from worker.client import UpdateClient
from worker.job.replies import Reply

ROWS, STEPS = 24, 30
metadata = sa.MetaData()
series = sa.Table("series", metadata, sa.Column("id", sa.Integer, primary_key=True),
                  sa.Column("x", sa.Integer, nullable=False))  # fmt: skip
shared = sa.Table("shared", metadata, sa.Column("id", sa.Integer, primary_key=True),
                  sa.Column("x", sa.Integer, nullable=False))  # fmt: skip


def step(row: int, number: int) -> dict[str, Any]:
    """Job ``number`` of ``row``'s series: set x = 10·number, or add 1, alternately."""
    change = {"set": {"x": 10 * number}} if number % 2 == 0 else {"inc": {"x": 1}}
    return {"id": f"r{row}-s{number}", "table": "series", "key": {"id": row}, **change,
            "returning": ["x"]}  # fmt: skip


def sequential(number: int) -> int:
    """The value after job ``number`` when the jobs apply one by one."""
    return 10 * number if number % 2 == 0 else 10 * (number - 1) + 1


def shared_step(number: int) -> dict[str, Any]:
    change = {"set": {"x": 10 * number}} if number % 2 == 0 else {"inc": {"x": 1}}
    return {"id": f"w-s{number}", "table": "shared", "where": {"id": {"gte": 0}}, **change,
            "returning": ["x"]}  # fmt: skip


async def seed_series(engine: AsyncEngine, rows: int) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
        await connection.execute(series.insert(), [{"id": row, "x": 0} for row in range(rows)])


async def assert_series_applied(
    redis: Any, prefix: str, engine: AsyncEngine, *, rows: int, steps: int,
    logs: Callable[[], str],
) -> int:  # fmt: skip
    """Every job of ``rows`` times ``steps`` (from :func:`step`) answered ``ok`` with the value
    of applying them one by one, the rows' final values, and each job once in the ledger
    (no other jobs ran). The number of jobs."""
    ids = [f"r{row}-s{number}" for number in range(steps) for row in range(rows)]
    replies = await replies_for(redis, prefix, ids, logs=logs)
    wrong = [(job_id, reply.returning) for job_id, reply in replies.items()
             if reply.status != "ok" or reply.returning
             != [{"x": sequential(int(job_id.split("-s")[1]))}]]  # fmt: skip
    assert wrong == [], (wrong[:10], logs())
    async with engine.connect() as connection:
        final = dict((await connection.execute(sa.select(series.c.id, series.c.x))).all())
        recorded = (await connection.execute(
            sa.text("SELECT COUNT(*) FROM update_worker_ledger"))).scalar()  # fmt: skip
    assert final == {row: sequential(steps - 1) for row in range(rows)}
    assert recorded == len(ids)
    return len(ids)


@pytest.fixture
def worker_settings() -> dict[str, str]:
    """More WORKER_* settings for the workers (tests/test_orm.py runs them through the unit
    of work)."""
    return {}


@pytest.fixture
async def workers(
    engine: AsyncEngine, database_url: str, prefix: str, tmp_path: Path, redis_url: str,
    worker_settings: dict[str, str],
) -> AsyncIterator[WorkerProcesses]:  # fmt: skip
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
        await connection.execute(series.insert(), [{"id": row, "x": 0} for row in range(ROWS)])
        await connection.execute(shared.insert(), [{"id": row, "x": 0} for row in range(3)])
    processes = WorkerProcesses({"WORKER_DATABASE_URL": database_url, "WORKER_REDIS_URL": redis_url,
                                 "WORKER_PREFIX": prefix, "WORKER_LEASE_MS": "2000",
                                 "WORKER_BLOCK_MS": "500", "WORKER_CONCURRENCY": "4",
                                 **worker_settings}, tmp_path)  # fmt: skip
    try:
        yield processes
        running = len(processes.alive())
        assert await processes.terminate() == [0] * running, processes.tail()
    finally:
        processes.kill_all()


async def replies_for(
    redis: Redis, prefix: str, ids: list[str], *, logs: Callable[[], str] = lambda: ""
) -> dict[str, Reply]:
    """The final reply of every job of ``ids``, waiting up to 60 s; fails naming the jobs
    still without one, with ``logs()`` (the workers' last lines)."""
    found: dict[str, Reply] = {}
    for _ in range(1200):  # up to 60 s
        missing = [job_id for job_id in ids if job_id not in found]
        if not missing:
            return found
        async with redis.pipeline(transaction=False) as pipe:  # MGET would span slots
            for job_id in missing:
                pipe.get(f"{prefix}:result:{job_id}")
            values = await pipe.execute()
        for job_id, value in zip(missing, values, strict=True):
            if value is not None and (reply := Reply.model_validate_json(value)).final:
                found[job_id] = reply
        await asyncio.sleep(0.05)
    missing = [job_id for job_id in ids if job_id not in found]
    raise AssertionError(f"{len(missing)} job(s) without a final reply, {missing[:5]} first\n"
                         f"{logs()}")  # fmt: skip


async def test_jobs_on_a_row_apply_in_order_across_three_worker_processes(
    workers: WorkerProcesses, redis: Redis, prefix: str, engine: AsyncEngine, redis_url: str
) -> None:
    for _ in range(3):
        workers.spawn()
    async with UpdateClient(redis_url, prefix=prefix) as client:
        # Wait until a worker recorded the partition count: the client then writes straight
        # to the partitions, while the even rows go through the ingest as redis-cli would.
        for _ in range(200):
            if await redis.hget(f"{prefix}:meta", "partitions"):
                break
            await asyncio.sleep(0.05)
        ids: list[str] = []
        for number in range(STEPS):
            direct = [step(row, number) for row in range(1, ROWS, 2)]
            async with redis.pipeline(transaction=False) as pipe:
                for row in range(0, ROWS, 2):
                    pipe.xadd(f"{prefix}:jobs", {"job": json.dumps(step(row, number))})
                pipe.xadd(f"{prefix}:jobs", {"job": json.dumps(shared_step(number))})
                await pipe.execute()
            for job in direct:
                job["reply_to"] = f"{prefix}:replies"
            await client.submit_many(direct)
            ids += [f"r{row}-s{number}" for row in range(ROWS)] + [f"w-s{number}"]
    replies = await replies_for(redis, prefix, ids, logs=workers.tail)
    wrong = {job_id: reply for job_id, reply in replies.items()
             if reply.status != "ok" or reply.returning is None}  # fmt: skip
    assert not wrong, list(wrong.items())[:3]
    out_of_order: list[tuple[Any, int, Any]] = []
    for row in range(ROWS):
        for number in range(STEPS):
            reply = replies[f"r{row}-s{number}"]
            if reply.returning != [{"x": sequential(number)}]:
                out_of_order.append((row, number, reply.returning))
    for number in range(STEPS):
        reply = replies[f"w-s{number}"]
        if reply.returning != [{"x": sequential(number)}] * 3:
            out_of_order.append(("shared", number, reply.returning))
    assert out_of_order == [], out_of_order[:10]
    async with engine.connect() as connection:
        final = dict((await connection.execute(sa.select(series.c.id, series.c.x))).all())
    assert final == {row: sequential(STEPS - 1) for row in range(ROWS)}
    assert len(workers.matches(r"partition (\d+): taken over")) >= 16


async def test_the_partition_count_is_fixed_until_everything_is_drained(
    redis: Redis, database_url: str, engine: AsyncEngine, prefix: str
) -> None:
    del engine  # seeded
    env = {"WORKER_REDIS_URL": REDIS_URL, "WORKER_DATABASE_URL": database_url,
           "WORKER_PREFIX": prefix}  # fmt: skip
    assert "no partitions recorded" in (await cli("partitions", **env)).stdout
    await redis.hset(f"{prefix}:meta", "partitions", 16)  # as the first worker records it
    refused = await cli("run", "--burst", **env, WORKER_PARTITIONS="8")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"update-worker: WORKER_PARTITIONS: this deployment ({prefix}:meta) has 16 partitions, "
        "not 8; `update-worker partitions --set 8` changes it once every partition is drained"
    ]
    await redis.xadd(f"{prefix}:{{p3}}:jobs", {"job": "{}"})  # not drained
    busy = await cli("partitions", "--set", "8", **env)
    assert busy.returncode == 1
    assert "1 entr(y/ies) in the streams" in busy.stderr
    await redis.delete(f"{prefix}:{{p3}}:jobs")
    changed = await cli("partitions", "--set", "8", **env)
    assert changed.returncode == 0, changed.stderr
    assert (await cli("run", "--burst", **env, WORKER_PARTITIONS="8")).returncode == 0
    assert "8 partitions recorded" in (await cli("partitions", **env)).stdout


# PostgreSQL only, as test_zombie: a worker stopped on SQLite may hold the one write lock, and
# SQLite's takeover has no bound (README), so the successor could not apply the jobs meanwhile.
# The mover's fencing lives in Redis; the backend does not change what this test proves.
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_a_mover_paused_mid_move_never_moves_anything_twice_or_out_of_order(
    workers: WorkerProcesses, redis: Redis, prefix: str, engine: AsyncEngine
) -> None:
    """The zombie mover with real processes: the first worker is stopped (SIGSTOP) while it
    moves a large ingest backlog, a second takes the moving over, the first resumes. Every
    entry lands in its partition exactly once (the partitions' entries-added), and every row's
    jobs still apply in order."""
    ingest, mover = f"{prefix}:jobs", f"{{{prefix}:jobs}}:mover"
    first = workers.spawn()
    await _until(lambda: redis.exists(mover), "the first worker holds the mover lease", workers)
    fillers = 400  # jobs that change nothing, so the moving takes a while
    jobs = [job for number in range(STEPS) for job in (
        *(step(row, number) for row in range(ROWS)),
        *({"id": f"f{number}-{n}", "table": "series", "key": {"id": n % ROWS},
           "inc": {"x": 0}} for n in range(fillers)),
    )]  # fmt: skip
    try:
        first.send_signal(signal.SIGSTOP)  # the whole backlog in place before it moves any
        for start in range(0, len(jobs), 1000):
            async with redis.pipeline(transaction=False) as pipe:
                for job in jobs[start : start + 1000]:
                    pipe.xadd(ingest, {"job": json.dumps(job)})
                await pipe.execute()
        first.send_signal(signal.SIGCONT)
        await _until(lambda: _below(redis, ingest, len(jobs)), "the first worker moves", workers,
                     pause=0.001)  # fmt: skip
        first.send_signal(signal.SIGSTOP)
        left = await redis.xlen(ingest)
        assert 0 < left < len(jobs)  # stopped in the middle of moving
        second = workers.spawn()
        await _until(lambda: _below(redis, ingest, 1), "the second worker moves the rest", workers,
                     timeout=60)  # fmt: skip
        assert f":{second.pid}/" in str(await redis.get(mover))
    finally:
        first.send_signal(signal.SIGCONT)  # never leave a stopped process behind
    ids = [f"r{row}-s{number}" for number in range(STEPS) for row in range(ROWS)]
    replies = await replies_for(redis, prefix, ids, logs=workers.tail)
    out_of_order = [(job_id, reply.returning) for job_id, reply in replies.items()
                    if reply.returning != [{"x": sequential(int(job_id.split("-s")[1]))}]]  # fmt: skip
    assert out_of_order == [], out_of_order[:10]
    added = 0
    for number in range(16):
        info = await redis.xinfo_stream(f"{prefix}:{{p{number}}}:jobs")
        added += int(info["entries-added"])
    assert added == len(jobs)  # each entry moved exactly once
    async with engine.connect() as connection:
        final = dict((await connection.execute(sa.select(series.c.id, series.c.x))).all())
    assert final == {row: sequential(STEPS - 1) for row in range(ROWS)}


async def _below(redis: Redis, stream: str, length: int) -> bool:
    return int(await redis.xlen(stream)) < length


async def _until(
    condition: Callable[[], Awaitable[Any]],
    what: str,
    workers: WorkerProcesses,
    *,
    timeout: float = 30,
    pause: float = 0.05,
) -> None:
    """Wait for ``condition``; a worker that exits meanwhile, or the timeout, fails the test
    with the end of each worker's log."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        if len(workers.alive()) < len(workers.spawned):
            raise AssertionError(f"a worker exited while waiting until {what}\n{workers.tail()}")
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting until {what}\n{workers.tail()}")
        await asyncio.sleep(pause)
