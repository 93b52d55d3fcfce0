"""The anchors, on exactly update-worker's benchmark job, each run from its own virtual env.

``python -m bench.anchors SYSTEM --database-url URL --redis-url URL --jobs N --sequential M``
starts one worker process of SYSTEM (arq, saq or taskiq) with 10 concurrent jobs, produces
from this process, and prints one JSON line: throughput, p50 and p99. With ``--drain N``, it
measures a drain of N jobs pre-filled into the anchor's own queue instead: jobs/s, and the
worker's CPU per job (from /proc). The job: +1 on one of
10,000 rows by primary key through a SQLAlchemy AsyncSession. No exactly-once ledger: the
anchors have none.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from bench.procstat import Meter

ROWS = 10_000
BUMP = sa.text("UPDATE counters SET n = n + 1 WHERE id = :id")
POLL_S = 0.001  # how often a producer checks for a result: generous to every anchor
#: A drain whose count of applied jobs stands still this long is over; what is missing is said.
STALL_S = 15.0


def sessions(database_url: str, concurrency: int) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(create_async_engine(database_url, pool_size=concurrency))


async def bump(maker: async_sessionmaker[AsyncSession], row: int) -> int:
    async with maker() as session:
        result = await session.execute(BUMP, {"id": row})
        await session.commit()
        return int(result.rowcount)  # type: ignore[attr-defined]


# -- arq ---------------------------------------------------------------------------------------


def arq_worker(args: argparse.Namespace) -> None:
    from arq.connections import RedisSettings
    from arq.worker import Worker, func

    async def startup(ctx: dict[str, Any]) -> None:
        ctx["sessions"] = sessions(args.database_url, args.concurrency)

    async def job(ctx: dict[str, Any], row: int) -> int:
        return await bump(ctx["sessions"], row)

    worker = Worker(functions=[func(job, name="job")], redis_settings=RedisSettings.from_dsn(args.redis_url),
                    queue_name=args.prefix, max_jobs=args.concurrency, poll_delay=0.01,
                    on_startup=startup, handle_signals=True)  # fmt: skip
    worker.run()


async def arq_produce(args: argparse.Namespace) -> Callable[[int], Awaitable[Any]]:
    from arq.connections import RedisSettings, create_pool

    pool = await create_pool(RedisSettings.from_dsn(args.redis_url), default_queue_name=args.prefix)

    async def submit(row: int) -> Any:
        job = await pool.enqueue_job("job", row)
        if job is None:
            raise RuntimeError("arq refused the job")
        return job.result(poll_delay=POLL_S, timeout=60)

    return submit


# -- SAQ ---------------------------------------------------------------------------------------


def saq_worker(args: argparse.Namespace) -> None:
    from saq import Queue, Worker

    async def startup(ctx: dict[str, Any]) -> None:
        ctx["sessions"] = sessions(args.database_url, args.concurrency)

    async def job(ctx: dict[str, Any], *, row: int) -> int:
        return await bump(ctx["sessions"], row)

    queue = Queue.from_url(args.redis_url, name=args.prefix)
    worker = Worker(queue, functions=[("job", job)], concurrency=args.concurrency, startup=startup)
    asyncio.run(worker.start())


async def saq_produce(args: argparse.Namespace) -> Callable[[int], Awaitable[Any]]:
    from saq import Queue

    queue = Queue.from_url(args.redis_url, name=args.prefix)
    await queue.connect()

    async def submit(row: int) -> Any:
        job = await queue.enqueue("job", row=row)
        if job is None:
            raise RuntimeError("SAQ refused the job")
        return job.refresh(until_complete=60)

    return submit


# -- taskiq ------------------------------------------------------------------------------------


def taskiq_broker(args: argparse.Namespace) -> Any:
    from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

    broker = RedisStreamBroker(
        args.redis_url, queue_name=args.prefix, consumer_group_name=args.prefix
    )
    return broker.with_result_backend(RedisAsyncResultBackend(args.redis_url))


def taskiq_worker(args: argparse.Namespace) -> None:
    from taskiq.api import run_receiver_task

    broker = taskiq_broker(args)
    maker = sessions(args.database_url, args.concurrency)

    @broker.task(task_name="job")  # type: ignore[untyped-decorator]
    async def job(row: int) -> int:
        return await bump(maker, row)

    async def main() -> None:
        broker.is_worker_process = True
        await broker.startup()
        await run_receiver_task(broker, max_async_tasks=args.concurrency)

    asyncio.run(main())


async def taskiq_produce(args: argparse.Namespace) -> Callable[[int], Awaitable[Any]]:
    broker = taskiq_broker(args)
    await broker.startup()
    task = broker.register_task(lambda row: row, task_name="job")

    async def submit(row: int) -> Any:
        sent = await task.kiq(row)
        return sent.wait_result(check_interval=POLL_S, timeout=60)

    return submit


# -- the harness -------------------------------------------------------------------------------

SYSTEMS = {
    "arq": (arq_worker, arq_produce),
    "saq": (saq_worker, saq_produce),
    "taskiq": (taskiq_worker, taskiq_produce),
}


@contextlib.asynccontextmanager
async def running(
    args: argparse.Namespace,
) -> AsyncIterator[tuple[subprocess.Popen[bytes], Any, Callable[[int], Awaitable[Any]]]]:
    """The anchor's worker process, up (it answered a first job): the process, an engine on
    the benchmark's database, and the producer's submit."""
    command = [sys.executable, "-m", "bench.anchors", args.system, "--worker",
               "--database-url", args.database_url, "--redis-url", args.redis_url,
               "--prefix", args.prefix, "--concurrency", str(args.concurrency)]  # fmt: skip
    worker = start(command)
    engine = create_async_engine(args.database_url)
    try:
        submit = await SYSTEMS[args.system][1](args)
        await asyncio.wait_for(await submit(1), 60)  # warm-up: the worker is up
        yield worker, engine, submit
    finally:
        worker.terminate()
        worker.wait(30)
        await engine.dispose()


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    async with running(args) as (_, engine, submit):
        target = await applied(engine) + args.jobs
        started = time.perf_counter()
        waits: list[Awaitable[Any]] = []
        for chunk in range(0, args.jobs, 100):  # enqueue 100 at a time, concurrently
            size = min(100, args.jobs - chunk)
            waits += await asyncio.gather(*(submit(random.randint(1, ROWS)) for _ in range(size)))
        # One cheap query instead of thousands of result polls, then every result, once.
        while await applied(engine) < target:  # noqa: ASYNC110 - polling is the measurement
            await asyncio.sleep(0.005)
        await asyncio.gather(*waits)
        throughput = args.jobs / (time.perf_counter() - started)
        latencies = []
        for _ in range(args.sequential):
            started = time.perf_counter()
            await (await submit(random.randint(1, ROWS)))
            latencies.append((time.perf_counter() - started) * 1000)
    return {
        "system": args.system,
        "throughput": throughput,
        "p50": statistics.median(latencies),
        "p99": statistics.quantiles(latencies, n=100)[98],
    }


async def drain(args: argparse.Namespace) -> dict[str, Any]:
    """The anchor's own queue pre-filled with ``--drain`` jobs while its worker is stopped
    (SIGSTOP), then timed from the resume until every job applied; its worker's CPU per job."""
    async with running(args) as (worker, engine, submit):
        target = await applied(engine) + args.drain
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            for chunk in range(0, args.drain, 100):  # the results are not awaited: closed
                size = min(100, args.drain - chunk)
                for result in await asyncio.gather(
                    *(submit(random.randint(1, ROWS)) for _ in range(size))
                ):
                    result.close()
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        meter = Meter(pids={"worker": [worker.pid]})
        meter.start()
        started = moved = time.perf_counter()
        done = last = await applied(engine)
        while done < target and time.perf_counter() - moved < STALL_S:
            await asyncio.sleep(0.02)
            if (done := await applied(engine)) != last:
                last, moved = done, time.perf_counter()
        elapsed = moved - started  # until the last job applied
        cpu = meter.stop()
    jobs = args.drain - (target - done)  # a job its worker never applied is not counted
    return {"system": args.system, "jobs": jobs, "missing": target - done,
            "throughput": jobs / elapsed, "worker_us": cpu["worker"] / jobs * 1e6}  # fmt: skip


def start(command: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, stdout=subprocess.DEVNULL)


async def applied(engine: Any) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(sa.text("SELECT sum(n) FROM counters"))).scalar_one())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.anchors")
    parser.add_argument("system", choices=sorted(SYSTEMS))
    parser.add_argument("--worker", action="store_true", help="run the worker (internal)")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--prefix", default=f"anchor-{os.getpid()}")
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--sequential", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--drain", type=int, default=0, help="measure a drain of N jobs instead")
    args = parser.parse_args()
    if args.worker:
        SYSTEMS[args.system][0](args)
        return
    print(json.dumps(asyncio.run(drain(args) if args.drain else measure(args))))


if __name__ == "__main__":
    main()
