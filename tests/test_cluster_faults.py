"""A fault run on a Redis Cluster of its own (three primaries, three replicas): jobs keep
flowing, through the ingest and straight to the partitions, while one primary fails over the
planned way (CLUSTER FAILOVER), another is SIGKILLed and replaced by its replica, and a worker
is SIGKILLed and replaced. Every job was acknowledged by a replica (WAIT) before it counts as
sent. Afterwards: every job has its reply, once; no row saw its jobs out of order; the ledger
holds each job once.

Set CLUSTER_FAULT_STEPS for a longer run (default 36 steps of 12 rows)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.clusters import PrivateCluster, running
from tests.faults import WorkerProcesses
from tests.test_order import assert_series_applied, seed_series, step
from tests.test_sentinel import both_serving
from worker.errors import Unavailable
from worker.job.order import derive_order_key, partition_of
from worker.stream.replicated import ReplicatedWrites

ROWS = 12
STEPS = int(os.environ.get("CLUSTER_FAULT_STEPS", "36"))
_XADD = "return redis.call('XADD', KEYS[1], '*', 'job', ARGV[1])"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[PrivateCluster]:
    with running(PrivateCluster(tmp_path / "cluster")) as deployment:
        yield deployment


@pytest.fixture
async def redis(cluster: PrivateCluster) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(cluster.url)
    await client.initialize()
    yield client
    await client.aclose()


class WaitedProducer:
    """``XADD``s that count as sent once a replica has them (``WAIT 1``), as the README tells
    producers on a cluster to do; a batch that failed in a failover is sent again (its jobs
    carry ids: a job added twice applies once)."""

    def __init__(self, redis: RedisCluster) -> None:
        self.redis = redis
        self.writes = ReplicatedWrites(redis, timeout_ms=2000)
        self.script = redis.register_script(_XADD)
        self.resent = 0

    async def send(self, jobs: list[tuple[str, dict[str, Any]]]) -> None:
        calls = [([stream], [json.dumps(job)]) for stream, job in jobs]
        deadline = time.monotonic() + 60
        while True:
            try:
                await self.writes.run(self.script, calls)
            except (RedisError, OSError, Unavailable):
                if time.monotonic() > deadline:
                    raise
                self.resent += 1
                with contextlib.suppress(RedisError, OSError):
                    await self.redis.nodes_manager.initialize()
                await asyncio.sleep(0.2)
            else:
                return


async def test_jobs_survive_failovers_and_a_killed_worker_in_order_and_once(
    cluster: PrivateCluster, redis: RedisCluster, engine: AsyncEngine, database_url: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    prefix = "faults"
    await seed_series(engine, ROWS)
    workers = WorkerProcesses({"WORKER_DATABASE_URL": database_url, "WORKER_REDIS_URL": cluster.url,
                               "WORKER_PREFIX": prefix, "WORKER_LEASE_MS": "2000",
                               "WORKER_BLOCK_MS": "500", "WORKER_CONCURRENCY": "4"}, tmp_path)  # fmt: skip
    producer = WaitedProducer(redis)
    try:
        first = workers.spawn()
        workers.spawn()
        await both_serving(redis, prefix, workers)
        ingest_primary = redis.get_node_from_key(f"{prefix}:jobs")
        failovers: list[float] = []
        for number in range(STEPS):
            jobs: list[tuple[str, dict[str, Any]]] = []
            for row in range(ROWS):
                job = step(row, number)
                if row % 2:  # straight to its partition, as the Python client does
                    key = derive_order_key(job)
                    assert key is not None
                    jobs.append((f"{prefix}:{{p{partition_of(key, 16)}}}:jobs", job))
                else:  # through the ingest, as redis-cli -c does
                    jobs.append((f"{prefix}:jobs", job))
            await producer.send(jobs)
            await asyncio.sleep(0.05)  # jobs in flight at each fault
            if number == STEPS // 4:  # the ingest's primary hands over, the planned way
                started = time.monotonic()
                primary = next(node for node in cluster.live()
                               if ingest_primary and node.port == ingest_primary.port)  # fmt: skip
                await cluster.failover(primary)
                failovers.append(time.monotonic() - started)
            elif number == STEPS // 2:  # a primary holding partitions dies
                started = time.monotonic()
                primaries = await cluster.primaries()
                victim = next(node for node in primaries
                              if not ingest_primary or node.port != ingest_primary.port)  # fmt: skip
                await cluster.kill_primary(victim)
                failovers.append(time.monotonic() - started)
            elif number == 3 * STEPS // 4:
                workers.kill(first)
                workers.spawn()
        answered = await assert_series_applied(
            redis, prefix, engine, rows=ROWS, steps=STEPS, logs=workers.tail
        )
        print(f"cluster fault run: {answered} jobs, failovers {[round(s, 1) for s in failovers]} s,"
              f" {producer.resent} batch(es) sent again, 1 worker killed")  # fmt: skip
        running = len(workers.alive())
        assert await workers.terminate() == [0] * running, workers.tail()
    finally:
        workers.kill_all()
        await producer.writes.aclose()
