"""Scale-out: one Redis against a Redis Cluster of three primaries (each with a replica), with
1, 2 and 4 worker processes (``make bench``, or ``python -m bench.cluster``).

A producer in this process XADDs the benchmark job straight to the partitions, in pipelined
chunks, while the workers run; the clock runs from the first XADD until every stream is empty.
Redis CPU per job is read from ``/proc`` for each primary (its pid from ``INFO server``). On a
machine of 2 cores every process competes for the same CPU, so what these figures show is the
cost per job and that nothing collapses, not the gain more machines would bring.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from bench.drain import fill, jobs_json, until_empty
from bench.ours import REDIS_URL, ROOT, ROWS, database, prepare
from bench.procstat import Meter
from tests.clusters import PrivateCluster
from worker.job.order import partition_of
from worker.stream.client import AnyRedis, is_cluster, open_redis

PARTITIONS = 16


async def primaries(redis: AnyRedis) -> dict[str, int]:
    """``host:port`` -> pid of each primary (the one server, or each cluster primary)."""
    if not is_cluster(redis):
        return {"one redis": int((await redis.info("server"))["process_id"])}
    found = {}
    for node in redis.get_primaries():  # type: ignore[union-attr]
        async with Redis(host=node.host, port=int(node.port)) as client:
            found[node.name] = int((await client.info("server"))["process_id"])
    return found


def spawn(env: dict[str, str], processes: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-m", "worker", "run"], env=env, cwd=ROOT)
            for _ in range(processes)]  # fmt: skip


async def measure(url: str, database_url: str, *, processes: int, jobs: int) -> dict[str, Any]:
    prefix = f"scale{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "WORKER_DATABASE_URL": database_url, "WORKER_REDIS_URL": url,
           "WORKER_PREFIX": prefix, "WORKER_LOG_LEVEL": "WARNING"}  # fmt: skip
    workers = spawn(env, processes)
    redis = await open_redis(url)
    try:
        deadline = time.monotonic() + 60
        while sum(str(field).startswith(("worker:", "b'worker:"))
                  for field in await redis.hkeys(f"{prefix}:meta")) < processes:  # fmt: skip
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not start")
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # the partitions are shared out among them
        work = jobs_json(jobs, rows=ROWS, reply_to=f"{prefix}:replies")
        streams = [f"{prefix}:{{p{number}}}:jobs" for number in range(PARTITIONS)]

        def stream_of(job: str) -> str:
            key = json.loads(job)["key"]["id"]
            return streams[partition_of(f"counters:{key}", PARTITIONS)]

        meter = Meter(pids={name: [pid] for name, pid in (await primaries(redis)).items()})
        meter.start()
        started = time.perf_counter()
        await fill(redis, work, stream_of)  # type: ignore[arg-type]
        await until_empty(redis, [f"{prefix}:jobs", *streams])  # type: ignore[arg-type]
        elapsed = time.perf_counter() - started
        cpu = meter.stop()
        return {"throughput": jobs / elapsed,
                "redis_us": {name: seconds / jobs * 1e6 for name, seconds in cpu.items()}}  # fmt: skip
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(60)
        await redis.aclose()


async def run_cluster_bench(jobs: int) -> None:
    print(f"scale-out: {jobs:,} jobs straight to the partitions while N worker processes run "
          "(PostgreSQL); Redis CPU per job per primary, from /proc")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as directory:
        cluster = PrivateCluster(Path(directory))
        try:
            await cluster.start()
            print(f"{'redis':<26}{'workers':>8}{'jobs/s':>9}  redis µs of CPU per job, by primary")
            for name, url in (("one server", REDIS_URL), ("cluster, 3 primaries", cluster.url)):
                for processes in (1, 2, 4):
                    async with database("postgresql") as database_url:
                        await prepare(database_url)
                        found = await measure(url, database_url, processes=processes, jobs=jobs)
                    by_primary = ", ".join(f"{us:.0f}" for us in found["redis_us"].values())
                    total = sum(found["redis_us"].values())
                    print(f"{name:<26}{processes:>8}{found['throughput']:>9,.0f}  "
                          f"{by_primary} (total {total:.0f})")  # fmt: skip
        finally:
            cluster.stop()
    print()


if __name__ == "__main__":
    asyncio.run(run_cluster_bench(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000))
