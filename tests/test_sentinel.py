"""Redis Sentinel: a primary, its replica and three sentinels of the test's own. The workers
find the primary through the sentinels, and follow the replica when the primary is SIGKILLed
mid-run; every job whose XADD a replica acknowledged (WAIT) is answered, once, in order."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.clusters import PrivateSentinel, running
from tests.faults import WorkerProcesses
from tests.test_order import assert_series_applied, seed_series, step
from worker.errors import SettingsError
from worker.settings import load_settings

ROWS, STEPS = 8, 30


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[PrivateSentinel]:
    with running(PrivateSentinel(tmp_path / "sentinel")) as deployment:
        yield deployment


@pytest.fixture
async def primary(sentinel: PrivateSentinel) -> AsyncIterator[Redis]:
    """The primary as a producer sees it: through the sentinels."""
    watch = Sentinel([("127.0.0.1", node.port) for node in sentinel.sentinels],
                     socket_timeout=2)  # fmt: skip
    client: Redis = watch.master_for(sentinel.SERVICE, socket_timeout=2)
    yield client
    await client.aclose()


async def test_the_settings_find_the_primary_through_the_sentinels(
    sentinel: PrivateSentinel,
) -> None:
    settings = load_settings({"WORKER_REDIS_SENTINELS": sentinel.addresses,
                              "WORKER_REDIS_URL": "redis://ignored:1/0"})  # fmt: skip
    redis = await settings.redis()
    try:
        await redis.set("through-sentinel", 1)
        info = await redis.info("server")
        assert int(info["tcp_port"]) == sentinel.primary.port
    finally:
        await redis.aclose()


def test_sentinel_settings_that_would_be_ignored_are_refused() -> None:
    with pytest.raises(SettingsError, match="WORKER_REDIS_SENTINELS: a Redis Cluster has no"):
        load_settings({"WORKER_REDIS_CLUSTER": "yes", "WORKER_REDIS_SENTINELS": "h:26379"})
    chosen = load_settings({"WORKER_REDIS_SENTINEL_SERVICE": "cache",
                            "WORKER_REDIS_SENTINELS": "h:26379"})  # fmt: skip
    assert chosen.redis_sentinel_service == "cache"


@pytest.mark.parametrize("given", ["127.0.0.1:notaport", "http://127.0.0.1:26379",
                                   "redis://:a@h:1,redis://:b@h:2"])  # fmt: skip
def test_bad_sentinel_addresses_are_refused_naming_the_variable(given: str) -> None:
    with pytest.raises(SettingsError, match="WORKER_REDIS_SENTINELS") as refused:
        load_settings({"WORKER_REDIS_SENTINELS": given})
    assert ":a@" not in str(refused.value)  # passwords never shown


async def both_serving(redis: Any, prefix: str, workers: WorkerProcesses) -> None:
    """Until both workers have announced themselves in the deployment record."""
    for _ in range(300):
        fields = await redis.hkeys(f"{prefix}:meta")
        if sum(str(field).find("worker:") >= 0 for field in fields) >= 2:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the workers did not start\n{workers.tail()}")


async def test_workers_follow_the_promoted_replica_and_answer_every_waited_job_once(
    sentinel: PrivateSentinel, primary: Redis, engine: AsyncEngine, database_url: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    prefix = "sentinel"
    await seed_series(engine, ROWS)
    workers = WorkerProcesses({"WORKER_DATABASE_URL": database_url,
                               "WORKER_REDIS_SENTINELS": sentinel.addresses,
                               "WORKER_REDIS_URL": "redis://ignored:1/0",
                               "WORKER_PREFIX": prefix, "WORKER_LEASE_MS": "2000",
                               "WORKER_BLOCK_MS": "500", "WORKER_CONCURRENCY": "4"}, tmp_path)  # fmt: skip
    resent = 0

    async def send(jobs: list[dict[str, Any]]) -> None:
        """XADDs, then WAIT on the same connection: sent once a replica has them."""
        nonlocal resent
        for _ in range(100):
            with contextlib.suppress(RedisError, OSError):
                async with primary.pipeline(transaction=False) as pipe:
                    for job in jobs:
                        pipe.xadd(f"{prefix}:jobs", {"job": json.dumps(job)})
                    pipe.execute_command("WAIT", 1, 1000)
                    if int((await pipe.execute())[-1]) >= 1:
                        return
            resent += 1
            await asyncio.sleep(0.2)
        raise AssertionError("no replica acknowledged the jobs in 100 tries")

    try:
        workers.spawn()
        workers.spawn()
        await both_serving(primary, prefix, workers)
        for number in range(STEPS):
            await send([step(row, number) for row in range(ROWS)])
            await asyncio.sleep(0.05)  # jobs in flight when the primary dies
            if number == STEPS // 2:
                await sentinel.kill_primary()
        answered = await assert_series_applied(
            primary, prefix, engine, rows=ROWS, steps=STEPS, logs=workers.tail
        )
        print(f"sentinel run: {answered} jobs, {resent} batch(es) sent again")
        running = len(workers.alive())
        assert await workers.terminate() == [0] * running, workers.tail()
    finally:
        workers.kill_all()
