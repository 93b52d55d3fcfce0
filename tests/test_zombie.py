"""A zombie owner (DESIGN.md §11, Fencing): a worker paused with an open transaction past its
lease; another takes over within the bound and applies newer jobs on the key; the first
resumes, rolls back, and serves the partition no more."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import REDIS_URL, eventually
from tests.faults import WorkerProcesses
from tests.test_recovery import qty, row_locked
from worker.client import UpdateClient
from worker.job.replies import Reply
from worker.service.ownership import TAKEOVER_WAIT_S
from worker.stream.deployment import LIVE_S


async def waiting_on_lock(engine: AsyncEngine) -> bool:
    async with engine.connect() as connection:
        found = await connection.execute(sa.text(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'"
        ))  # fmt: skip
        return bool(found.scalar_one())


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)  # SQLite: no bound (README)
async def test_a_paused_owner_is_fenced_and_its_successor_takes_over_within_the_bound(
    engine: AsyncEngine, database_url: str, redis: Redis, prefix: str, tmp_path: Path
) -> None:
    env = {"WORKER_DATABASE_URL": database_url, "WORKER_REDIS_URL": REDIS_URL,
           "WORKER_PREFIX": prefix, "WORKER_LEASE_MS": "1000", "WORKER_PARTITIONS": "2",
           "WORKER_LOCK_TIMEOUT_MS": "30000"}  # fmt: skip
    workers = WorkerProcesses(env, tmp_path)
    first = workers.spawn()
    try:
        async with UpdateClient(REDIS_URL, prefix=prefix) as client:
            warm = await client.update("items", key={"id": 2}, inc={"qty": 1}, timeout=30)
            assert warm.status == "ok"
            async with row_locked(engine, 1):
                old = await client.submit({"id": "old", "table": "items", "key": {"id": 1},
                                           "set": {"qty": 500}})  # fmt: skip
                # The first worker's transaction is open: fence share-locked, waiting on the row.
                await eventually(lambda: waiting_on_lock(engine), timeout=10)
                first.send_signal(signal.SIGSTOP)
                paused = time.monotonic()
                workers.spawn()
                # The successor takes both partitions once the leases run out, ending the
                # paused owner's session after 1 s: the takeover does not wait for it.
                await eventually(lambda: _taken(workers), timeout=15)
                took = time.monotonic() - paused
            newer = await client.submit({"id": "newer", "table": "items", "key": {"id": 1},
                                         "set": {"qty": 600}})  # fmt: skip
            replies = [await client.result(job_id, timeout=30) for job_id in (old, newer)]
            assert first.poll() is None  # still paused all along
            first.send_signal(signal.SIGCONT)
            await asyncio.sleep(2)  # it wakes up, finds itself fenced, and must apply nothing
        assert [(reply.status, reply.rowcount) for reply in replies] == [("ok", 1), ("ok", 1)]
        assert all(_successor(reply, first.pid) for reply in replies)
        # The lease (1 s) or, while the paused worker's heartbeat still looks live, LIVE_S
        # (3 s); then the fence's bound (1 s); and the successor's own start-up (about 1 s).
        assert took < LIVE_S + TAKEOVER_WAIT_S + 2.0
        assert await qty(engine, 1) == 600  # the newest value; the old owner's write rolled back
        async with engine.connect() as connection:
            recorded = await connection.execute(sa.text(
                "SELECT count(*) FROM update_worker_ledger WHERE job_id IN ('old', 'newer')"
            ))  # fmt: skip
            assert recorded.scalar_one() == 2
        assert workers.matches(r"ended (\d+) session\(s\) that held its fence")
        assert await workers.terminate() == [0, 0], workers.tail()
    finally:
        workers.kill_all()


async def _taken(workers: WorkerProcesses) -> bool:
    return len(workers.matches(r"partition (\d+): taken over")) >= 2 + 2  # first's two, then two


def _successor(reply: Reply, paused_pid: int) -> bool:
    return not reply.worker.endswith(f":{paused_pid}")
