"""Lanes and owners at work: a job held up holds up its own order key only; partitions spread
over the live workers and move on SIGTERM and SIGKILL (DESIGN.md §11)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import REDIS_URL, WorkerFactory, eventually
from tests.faults import WorkerProcesses
from tests.test_faults import ReplyCounter
from tests.test_recovery import dead_letters, qty, row_locked
from worker.client import UpdateClient
from worker.stream.names import Names, text


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)  # SQLite: one lock for all
async def test_a_held_up_job_blocks_its_own_lane_only_then_is_dead_lettered(
    start_worker: WorkerFactory, redis: Redis, prefix: str, engine: AsyncEngine
) -> None:
    """One partition, three jobs: A on row 1 waits on a row lock the test holds, B is also on
    row 1 (same order key), C on row 2. C goes on; B waits behind A; A is retried in rounds
    and dead-lettered after WORKER_MAX_DELIVERIES; then B runs."""
    await start_worker(partitions=1, lock_timeout_ms=100, max_attempts=2, max_deliveries=3,
                       claim_idle_ms=300)  # fmt: skip
    async with UpdateClient(REDIS_URL, prefix=prefix) as client:
        async with row_locked(engine, 1):
            ids = await client.submit_many([
                {"id": "a", "table": "items", "key": {"id": 1}, "inc": {"qty": 100}},
                {"id": "b", "table": "items", "key": {"id": 1}, "inc": {"qty": 1}},
                {"id": "c", "table": "items", "key": {"id": 2}, "inc": {"qty": 1}},
            ])  # fmt: skip
            assert (await client.result(ids[2], timeout=10)).status == "ok"  # C went on
            [letter] = await eventually(lambda: dead_letters(redis, prefix), timeout=20)
            assert (letter["job_id"], letter["reason"]) == ("a", "max_deliveries")
            assert letter["error_code"] == "unavailable"
            assert await redis.get(f"{prefix}:result:b") is None  # B has not run: its lane
        b = await client.result(ids[1], timeout=10)
    assert (b.status, b.rowcount) == ("ok", 1)
    assert (await qty(engine, 1), await qty(engine, 2)) == (10 + 1, 0 + 1)


def owners(values: list[Any]) -> Counter[str]:
    return Counter(text(value) for value in values if value is not None)


async def test_partitions_spread_and_move_on_sigterm_and_sigkill(
    engine: AsyncEngine, database_url: str, redis: Redis, prefix: str, tmp_path: Path
) -> None:
    del engine  # seeded
    names = Names(prefix)
    keys = [names.owner(number) for number in range(16)]
    workers = WorkerProcesses({"WORKER_DATABASE_URL": database_url, "WORKER_REDIS_URL": REDIS_URL,
                               "WORKER_PREFIX": prefix, "WORKER_LEASE_MS": "4000"}, tmp_path)  # fmt: skip
    counter = ReplyCounter(REDIS_URL, f"{prefix}:replies")
    listening = asyncio.create_task(counter.run())

    async def spread(count: int) -> Counter[str] | None:
        held = owners(await redis.mget(keys))
        if sum(held.values()) == 16 and len(held) == count:
            return held
        return None

    try:
        first = workers.spawn()
        assert (await eventually(lambda: spread(1), timeout=30))[f"{_host()}:{first.pid}"] == 16
        workers.spawn()
        workers.spawn()
        held = await eventually(lambda: spread(3), timeout=10)
        assert sorted(held.values()) == [5, 5, 6]
        async with UpdateClient(REDIS_URL, prefix=prefix) as client:
            jobs = [{"id": f"m{n}", "table": "items", "key": {"id": 1 + n % 4}, "inc": {"qty": 1},
                     "reply_to": f"{prefix}:replies"} for n in range(300)]  # fmt: skip
            sending = asyncio.create_task(_send_slowly(client, jobs))
            victim = workers.alive()[0]
            moved_from = f"{_host()}:{victim.pid}"
            victim.terminate()
            started = time.monotonic()
            held = await eventually(lambda: spread(2), timeout=10)
            assert time.monotonic() - started < 2.0  # SIGTERM: handed over at once
            assert moved_from not in held
            # Not the victim: it may still be closing its pools, and so still alive.
            killed = next(process for process in workers.alive() if process is not victim)
            gone = f"{_host()}:{killed.pid}"
            workers.kill(killed)
            started = time.monotonic()
            held = await eventually(lambda: spread(1), timeout=10)
            assert time.monotonic() - started < 4.0 + 1.0  # SIGKILL: the lease, plus a second
            assert gone not in held
            await sending
            for job in jobs:
                reply = await client.result(str(job["id"]), timeout=30)
                assert reply.status == "ok", reply
        # No job answered first-hand twice (a replayed reply is no second answer).
        assert counter.first
        assert max(counter.first.values()) == 1, counter.first
    finally:
        listening.cancel()
        await workers.terminate()
        workers.kill_all()


async def _send_slowly(client: UpdateClient, jobs: list[dict[str, Any]]) -> None:
    for start in range(0, len(jobs), 10):
        await client.submit_many(jobs[start : start + 10])
        await asyncio.sleep(0.02)


def _host() -> str:
    return socket.gethostname()
