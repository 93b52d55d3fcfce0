"""Shared fixtures: both backends through one parametrized fixture, and the real Redis.

- PostgreSQL: one fresh database per test session (dropped afterwards); each test starts from
  an empty ``public`` schema with the seed and test tables.
- SQLite: a fresh file per test.
- Redis: the real server, with a unique key prefix per test, cleaned up by prefix. Never FLUSH*.
A service that does not answer fails the run with a message naming it; nothing is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
import sqlalchemy as sa
from redis.asyncio import Redis
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.tables import seed_all
from worker.db.engine import create_engine
from worker.service.loop import Worker
from worker.service.startup import open_worker
from worker.settings import Settings, load_settings

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
BACKENDS = ["sqlite", "postgresql"]
T = TypeVar("T")


async def eventually(fetch: Callable[[], Awaitable[T | None]], *, timeout: float = 10) -> T:
    """The first truthy value ``fetch()`` returns, polled until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if value := await fetch():
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing from {fetch} after {timeout} s")
        await asyncio.sleep(0.02)


def _asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of its own for this test session, dropped at the end."""
    name = f"update_worker_test_{uuid.uuid4().hex[:10]}"
    admin = _asyncpg_dsn(POSTGRES_URL)

    async def run(sql: str) -> None:
        try:
            connection = await asyncpg.connect(admin, timeout=10)
        except (OSError, asyncpg.PostgresError) as error:
            pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_URL}: {error}", pytrace=False)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(run(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
async def engine(database_url: str, backend: str) -> AsyncIterator[AsyncEngine]:
    """An engine on a freshly seeded database (seed tables plus the test tables)."""
    engine = create_engine(database_url, pool_size=5)
    async with engine.begin() as connection:
        if backend == "postgresql":
            await connection.execute(sa.text("DROP SCHEMA public CASCADE"))
            await connection.execute(sa.text("CREATE SCHEMA public"))
        await seed_all(connection)
    yield engine
    await engine.dispose()


@pytest.fixture
def redis_url() -> str:
    """The Redis a test runs against: the shared one, unless its module says otherwise (the
    cluster tests run some tests of other modules on a cluster of their own)."""
    return REDIS_URL


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        await client.ping()
    except (OSError, ConnectionError) as error:
        pytest.fail(f"Redis is not reachable at {redis_url}: {error}", pytrace=False)
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(redis: Redis) -> AsyncIterator[str]:
    """A Redis name prefix of this test's own; its keys are deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    keys = [key async for key in redis.scan_iter(match=f"{name}:*", count=1000)]
    keys += [f"{{{name}:jobs}}:mover", f"{{{name}:jobs}}:mover-generation"]  # the ingest's slot
    if keys:
        await redis.delete(*keys)


@pytest.fixture
def make_settings(database_url: str, prefix: str, redis_url: str) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        flags = {
            "database_url": database_url,
            "redis_url": redis_url,
            "prefix": prefix,
            "block_ms": 200,
            "shutdown_grace_s": 5,
            **overrides,
        }
        return load_settings({}, flags)

    return make


WorkerFactory = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def start_worker(
    engine: AsyncEngine, make_settings: Callable[..., Settings]
) -> AsyncIterator[WorkerFactory]:
    """Starts in-process workers on the seeded database; all are stopped at teardown."""
    del engine  # the tables must exist before the worker reflects them
    stack = contextlib.AsyncExitStack()
    runs: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def start(**overrides: Any) -> Worker:
        worker = await stack.enter_async_context(open_worker(make_settings(**overrides)))
        stop = asyncio.Event()
        runs.append((stop, asyncio.create_task(worker.run(stop))))
        # Serving once its first ownership tick took its share of the partitions.
        await asyncio.wait_for(worker.ownership.settled.wait(), 30)
        return worker

    yield start
    for stop, _ in runs:
        stop.set()
    tasks = {task for _, task in runs}
    if tasks:
        _, late = await asyncio.wait(tasks, timeout=20)
        if late:
            _dump_tasks()
            pytest.fail("a worker did not stop within 20 s of its stop event")
    closing = asyncio.ensure_future(stack.aclose())
    done, _ = await asyncio.wait({closing}, timeout=30)
    if not done:
        _dump_tasks()
        pytest.fail("closing the workers' connections took over 30 s")
    closing.result()


def _dump_tasks() -> None:
    """Where a hang is: every task's stack, on stderr."""
    for running in asyncio.all_tasks():
        print(f"task {running.get_name()}:", file=sys.stderr)
        running.print_stack(file=sys.stderr)
