"""Drains: one worker process empties a queue pre-filled with N benchmark jobs.

The worker starts and answers a first job (it is up), is stopped (SIGSTOP) while the jobs are
added, and resumed: the clock and the CPU meters run from the resume until the queue is empty.
CPU is user + system time from ``/proc``: the worker process, the Redis server, and every
PostgreSQL process (the backends serving the worker included).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis

from bench.procstat import Meter
from worker.job.order import partition_of

POLL_S = 0.02
DEADLINE_S = 600
CHUNK = 1000


def jobs_json(count: int, *, rows: int, reply_to: str) -> list[str]:
    """The benchmark job, ``count`` times: +1 on a random row by key."""
    return [json.dumps({"id": f"d-{number}", "table": "counters", "inc": {"n": 1},
                        "key": {"id": random.randint(1, rows)}, "reply_to": reply_to})
            for number in range(count)]  # fmt: skip


async def fill(redis: Redis, jobs: list[str], stream_of: Callable[[str], str]) -> None:
    for start in range(0, len(jobs), CHUNK):
        async with redis.pipeline(transaction=False) as pipe:
            for job in jobs[start : start + CHUNK]:
                pipe.xadd(stream_of(job), {"job": job})
            await pipe.execute()


async def until_empty(redis: Redis, streams: list[str]) -> None:
    """Until every stream is empty: workers XDEL an entry once its reply is stored and acked.
    Fails after ``DEADLINE_S``: a drain that never ends is a result, not a wait."""
    deadline = time.perf_counter() + DEADLINE_S
    while time.perf_counter() < deadline:
        async with redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xlen(stream)
            if not any(await pipe.execute()):
                return
        await asyncio.sleep(POLL_S)
    raise RuntimeError(f"{streams[0]} and its partitions still hold entries after {DEADLINE_S} s")


async def measure(
    redis: Redis, worker: int, jobs: int, *, fill_queue: Awaitable[None],
    done: Callable[[], Awaitable[None]],
) -> dict[str, Any]:  # fmt: skip
    """Stop ``worker``, fill its queue, resume it, and time it until ``done``."""
    os.kill(worker, signal.SIGSTOP)
    filled_at = time.perf_counter()
    try:
        await fill_queue
    finally:
        os.kill(worker, signal.SIGCONT)
    fill_s = time.perf_counter() - filled_at
    redis_pid = int((await redis.info("server"))["process_id"])
    meter = Meter(pids={"worker": [worker], "redis": [redis_pid]}, names={"postgres": "postgres"})
    meter.start()
    started = time.perf_counter()
    await done()
    elapsed = time.perf_counter() - started
    cpu = meter.stop()
    return {"jobs": jobs, "throughput": jobs / elapsed, "fill_s": fill_s,
            **{f"{group}_us": seconds / jobs * 1e6 for group, seconds in cpu.items()}}  # fmt: skip


async def drain_ours(ours: Any, jobs: int, *, direct: bool, partitions: int = 16) -> dict[str, Any]:
    """update-worker (a started ``bench.__main__.Ours``): through the ingest stream, or, with
    ``direct``, straight into the partition streams as the Python client writes."""
    ingest = f"{ours.prefix}:jobs"
    streams = [ingest] + [f"{ours.prefix}:{{p{n}}}:jobs" for n in range(partitions)]

    def stream_of(job: str) -> str:
        if not direct:
            return ingest
        row = json.loads(job)["key"]["id"]
        return streams[1 + partition_of(f"counters:{row}", partitions)]

    queue = fill(ours.redis, jobs_json(jobs, rows=10_000, reply_to=f"{ours.prefix}:drain"),
                 stream_of)  # fmt: skip
    return await measure(ours.redis, ours.workers[0].pid, jobs, fill_queue=queue,
                         done=lambda: until_empty(ours.redis, streams))  # fmt: skip


async def drain_limit(database_url: str, redis_url: str, jobs: int) -> dict[str, Any]:
    """The minimal worker of ``bench/limit.py``, on its own stream."""
    stream = f"limit-{uuid.uuid4().hex[:8]}"
    command = [sys.executable, "-m", "bench.limit", "--database-url", database_url,
               "--redis-url", redis_url, "--stream", stream]  # fmt: skip
    redis = Redis.from_url(redis_url)
    worker = await asyncio.create_subprocess_exec(*command)
    try:
        await redis.xadd(stream, {"job": jobs_json(1, rows=10_000, reply_to="-")[0]})
        await until_empty(redis, [stream])  # it is up
        queue = fill(redis, jobs_json(jobs, rows=10_000, reply_to="-"), lambda _: stream)
        return await measure(redis, worker.pid, jobs, fill_queue=queue,
                             done=lambda: until_empty(redis, [stream]))  # fmt: skip
    finally:
        worker.terminate()
        await asyncio.wait_for(worker.wait(), 30)
        keys = [key async for key in redis.scan_iter(match=f"{stream}*", count=5000)]
        for start in range(0, len(keys), CHUNK):
            await redis.delete(*keys[start : start + CHUNK])
        await redis.aclose()
