"""Workers started together on a fresh database all start: the first creates the ledger and
the others wait for it, never "database is locked" (SQLite) or a duplicate table (PostgreSQL).

On SQLite the race was real: a start-up that read the schema in a deferred transaction, then
created the ledger after another worker had, failed at once on its stale snapshot (4 of 20
starts, 4 at a time, before the fix). Each round here is a fresh database."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import REDIS_URL
from tests.faults import WorkerProcesses

ROUNDS, AT_ONCE = 6, 6


async def _start_together(database_url: str, prefix: str, logs: Path) -> WorkerProcesses:
    await asyncio.to_thread(logs.mkdir)
    workers = WorkerProcesses({"WORKER_DATABASE_URL": database_url, "WORKER_REDIS_URL": REDIS_URL,
                               "WORKER_PREFIX": prefix}, logs)  # fmt: skip
    for _ in range(AT_ONCE):
        workers.spawn()
    deadline = time.monotonic() + 60
    while (
        len(workers.matches(r"worker \S+ ready"))
        + sum(process.poll() is not None for process in workers.spawned)
        < AT_ONCE
    ):
        assert time.monotonic() < deadline, workers.tail()
        await asyncio.sleep(0.1)
    return workers


async def _all_start(database_url: str, prefix: str, logs: Path) -> None:
    """Start AT_ONCE workers together: none may have exited; then stop them."""
    workers = await _start_together(database_url, prefix, logs)
    try:
        failed = [process for process in workers.spawned if process.poll() is not None]
        assert failed == [], workers.tail()
    finally:
        await workers.terminate()
        workers.kill_all()


async def test_workers_starting_together_on_a_fresh_sqlite_file_all_start(
    tmp_path: Path, prefix: str
) -> None:
    for round_ in range(ROUNDS):
        url = f"sqlite+aiosqlite:///{tmp_path / f'fresh-{round_}.db'}"
        await _all_start(url, f"{prefix}-{round_}", tmp_path / f"logs-{round_}")


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_workers_starting_together_on_postgresql_all_start(
    engine: AsyncEngine, database_url: str, prefix: str, tmp_path: Path
) -> None:
    del engine  # a fresh schema with the seed tables; the ledger is the workers' to make
    await _all_start(database_url, prefix, tmp_path / "logs")
