"""Crash recovery on the real Redis and both databases: takeover claims, fenced reads, poison
entries, deleted entries, transient failures that outlast the retries, deadlocks, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import sqlalchemy as sa
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import WorkerFactory, eventually
from tests.tables import items
from tests.test_service import text
from worker.db.engine import Timeouts, create_engine
from worker.errors import Unavailable
from worker.job.order import derive_order_key, partition_of
from worker.job.replies import Reply
from worker.service.startup import open_worker
from worker.settings import Settings
from worker.stream.names import Names
from worker.stream.reading import Reader

GROUP = "update-workers"


def inc_job(job_id: str, item_id: int = 1) -> dict[str, Any]:
    return {"id": job_id, "table": "items", "key": {"id": item_id}, "inc": {"qty": 1}}


async def qty(engine: AsyncEngine, item_id: int) -> int:
    async with engine.connect() as connection:
        statement = sa.select(items.c.qty).where(items.c.id == item_id)
        return int((await connection.execute(statement)).scalar_one())


async def result(redis: Redis, prefix: str, job_id: str, *, status: str | None = None) -> Reply:
    async def fetch() -> Reply | None:
        data = await redis.get(f"{prefix}:result:{job_id}")
        reply = None if data is None else Reply.model_validate_json(data)
        return reply if reply and status in (None, reply.status) else None

    return await eventually(fetch)


async def dead_letters(redis: Redis, prefix: str) -> list[dict[str, str]]:
    letters: list[Any] = await redis.xrange(f"{prefix}:dead") or []
    return [{text(key): text(value) for key, value in fields.items()} for _, fields in letters]


async def pending_rows(redis: Redis, stream: str, consumer: str | None = None) -> list[Any]:
    return list(await redis.xpending_range(stream, GROUP, "-", "+", 100, consumer))


async def pending(redis: Redis, prefix: str) -> int:
    """Entries pending anywhere: the ingest and every partition."""
    names = Names(prefix)
    total = 0
    for stream in (names.stream, *map(names.partition, range(16))):
        with contextlib.suppress(ResponseError):  # no such stream yet
            total += int((await redis.xpending(stream, GROUP))["pending"])
    return total


def partition_stream(prefix: str, job: dict[str, Any]) -> str:
    order_key = derive_order_key(job)
    assert order_key is not None
    return Names(prefix).partition(partition_of(order_key, 16))


async def orphan(redis: Redis, prefix: str, job: dict[str, Any], *, deliveries: int = 1) -> str:
    """An entry a worker read from its partition and then died holding, as if delivered
    ``deliveries`` times."""
    stream = partition_stream(prefix, job)
    with contextlib.suppress(Exception):  # BUSYGROUP: the group is there already
        await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    entry_id = text(await redis.xadd(stream, {"job": json.dumps(job)}))
    assert await redis.xreadgroup(GROUP, "ghost", {stream: ">"}, count=1)
    if deliveries > 1:
        await redis.xclaim(stream, GROUP, "ghost", 0, [entry_id], retrycount=deliveries)
    return entry_id


@contextlib.asynccontextmanager
async def row_locked(engine: AsyncEngine, item_id: int) -> AsyncIterator[None]:
    """Another transaction holding the row (PostgreSQL) or the write lock (SQLite)."""
    async with engine.connect() as connection, connection.begin():
        await connection.execute(
            sa.update(items).where(items.c.id == item_id).values(qty=items.c.qty)
        )
        yield


async def test_an_entry_a_dead_worker_left_pending_is_claimed_and_applied_once(
    start_worker: WorkerFactory, redis: Redis, prefix: str, engine: AsyncEngine
) -> None:
    await orphan(redis, prefix, inc_job("orphan-1"))
    await start_worker(claim_idle_ms=200)
    reply = await result(redis, prefix, "orphan-1")
    assert (reply.status, reply.replayed, reply.rowcount) == ("ok", False, 1)
    assert await qty(engine, 1) == 11
    assert await eventually(lambda: _is_zero(pending(redis, prefix)))


async def _is_zero(count: Awaitable[int]) -> bool:
    return await count == 0


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_a_slow_job_is_not_taken_from_a_live_owner(
    start_worker: WorkerFactory, redis: Redis, prefix: str, engine: AsyncEngine
) -> None:
    """A worker joins while the owner runs a slow job on a partition that is now assigned to
    the newcomer: the handover waits for the job, which stays with its owner. (PostgreSQL
    only: on SQLite the test's row lock is the whole file's write lock, and no second worker
    could even start under it.)"""
    stream = partition_stream(prefix, inc_job("slow-1"))
    await start_worker(consumer="a-slow", lock_timeout_ms=20_000)
    async with row_locked(engine, 1):
        await redis.xadd(f"{prefix}:jobs", {"job": json.dumps(inc_job("slow-1"))})
        await eventually(lambda: pending_rows(redis, stream, "a-slow"))
        await start_worker(consumer="b-thief")
        await eventually(lambda: _owns(redis, prefix, "b-thief"))  # the rebalance is under way
        [entry] = await pending_rows(redis, stream)
        assert (entry["consumer"], entry["times_delivered"]) == (b"a-slow", 1)
    reply = await result(redis, prefix, "slow-1")
    assert (reply.status, reply.worker, reply.attempts) == ("ok", "a-slow", 1)
    assert await qty(engine, 1) == 11


async def _owns(redis: Redis, prefix: str, consumer: str) -> bool:
    owners = [await redis.get(Names(prefix).owner(number)) for number in range(16)]
    return consumer.encode() in owners


async def test_a_worker_that_lost_its_lease_is_handed_nothing(redis: Redis, prefix: str) -> None:
    """The read that closes the door on a paused old owner: once the lease names another
    worker, XREADGROUP is not even run for the old one."""
    names = Names(prefix)
    stream = names.partition(3)
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    await redis.xadd(stream, {"job": "{}"})
    old = Reader(redis, names, group=GROUP, consumer="old")
    await redis.set(names.owner(3), "new", px=10_000)
    batch = await old.read([3], count=10)
    assert (batch.entries, batch.lost) == ([], [3])
    assert await pending(redis, prefix) == 0  # nothing was handed out
    new = Reader(redis, names, group=GROUP, consumer="new")
    assert [entry.partition for entry in (await new.read([3], count=10)).entries] == [3]


@pytest.mark.parametrize("last_failure", ["none", "unavailable"])
async def test_an_entry_delivered_too_often_is_dead_lettered_with_count_error_and_worker(
    start_worker: WorkerFactory, redis: Redis, prefix: str, engine: AsyncEngine, last_failure: str
) -> None:
    entry_id = await orphan(redis, prefix, inc_job("poison-1"), deliveries=5)
    if last_failure == "unavailable":
        stored = Reply.failure("poison-1", Unavailable("deadlock detected", reason="deadlock"))
        await redis.set(f"{prefix}:result:poison-1", stored.encode())
    await start_worker(consumer="judge", claim_idle_ms=200, max_deliveries=5)
    [letter] = await eventually(lambda: dead_letters(redis, prefix))
    expected = "unavailable" if last_failure == "unavailable" else "internal"
    assert {key: letter[key] for key in ("entry_id", "reason", "deliveries", "worker", "error_code")} == {
        "entry_id": entry_id, "reason": "max_deliveries", "deliveries": "6", "worker": "judge",
        "error_code": expected,
    }  # fmt: skip
    assert json.loads(letter["job"]) == inc_job("poison-1")
    reply = await result(redis, prefix, "poison-1", status="error")
    assert reply.error is not None
    assert (reply.error.code, reply.error.retryable) == (expected, expected == "unavailable")
    assert "gave up after 6 deliveries" in reply.error.message
    if last_failure == "unavailable":
        assert "deadlock detected" in reply.error.message
    assert await qty(engine, 1) == 10  # never run
    assert await pending(redis, prefix) == 0


async def test_an_exhausted_entry_whose_job_did_finish_is_replayed_not_dead_lettered(
    make_settings: Callable[..., Settings], engine: AsyncEngine, redis: Redis, prefix: str
) -> None:
    del engine  # seeded
    settings = make_settings(claim_idle_ms=200)
    await redis.xadd(f"{prefix}:jobs", {"job": json.dumps(inc_job("done-1"))})
    async with open_worker(settings) as worker:
        await worker.run(burst=True)  # applied; now its reply is "lost" and it comes back
    await orphan(redis, prefix, inc_job("done-1"), deliveries=9)
    await redis.delete(f"{prefix}:result:done-1")
    async with open_worker(settings) as worker:
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        reply = await result(redis, prefix, "done-1")
        stop.set()
        await running
    assert (reply.status, reply.replayed) == ("ok", True)
    assert await redis.xlen(f"{prefix}:dead") == 0
    assert await pending(redis, prefix) == 0


async def test_a_pending_entry_whose_data_was_deleted_is_acked_and_recorded(
    start_worker: WorkerFactory, redis: Redis, prefix: str
) -> None:
    entry_id = await orphan(redis, prefix, inc_job("gone-1"))
    await redis.xdel(partition_stream(prefix, inc_job("gone-1")), entry_id)
    await start_worker(claim_idle_ms=200)
    [letter] = await eventually(lambda: dead_letters(redis, prefix))
    assert (letter["entry_id"], letter["reason"]) == (entry_id, "entry_deleted")
    assert await pending(redis, prefix) == 0


async def test_transient_failures_past_the_retries_stay_pending_until_a_later_delivery_succeeds(
    start_worker: WorkerFactory, redis: Redis, prefix: str, engine: AsyncEngine
) -> None:
    await start_worker(claim_idle_ms=300, lock_timeout_ms=100, max_attempts=2)
    async with row_locked(engine, 1):
        await redis.xadd(f"{prefix}:jobs", {"job": json.dumps(inc_job("busy-1"))})
        first = await result(redis, prefix, "busy-1", status="error")
        assert first.error is not None
        assert (first.error.code, first.error.retryable, first.attempts) == ("unavailable", True, 2)
        assert await pending(redis, prefix) == 1  # not acked: a later delivery may still succeed
    later = await result(redis, prefix, "busy-1", status="ok")
    assert (later.rowcount, later.replayed) == (1, False)
    assert await qty(engine, 1) == 11
    assert await eventually(lambda: _is_zero(pending(redis, prefix)))


async def test_a_lock_held_past_the_lock_timeout_is_retried_and_succeeds(
    start_worker: WorkerFactory, redis: Redis, prefix: str, engine: AsyncEngine
) -> None:
    await start_worker(lock_timeout_ms=100, max_attempts=20)
    async with row_locked(engine, 1):
        await redis.xadd(f"{prefix}:jobs", {"job": json.dumps(inc_job("wait-1"))})
        await asyncio.sleep(0.5)  # the point of the test: hold the lock across several tries
    reply = await result(redis, prefix, "wait-1")
    assert reply.status == "ok", reply.error
    assert reply.attempts >= 2
    assert await qty(engine, 1) == 11


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_a_deadlock_with_two_other_transactions_is_retried_and_succeeds(
    start_worker: WorkerFactory, redis: Redis, prefix: str, engine: AsyncEngine
) -> None:
    """worker holds 1 and waits for 2; T1 holds 2 and waits for 3; T2 holds 3 and waits for 1."""
    await start_worker()
    async with engine.connect() as t1, engine.connect() as t2:
        pids = []
        for connection, item_id in ((t1, 2), (t2, 3)):
            await connection.begin()
            # Long enough that the worker's backend (1 s, the default) is the one to detect it.
            await connection.execute(sa.text("SET LOCAL deadlock_timeout = '30s'"))
            await connection.execute(_add(item_id, 100))
            pids.append((await connection.execute(sa.text("SELECT pg_backend_pid()"))).scalar())
        job = {"id": "deadlock-1", "updates": [
            {"table": "items", "key": {"id": 1}, "inc": {"qty": 1}},
            {"table": "items", "key": {"id": 2}, "inc": {"qty": 1}},
        ]}  # fmt: skip
        await redis.xadd(f"{prefix}:jobs", {"job": json.dumps(job)})
        waiting = sa.text(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND pid <> ALL(:pids)"
        ).bindparams(pids=pids)
        await eventually(lambda: _scalar(t1, waiting))
        close_cycle = [
            asyncio.create_task(t1.execute(_add(3, 100))),  # waits for T2
            asyncio.create_task(t2.execute(_add(1, 100))),  # waits for the worker: a cycle
        ]
        await asyncio.wait_for(close_cycle[1], 10)  # the worker was chosen as the victim
        await t2.commit()
        await asyncio.wait_for(close_cycle[0], 10)
        await t1.commit()
    reply = await result(redis, prefix, "deadlock-1")
    assert reply.status == "ok", reply.error
    assert (reply.rowcount, reply.attempts >= 2) == (2, True)
    assert [await qty(engine, item_id) for item_id in (1, 2, 3)] == [
        10 + 100 + 1,
        0 + 100 + 1,
        25 + 100 + 100,
    ]


def _add(item_id: int, amount: int) -> sa.Update:
    return sa.update(items).where(items.c.id == item_id).values(qty=items.c.qty + amount)


async def _scalar(connection: Any, statement: sa.TextClause) -> Any:
    # Run on T1 while it is not blocked: reading pg_locks takes no row locks.
    return (await connection.execute(statement)).scalar()


async def test_connections_carry_the_configured_timeouts(database_url: str, backend: str) -> None:
    engine = create_engine(
        database_url,
        pool_size=1,
        timeouts=Timeouts(statement_ms=1234, lock_ms=567, idle_in_transaction_ms=8901),
    )
    async with engine.connect() as connection:
        if backend == "postgresql":
            shown = [
                (await connection.execute(sa.text(f"SHOW {name}"))).scalar()
                for name in (
                    "statement_timeout",
                    "lock_timeout",
                    "idle_in_transaction_session_timeout",
                )
            ]
            assert shown == ["1234ms", "567ms", "8901ms"]
        else:
            assert (await connection.execute(sa.text("PRAGMA busy_timeout"))).scalar() == 567
            assert (await connection.execute(sa.text("PRAGMA journal_mode"))).scalar() == "wal"
    await engine.dispose()
