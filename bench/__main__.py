"""``make bench``: update-worker and the anchors (arq, SAQ, taskiq), side by side, same run.

The job: +1 on one of 10,000 rows by primary key through a SQLAlchemy AsyncSession.
- throughput: N jobs, timed from the first enqueue until every result is in;
- latency: sequential submit -> result round trips, p50 and p99.
update-worker runs with its default settings and the exactly-once ledger on: its producer
XADDs in pipelined chunks and counts the replies on the reply channel. Each anchor runs one
worker process with 10 concurrent jobs, from a virtual environment of its own
(``.venv-bench-<name>``; see ``bench/anchors.py``). Then update-worker alone: SQLite, 1, 2 and
4 worker processes on one group, and its memory after 20,000 and 200,000 jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
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
ANCHORS = ("arq", "saq", "taskiq")


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

    def __init__(self, database_url: str, *, processes: int = 1) -> None:
        self.prefix = f"bench-{uuid.uuid4().hex[:8]}"
        self.channel = f"{self.prefix}:replies"
        env = {**os.environ, "WORKER_DATABASE_URL": database_url, "WORKER_REDIS_URL": REDIS_URL,
               "WORKER_PREFIX": self.prefix, "WORKER_LOG_LEVEL": "WARNING"}  # fmt: skip
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
        await self.pubsub.aclose()  # type: ignore[no-untyped-call]
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


def run_anchor(name: str, database_url: str, *, jobs: int, sequential: int) -> dict[str, Any]:
    python = ROOT / f".venv-bench-{name}" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python} is missing: run `make bench`, which installs the anchors")
    command = [str(python), "-m", "bench.anchors", name, "--database-url", database_url,
               "--redis-url", REDIS_URL, "--prefix", f"anchor-{uuid.uuid4().hex[:8]}",
               "--jobs", str(jobs), "--sequential", str(sequential)]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


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


async def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--sequential", type=int, default=300)
    parser.add_argument("--memory-jobs", type=int, default=200_000)
    parser.add_argument(
        "--skip", nargs="*", default=[], help="parts to skip: anchors sqlite scaling memory"
    )
    args = parser.parse_args()
    print(f"update-worker bench, {dt.date.today()}: {platform.node()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, Redis and PostgreSQL on this machine")  # fmt: skip
    print(f"job: +1 on one of {ROWS:,} rows by key through an AsyncSession; throughput: {args.jobs} "
          f"jobs until every result is in; latency: {args.sequential} sequential round trips")  # fmt: skip
    print("update-worker: default settings, exactly-once ledger on; anchors: one worker process, "
          "10 concurrent jobs\n")  # fmt: skip
    rows: list[dict[str, Any]] = []
    async with database("postgresql") as url:
        rows.append(
            {
                "system": "update-worker (PostgreSQL)",
                **await run_ours(url, jobs=args.jobs, sequential=args.sequential),
            }
        )
        for name in () if "anchors" in args.skip else ANCHORS:
            await prepare(url)
            rows.append(
                await asyncio.to_thread(
                    run_anchor, name, url, jobs=args.jobs, sequential=args.sequential
                )
            )
    if "sqlite" not in args.skip:
        async with database("sqlite") as url:
            rows.append(
                {
                    "system": "update-worker (SQLite)",
                    **await run_ours(url, jobs=args.jobs, sequential=args.sequential),
                }
            )
    ours = rows[0]["throughput"]
    print(f"{'system':<28}{'jobs/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'ours/it':>11}")
    for row in rows:
        print(f"{row['system']:<28}{row['throughput']:>9.0f}{row['p50']:>9.2f}{row['p99']:>9.2f}"
              f"{ours / row['throughput']:>10.1f}x")  # fmt: skip
    scaling: dict[int, float] = {}
    if "scaling" not in args.skip:
        print(
            "\nupdate-worker, PostgreSQL, N worker processes on one consumer group (20,000 jobs):"
        )
        for processes in (1, 2, 4):
            async with database("postgresql") as url:
                result = await run_ours(url, jobs=20_000, sequential=2, processes=processes)
            scaling[processes] = result["throughput"]
            print(f"  {processes} process(es): {scaling[processes]:>6.0f} jobs/s")
    if "memory" not in args.skip:
        async with database("postgresql") as url:
            memory = await run_memory(url, first=20_000, total=args.memory_jobs)
        growth = memory["rss_mb_after_total"] / memory["rss_mb_after_first"] - 1
        print(f"\nmemory, one worker: RSS {memory['rss_mb_after_first']:.1f} MB after 20,000 jobs, "
              f"{memory['rss_mb_after_total']:.1f} MB after {args.memory_jobs:,} ({growth:+.1%})")  # fmt: skip
    from bench.plot import plot

    picture = plot(rows, scaling, ROOT / "docs" / "benchmark.png")
    print(f"\nwrote {picture.relative_to(ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
