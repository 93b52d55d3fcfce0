"""``make bench``: throughput and latency of update-worker on the job of issue 4.

The job: +1 on one of 10,000 rows by primary key, with the ledger on. One worker process
(``update-worker run``, a subprocess) serves; this process produces over loopback.
- throughput: N jobs XADDed in pipelined chunks, timed until every reply is in;
- latency: sequential XADD -> reply on the channel round trips, p50 and p99.
The side-by-side anchors (arq, SAQ, taskiq) come with issue 4; this prints the project alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import sqlalchemy as sa
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import create_async_engine

ROWS = 10_000
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_ADMIN = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


async def prepare(database_url: str) -> None:
    engine = create_async_engine(database_url)
    async with engine.begin() as connection:
        await connection.execute(sa.text("DROP TABLE IF EXISTS counters"))
        await connection.execute(sa.text("DROP TABLE IF EXISTS update_worker_ledger"))
        await connection.execute(
            sa.text("CREATE TABLE counters (id integer PRIMARY KEY, n integer NOT NULL)")
        )
        await connection.execute(
            sa.text("INSERT INTO counters (id, n) VALUES (:id, 0)"),
            [{"id": i} for i in range(1, ROWS + 1)],
        )
    await engine.dispose()


async def measure(
    backend: str, database_url: str, *, jobs: int, sequential: int, concurrency: int
) -> dict[str, Any]:
    await prepare(database_url)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "WORKER_DATABASE_URL": database_url, "WORKER_REDIS_URL": REDIS_URL,
           "WORKER_PREFIX": prefix, "WORKER_CONCURRENCY": str(concurrency), "WORKER_LOG_LEVEL": "WARNING"}  # fmt: skip
    worker = await asyncio.create_subprocess_exec(sys.executable, "-m", "worker", "run", env=env)
    redis = Redis.from_url(REDIS_URL)
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    channel = f"{prefix}:replies"
    await pubsub.subscribe(channel)
    try:
        await roundtrip(redis, pubsub, prefix, channel, "warm-up")
        started = time.perf_counter()
        for chunk in range(0, jobs, 500):
            async with redis.pipeline(transaction=False) as pipe:
                for n in range(chunk, min(chunk + 500, jobs)):
                    pipe.xadd(f"{prefix}:jobs", {"job": job(f"t-{n}", channel)})
                await pipe.execute()
        for received in range(jobs):
            if await next_reply(pubsub, timeout=60) is None:
                raise RuntimeError(f"{backend}: only {received} of {jobs} replies")
        throughput = jobs / (time.perf_counter() - started)
        latencies = [
            await roundtrip(redis, pubsub, prefix, channel, f"l-{n}") for n in range(sequential)
        ]
    finally:
        worker.terminate()
        await worker.wait()
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await redis.delete(f"{prefix}:jobs", f"{prefix}:dead")
        async for key in redis.scan_iter(match=f"{prefix}:result:*", count=5000):
            await redis.delete(key)
        await redis.aclose()
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "backend": backend,
        "throughput": throughput,
        "p50": statistics.median(latencies),
        "p99": quantiles[98],
    }


def job(job_id: str, channel: str) -> str:
    row = random.randint(1, ROWS)
    return json.dumps(
        {
            "id": job_id,
            "table": "counters",
            "inc": {"n": 1},
            "key": {"id": row},
            "reply_to": channel,
        }
    )


async def roundtrip(redis: Redis, pubsub: Any, prefix: str, channel: str, job_id: str) -> float:
    started = time.perf_counter()
    await redis.xadd(f"{prefix}:jobs", {"job": job(job_id, channel)})
    if await next_reply(pubsub, timeout=30) is None:
        raise RuntimeError(f"no reply to {job_id}")
    return (time.perf_counter() - started) * 1000


async def next_reply(pubsub: Any, *, timeout: float) -> dict[str, Any] | None:
    """The next published message; get_message also returns None for a skipped subscribe ack."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        message = await pubsub.get_message(timeout=left)
        if message is not None:
            return message  # type: ignore[no-any-return]
    return None


@contextlib.asynccontextmanager
async def database(backend: str) -> AsyncIterator[str]:
    """A throwaway database for one backend's run, removed afterwards."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as directory:
            yield f"sqlite+aiosqlite:///{directory}/bench.db"
        return
    name = f"update_worker_bench_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(POSTGRES_ADMIN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield (
            POSTGRES_ADMIN.replace("postgresql://", "postgresql+asyncpg://").rsplit("/", 1)[0]
            + f"/{name}"
        )
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--sequential", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--backend", choices=["postgresql", "sqlite", "both"], default="both")
    args = parser.parse_args()
    print(
        f"update-worker bench: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(
        f"job: +1 on one of {ROWS:,} rows by key, ledger on; one worker process, concurrency {args.concurrency}"
    )
    print(
        f"throughput: {args.jobs} jobs until every reply is in; latency: {args.sequential} sequential round trips\n"
    )
    backends = ["postgresql", "sqlite"] if args.backend == "both" else [args.backend]
    results = []
    for backend in backends:
        async with database(backend) as url:
            results.append(
                await measure(
                    backend,
                    url,
                    jobs=args.jobs,
                    sequential=args.sequential,
                    concurrency=args.concurrency,
                )
            )
    print(f"{'system':<28}{'jobs/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for result in results:
        print(
            f"{'update-worker ' + result['backend']:<28}{result['throughput']:>10.0f}{result['p50']:>10.2f}{result['p99']:>10.2f}"
        )
    print("\nanchors (arq, SAQ, taskiq) side by side: not measured yet (issue 4)")


if __name__ == "__main__":
    asyncio.run(main())
