"""update-worker under the benchmark: throwaway databases, worker processes, a producer.

The job: +1 on one of 10,000 rows by primary key. update-worker runs with its default settings
and the exactly-once ledger on; its producer XADDs to the ingest stream in pipelined chunks and
counts the replies on the reply channel.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import sqlalchemy as sa
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import create_async_engine

ROWS = 10_000
ROOT = Path(__file__).resolve().parent.parent
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


class Ours:
    """update-worker processes on one stream, and a producer listening on the reply channel."""

    def __init__(
        self, database_url: str, *, processes: int = 1, settings: dict[str, str] | None = None
    ) -> None:
        self.prefix = f"bench-{uuid.uuid4().hex[:8]}"
        self.channel = f"{self.prefix}:replies"
        env = {**os.environ, "WORKER_DATABASE_URL": database_url, "WORKER_REDIS_URL": REDIS_URL,
               "WORKER_PREFIX": self.prefix, "WORKER_LOG_LEVEL": "WARNING", **(settings or {})}  # fmt: skip
        self.workers = [
            subprocess.Popen([sys.executable, "-m", "worker", "run"], env=env, cwd=ROOT)
            for _ in range(processes)
        ]
        self.redis = Redis.from_url(REDIS_URL)
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        self.sent = 0

    async def __aenter__(self) -> Ours:
        await self.pubsub.subscribe(self.channel)
        await self.roundtrip()  # warm-up: the workers are up
        return self

    async def __aexit__(self, *_: object) -> None:
        for worker in self.workers:
            worker.terminate()
        for worker in self.workers:
            worker.wait(60)
        await self.pubsub.aclose()
        keys = [key async for key in self.redis.scan_iter(match=f"{self.prefix}:*", count=5000)]
        keys += [f"{{{self.prefix}:jobs}}:mover", f"{{{self.prefix}:jobs}}:mover-generation"]
        for start in range(0, len(keys), 1000):
            await self.redis.delete(*keys[start : start + 1000])
        await self.redis.aclose()

    def job(self) -> str:
        self.sent += 1
        return json.dumps({"id": f"j-{self.sent}", "table": "counters", "inc": {"n": 1},
                           "key": {"id": random.randint(1, ROWS)}, "reply_to": self.channel})  # fmt: skip

    async def throughput(self, jobs: int) -> float:
        started = time.perf_counter()
        for chunk in range(0, jobs, 500):
            async with self.redis.pipeline(transaction=False) as pipe:
                for _ in range(min(500, jobs - chunk)):
                    pipe.xadd(f"{self.prefix}:jobs", {"job": self.job()})
                await pipe.execute()
        for received in range(jobs):
            if await self.next_reply(timeout=60) is None:
                raise RuntimeError(f"only {received} of {jobs} replies")
        return jobs / (time.perf_counter() - started)

    async def roundtrip(self) -> float:
        started = time.perf_counter()
        await self.redis.xadd(f"{self.prefix}:jobs", {"job": self.job()})
        if await self.next_reply(timeout=60) is None:
            raise RuntimeError("no reply")
        return (time.perf_counter() - started) * 1000

    async def next_reply(self, *, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if (message := await self.pubsub.get_message(timeout=left)) is not None:
                return message
        return None

    def rss_mb(self) -> float:
        rss = sum(psutil.Process(worker.pid).memory_info().rss for worker in self.workers)
        return float(rss) / 2**20


async def run_ours(
    database_url: str, *, jobs: int, sequential: int, processes: int = 1
) -> dict[str, Any]:
    await prepare(database_url)
    async with Ours(database_url, processes=processes) as ours:
        throughput = await ours.throughput(jobs)
        latencies = [await ours.roundtrip() for _ in range(sequential)]
    return {"throughput": throughput, **percentiles(latencies)}


async def run_memory(database_url: str, *, first: int, total: int) -> dict[str, float]:
    await prepare(database_url)
    async with Ours(database_url) as ours:
        await ours.throughput(first)
        early = ours.rss_mb()
        for _ in range((total - first) // 10_000):
            await ours.throughput(10_000)
        return {"rss_mb_after_first": early, "rss_mb_after_total": ours.rss_mb()}


def percentiles(latencies: list[float]) -> dict[str, float]:
    return {"p50": statistics.median(latencies), "p99": statistics.quantiles(latencies, n=100)[98]}


@contextlib.asynccontextmanager
async def database(backend: str) -> AsyncIterator[str]:
    """A throwaway database, removed afterwards."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as directory:
            yield f"sqlite+aiosqlite:///{directory}/bench.db"
        return
    name = f"update_worker_bench_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(POSTGRES_ADMIN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        base = POSTGRES_ADMIN.replace("postgresql://", "postgresql+asyncpg://").rsplit("/", 1)[0]
        yield f"{base}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
