"""Small things a new user met: a dead-letter listing that cut the id the other commands need,
and shorthand values that ignored the column's type."""

from __future__ import annotations

import datetime as dt
import json
import re

import pytest
import sqlalchemy as sa
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import REDIS_URL, WorkerFactory
from tests.tables import items
from tests.test_operate import cli


async def test_dead_list_in_80_columns_shows_whole_ids_and_a_time(
    redis: Redis, prefix: str
) -> None:
    failed_at = dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
    added = await redis.xadd(f"{prefix}:dead", {
        "reason": "max_deliveries", "entry_id": "1700000000000-0", "job_id": "order-1234-paid",
        "failed_at_ms": str(int(failed_at.timestamp() * 1000)), "error_code": "unavailable",
        "error": "database connection lost: " + "x" * 200, "job": "{}",
    })  # fmt: skip
    letter_id = added.decode() if isinstance(added, bytes) else added
    listed = await cli("dead", "list", WORKER_REDIS_URL=REDIS_URL, WORKER_PREFIX=prefix,
                       COLUMNS="80")  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert letter_id in listed.stdout  # whole, on one line
    assert "2026-03-04 05:06:07" in listed.stdout
    assert all(len(line) <= 80 for line in listed.stdout.splitlines())
    shown = await cli("dead", "show", letter_id, WORKER_REDIS_URL=REDIS_URL,
                      WORKER_PREFIX=prefix)  # fmt: skip
    assert json.loads(shown.stdout)["job_id"] == "order-1234-paid"


async def test_shorthand_values_follow_the_column_type(
    start_worker: WorkerFactory, engine: AsyncEngine, database_url: str, prefix: str
) -> None:
    """``--set name=123`` on a text column was data_error; JSON jobs keep the strict rule."""
    await start_worker()
    env = {"WORKER_REDIS_URL": REDIS_URL, "WORKER_DATABASE_URL": database_url,
           "WORKER_PREFIX": prefix}  # fmt: skip
    result = await cli("submit", "--table", "items", "--key", "id=1", "--set", "name=123",
                       "--set", "qty=7", "--set", "tag=true", "--returning", "name", **env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["returning"] == [{"name": "123"}]
    async with engine.connect() as connection:
        row = (await connection.execute(sa.select(items).where(items.c.id == 1))).one()
    assert (row.name, row.qty, row.tag) == ("123", 7, "true")
    cleared = await cli("submit", "--table", "items", "--key", "id=1", "--set", "tag=null", **env)
    assert cleared.returncode == 0, cleared.stderr
    strict = await cli("submit", json.dumps({"table": "items", "key": {"id": 1},
                                             "set": {"name": 123}}), **env)  # fmt: skip
    assert strict.returncode == 1
    assert json.loads(strict.stdout)["error"]["code"] == "data_error"
    async with engine.connect() as connection:
        assert await connection.scalar(sa.select(items.c.tag).where(items.c.id == 1)) is None


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_shorthand_says_when_it_cannot_read_the_column_types(
    database_url: str, prefix: str
) -> None:
    env = {"WORKER_REDIS_URL": REDIS_URL, "WORKER_DATABASE_URL": database_url,
           "WORKER_PREFIX": prefix}  # fmt: skip
    result = await cli("submit", "--table", "nowhere", "--key", "id=1", "--set", "a=1",
                       "--no-wait", **env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.search(r"note: column types of `nowhere` unknown .*values are read as JSON",
                     result.stderr)  # fmt: skip
