"""Faults injected for real: worker processes SIGKILLed over and over, a private Redis (AOF)
crashed and restarted, PostgreSQL backends terminated, and SIGTERM under load. Afterwards
every job must have had exactly one effect: lost 0, doubled 0, nothing left pending.

``FAULT_JOBS`` scales the big run (default 3000); the figures are printed as one JSON line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import eventually
from tests.faults import PrivateRedis, WorkerProcesses
from worker.job.replies import Reply
from worker.ops import admin
from worker.stream.names import Names

pytestmark = pytest.mark.slow

GROUP = "update-workers"
TOTALS = 10
FAULT_JOBS = int(os.environ.get("FAULT_JOBS", "3000"))
fault_metadata = sa.MetaData()
hits = sa.Table(
    "hits",
    fault_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("count", sa.Integer, nullable=False),
)
totals = sa.Table(
    "totals",
    fault_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("count", sa.Integer, nullable=False),
)
#: Ordered series under the faults: each row gets STEPS jobs alternating set and inc, each
#: returning the value after it, which must be what applying them one by one gives.
series = sa.Table(
    "seq",
    fault_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("x", sa.Integer, nullable=False),
)
SERIES_ROWS, STEPS = 20, 40


def series_job(row: int, step: int) -> str:
    change = {"set": {"x": 10 * step}} if step % 2 == 0 else {"inc": {"x": 1}}
    return json.dumps({"id": f"ord-{row}-{step}", "table": "seq", "key": {"id": row}, **change,
                       "returning": ["x"]})  # fmt: skip


def series_value(step: int) -> int:
    return 10 * step if step % 2 == 0 else 10 * (step - 1) + 1


def job(number: int) -> str:
    """Odd: +1 on the job's own row, a single-row job that group commits share. Even: a batch
    of two, the job's own row and a shared, contended total, each in a transaction of its own."""
    own = {"table": "hits", "key": {"id": number}, "inc": {"count": 1}}
    if number % 2:
        return json.dumps({"id": f"job-{number}", **own})
    total = {"table": "totals", "key": {"id": number % TOTALS}, "inc": {"count": 1}}
    return json.dumps({"id": f"job-{number}", "updates": [own, total]})


def batches(jobs: int) -> int:
    """How many of ``jobs`` are batches, each adding 1 to the totals."""
    return (jobs + 1) // 2


@dataclass
class Figures:
    backend: str
    jobs: int
    duplicates_sent: int = 0
    resent_after_redis_errors: int = 0
    kills: int = 0
    redis_restarts: int = 0
    backend_terminations: int = 0
    takeovers: int = 0
    effects_applied: int = 0
    lost: int = 0
    doubled: int = 0
    totals_sum: int = 0
    ledger_rows: int = 0
    ok_replies_stored: int = 0
    replies_seen: int = 0
    entries_reclaimed: int = 0
    database_retries: int = 0
    redis_retries: int = 0
    ordered_jobs: int = 0
    out_of_order: int = 0
    left_pending: int = 0
    left_in_stream: int = 0
    dead_letters: int = 0
    idle_in_transaction: int = 0
    exit_codes: list[int] = field(default_factory=list)
    seconds: float = 0.0


@pytest.fixture
async def fault_db(engine: AsyncEngine) -> AsyncEngine:
    async with engine.begin() as connection:
        await connection.run_sync(fault_metadata.create_all)
    return engine


async def prepare(engine: AsyncEngine, jobs: int) -> None:
    async with engine.begin() as connection:
        await connection.execute(hits.delete())
        await connection.execute(totals.delete())
        await connection.execute(hits.insert(), [{"id": n, "count": 0} for n in range(jobs)])
        await connection.execute(totals.insert(), [{"id": n, "count": 0} for n in range(TOTALS)])
        await connection.execute(series.delete())
        await connection.execute(series.insert(), [{"id": n, "x": 0} for n in range(SERIES_ROWS)])


class Producer:
    """XADDs every job once in paced chunks, re-sends some on purpose, and retries through
    Redis outages (a retried chunk may land twice: more duplicates, which is the point)."""

    def __init__(self, url: str, stream: str, jobs: int, *, duplicate_share: float = 0.1) -> None:
        self.url, self.stream, self.jobs = url, stream, jobs
        self.duplicate_share = duplicate_share
        self.duplicates = 0
        self.resent = 0

    async def run(self, *, seconds: float) -> None:
        rng = random.Random(7)
        numbers = list(range(self.jobs))
        again = rng.sample(numbers, int(self.jobs * self.duplicate_share))
        chunks = [numbers[i : i + 50] for i in range(0, self.jobs, 50)]
        pause = seconds / max(len(chunks), 1)
        async with Redis.from_url(self.url, socket_timeout=5) as redis:
            for index, chunk in enumerate(chunks):
                # Duplicates of earlier jobs ride along with later chunks, some of them at once.
                due = [n for n in again if n < chunk[0] and rng.random() < 0.2]
                for number in due:
                    again.remove(number)
                await self._send(redis, chunk + due)
                self.duplicates += len(due)
                if index % 4 == 0:
                    await asyncio.sleep(pause * 4)
            self.duplicates += len(again)
            await self._send(redis, again)

    async def run_series(self, *, seconds: float) -> None:
        """The ordered series: step by step over every row, paced over ``seconds``."""
        async with Redis.from_url(self.url, socket_timeout=5) as redis:
            for step in range(STEPS):
                await self._send(redis, [series_job(row, step) for row in range(SERIES_ROWS)])
                await asyncio.sleep(seconds / STEPS)

    async def _send(self, redis: Redis, numbers: list[int] | list[str]) -> None:
        tries = 0
        while True:
            try:
                async with redis.pipeline(transaction=False) as pipe:
                    for number in numbers:
                        pipe.xadd(self.stream, {"job": job(number) if isinstance(number, int)
                                                else number})  # fmt: skip
                    await pipe.execute()
            except Exception as error:  # any outage: the restart under test
                tries += 1
                self.resent += len(numbers)
                if tries > 200:
                    raise RuntimeError("redis did not come back") from error
                await asyncio.sleep(0.1)
            else:
                return


class ReplyCounter:
    """Counts the replies published on the channel; reconnects after a Redis restart (replies
    published while it reconnects are missed: the stored result keys are the durable record)."""

    def __init__(self, url: str, channel: str) -> None:
        self.url, self.channel = url, channel
        self.first: dict[str, int] = {}
        self.seen = 0

    async def run(self) -> None:
        while True:
            try:
                async with Redis.from_url(self.url) as redis, redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    async for message in pubsub.listen():
                        if message["type"] != "message":
                            continue
                        reply = Reply.model_validate_json(message["data"])
                        self.seen += 1
                        if reply.status == "ok" and not reply.replayed:
                            self.first[reply.id] = self.first.get(reply.id, 0) + 1
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.1)


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    await server.start()
    yield server
    server.kill()


def worker_env(database_url: str, redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    return {
        "WORKER_DATABASE_URL": database_url,
        "WORKER_REDIS_URL": redis_url,
        "WORKER_PREFIX": prefix,
        "WORKER_TABLES": "hits,totals,seq",
        "WORKER_CLAIM_IDLE_MS": "1000",
        "WORKER_BLOCK_MS": "500",
        "WORKER_LOG_LEVEL": "INFO",
        **extra,
    }


async def terminate_backends(engine: AsyncEngine) -> int:
    return await _count(engine, "count(pg_terminate_backend(pid))")


async def idle_in_transaction(engine: AsyncEngine, backend: str) -> int:
    if backend != "postgresql":
        return 0
    return await _count(engine, "count(*)", "AND state LIKE 'idle in transaction%'")


async def _count(engine: AsyncEngine, what: str, condition: str = "") -> int:
    """``what`` over the other sessions of this test's database (test-only, fixed SQL)."""
    async with engine.connect() as connection:
        found = await connection.execute(sa.text(
            f"SELECT {what} FROM pg_stat_activity "  # noqa: S608 - literals from this module
            f"WHERE datname = current_database() AND pid <> pg_backend_pid() {condition}"
        ))  # fmt: skip
        return int(found.scalar_one())


async def settle(redis: Redis, prefix: str, jobs: int, *, timeout: float) -> None:
    """Wait until every job has an ok reply stored and nothing is pending or unread."""
    deadline = time.monotonic() + timeout
    keys = [f"{prefix}:result:job-{n}" for n in range(jobs)]
    while time.monotonic() < deadline:
        try:
            stored = await redis.mget(keys)
            done = sum(1 for data in stored if data and b'"status":"ok"' in data)
            backlog, _, _ = await admin.backlog(redis, Names(prefix), GROUP, 16)
            if done == jobs and backlog == 0:
                return
        except (OSError, ConnectionError):
            pass
        await asyncio.sleep(0.25)
    missing = [
        (keys[n], data) for n, data in enumerate(stored) if not data or b'"status":"ok"' not in data
    ]
    raise TimeoutError(
        f"not settled after {timeout} s: {done}/{jobs} ok, {backlog} in stream; not ok: {missing[:3]}"
    )


async def settle_series(redis: Redis, prefix: str, *, timeout: float) -> None:
    keys = [
        f"{prefix}:result:ord-{row}-{step}" for row in range(SERIES_ROWS) for step in range(STEPS)
    ]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ConnectionError):
            if all(data and b'"status":"ok"' in data for data in await redis.mget(keys)):
                return
        await asyncio.sleep(0.25)
    stored = await redis.mget(keys)
    missing = [(key, data) for key, data in zip(keys, stored, strict=True)
               if not data or b'"status":"ok"' not in data]  # fmt: skip
    raise TimeoutError(f"the ordered series did not settle: {len(missing)} not ok: {missing[:4]}")


async def measure(figures: Figures, engine: AsyncEngine, redis: Redis, prefix: str) -> None:
    async with engine.connect() as connection:
        counts = list(
            (await connection.execute(sa.select(hits.c.count).order_by(hits.c.id))).scalars()
        )
        figures.totals_sum = int(
            (await connection.execute(sa.select(sa.func.sum(totals.c.count)))).scalar_one()
        )
        figures.ledger_rows = int((await connection.execute(sa.text(
            "SELECT count(*) FROM update_worker_ledger WHERE job_id LIKE 'job-%'"
        ))).scalar_one())  # fmt: skip
    figures.effects_applied = sum(counts)
    figures.lost = sum(1 for count in counts if count == 0)
    figures.doubled = sum(1 for count in counts if count > 1)
    stored = await redis.mget([f"{prefix}:result:job-{n}" for n in range(figures.jobs)])
    figures.ok_replies_stored = sum(
        1 for data in stored if data and Reply.model_validate_json(data).status == "ok"
    )
    # Over the ingest and every partition stream.
    figures.left_in_stream, figures.left_pending, _ = await admin.backlog(
        redis, Names(prefix), GROUP, 16
    )
    figures.dead_letters = int(await redis.xlen(f"{prefix}:dead"))
    keys = [
        f"{prefix}:result:ord-{row}-{step}" for row in range(SERIES_ROWS) for step in range(STEPS)
    ]
    expected = [[{"x": series_value(step)}] for _ in range(SERIES_ROWS) for step in range(STEPS)]
    found = [None if data is None else Reply.model_validate_json(data).returning
             for data in await redis.mget(keys)]  # fmt: skip
    figures.ordered_jobs = len(keys)
    figures.out_of_order = sum(1 for got, want in zip(found, expected, strict=True) if got != want)


@pytest.mark.timeout(120 + FAULT_JOBS // 25)
async def test_sigkill_redis_crash_and_backend_kills_lose_nothing_and_double_nothing(
    fault_db: AsyncEngine, database_url: str, backend: str, private_redis: PrivateRedis,
    prefix: str, tmp_path: Path,
) -> None:  # fmt: skip
    jobs = FAULT_JOBS
    await prepare(fault_db, jobs)
    figures = Figures(backend=backend, jobs=jobs)
    started = time.monotonic()
    workers = WorkerProcesses(worker_env(database_url, private_redis.url, prefix), tmp_path)
    producer = Producer(private_redis.url, f"{prefix}:jobs", jobs)
    counter = ReplyCounter(private_redis.url, f"{prefix}:replies")
    listening = asyncio.create_task(counter.run())
    rng = random.Random(11)
    try:
        slots = [workers.spawn() for _ in range(3)]
        producing = asyncio.create_task(producer.run(seconds=max(6.0, jobs / 400)))
        ordering = asyncio.create_task(producer.run_series(seconds=max(6.0, jobs / 400)))
        # Chaos: a kill every ~0.5 s, two Redis crashes, and (PostgreSQL) backend kills.
        redis_crash_at = {8, 20}
        round_number = 0
        while not producing.done() or round_number < 30:
            round_number += 1
            await asyncio.sleep(rng.uniform(0.3, 0.7))
            victim = rng.randrange(len(slots))
            workers.kill(slots[victim])
            slots[victim] = workers.spawn()
            if round_number in redis_crash_at:
                await private_redis.crash_and_restart()
            if backend == "postgresql" and round_number % 6 == 3:
                figures.backend_terminations += await terminate_backends(fault_db)
        await producing
        await ordering
        async with Redis.from_url(private_redis.url) as redis:
            await settle(redis, prefix, jobs, timeout=60 + jobs / 50)
            await settle_series(redis, prefix, timeout=60)
            figures.idle_in_transaction = await idle_in_transaction(fault_db, backend)
            figures.exit_codes = await workers.terminate()
            await measure(figures, fault_db, redis, prefix)
    except BaseException:
        print(workers.tail())
        raise
    finally:
        listening.cancel()
        workers.kill_all()
    figures.duplicates_sent = producer.duplicates
    figures.resent_after_redis_errors = producer.resent
    figures.kills = workers.kills
    figures.redis_restarts = private_redis.restarts
    figures.replies_seen = counter.seen
    figures.takeovers = len(workers.matches(r"taken over \(generation"))
    figures.entries_reclaimed = sum(map(int, workers.matches(r"generation \d+, (\d+) pending")))
    figures.database_retries = len(workers.matches(r"attempt \d+ of \d+; retrying"))
    figures.redis_retries = len(workers.matches(r"failed \(.*\), try \d+ of|reading jobs failed"))
    figures.seconds = round(time.monotonic() - started, 1)
    print("FAULTS", json.dumps(asdict(figures)))
    assert (figures.lost, figures.doubled, figures.out_of_order) == (0, 0, 0), figures
    assert figures.effects_applied == jobs == figures.ledger_rows
    assert figures.totals_sum == batches(jobs)
    assert figures.ok_replies_stored == jobs
    assert (figures.left_pending, figures.left_in_stream, figures.dead_letters) == (0, 0, 0)
    assert figures.idle_in_transaction == 0
    assert figures.exit_codes
    assert set(figures.exit_codes) == {0}
    assert figures.kills >= 30
    assert figures.entries_reclaimed > 0  # the kills did hit jobs in flight
    assert figures.redis_restarts == 2
    if backend == "postgresql":
        assert figures.backend_terminations > 0
    # Every reply seen first-hand (not a replay) is for a distinct job: applied once.
    assert all(count == 1 for count in counter.first.values()), counter.first


async def _at_least(count: int, stored: Awaitable[list[Any]]) -> bool:
    return sum(1 for data in await stored if data) >= count


@pytest.mark.parametrize("grace", ["10", "0"])
async def test_sigterm_under_load_exits_zero_and_leaves_nothing_half_done(
    fault_db: AsyncEngine, database_url: str, backend: str, private_redis: PrivateRedis,
    prefix: str, tmp_path: Path, grace: str,
) -> None:  # fmt: skip
    jobs = 1500
    await prepare(fault_db, jobs)
    env = worker_env(database_url, private_redis.url, prefix, WORKER_SHUTDOWN_GRACE_S=grace)
    workers = WorkerProcesses(env, tmp_path)
    async with Redis.from_url(private_redis.url) as redis:
        await Producer(private_redis.url, f"{prefix}:jobs", jobs, duplicate_share=0).run(seconds=0)
        workers.spawn()
        keys = [f"{prefix}:result:job-{n}" for n in range(jobs)]
        await eventually(lambda: _at_least(200, redis.mget(keys)), timeout=60)
        codes = await workers.terminate()
        assert codes == [0], workers.tail()
        answered = {n for n, data in enumerate(await redis.mget(keys)) if data}
        pending_ids = [
            row["message_id"]
            for stream in map(Names(prefix).partition, range(16))
            for row in await redis.xpending_range(stream, GROUP, "-", "+", jobs)
        ]
        if grace == "10":
            assert pending_ids == []  # everything in flight finished within the grace period
        async with fault_db.connect() as connection:
            counts = dict(list(await connection.execute(sa.select(hits.c.id, hits.c.count))))
            recorded = set((await connection.execute(sa.text(
                "SELECT job_id FROM update_worker_ledger"
            ))).scalars())  # fmt: skip
            total = (await connection.execute(sa.select(sa.func.sum(totals.c.count)))).scalar()
        assert await idle_in_transaction(fault_db, backend) == 0
        assert set(counts.values()) <= {0, 1}
        # Batches are all or nothing: a batch's own row moved exactly when its total did.
        assert total == sum(count for number, count in counts.items() if number % 2 == 0)
        applied = {n for n, count in counts.items() if count}
        assert answered <= applied
        assert {f"job-{n}" for n in applied} == recorded
        # Applied without a reply only when cut off by the grace period; such entries are
        # still pending and get their reply replayed by the next worker.
        assert len(applied - answered) <= len(pending_ids)
        assert 200 <= len(answered) < jobs
        # Whatever is left, pending or unread, is finished by the next worker exactly once.
        workers.spawn()
        await settle(redis, prefix, jobs, timeout=120)
        assert await workers.terminate() == [0]
        async with fault_db.connect() as connection:
            final = list(
                (await connection.execute(sa.select(hits.c.count).order_by(hits.c.id))).scalars()
            )
        assert final == [1] * jobs


async def test_a_second_signal_exits_at_once_and_leaves_the_running_job_pending(
    fault_db: AsyncEngine, database_url: str, private_redis: PrivateRedis, prefix: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    await prepare(fault_db, 2)
    env = worker_env(database_url, private_redis.url, prefix,
                     WORKER_SHUTDOWN_GRACE_S="60", WORKER_LOCK_TIMEOUT_MS="60000")  # fmt: skip
    workers = WorkerProcesses(env, tmp_path)
    stream = f"{prefix}:jobs"
    async with Redis.from_url(private_redis.url) as redis:
        process = workers.spawn()
        await redis.xadd(stream, {"job": job(0)})
        await eventually(lambda: redis.get(f"{prefix}:result:job-0"), timeout=30)  # worker is up
        async with fault_db.connect() as connection, connection.begin():
            await connection.execute(hits.update().where(hits.c.id == 1).values(count=hits.c.count))
            await redis.xadd(stream, {"job": job(1)})
            await eventually(lambda: _pending_count(redis, stream))  # job-1 waits on the lock
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(1)  # the point: the first signal waits for the running job
            assert process.poll() is None, workers.tail()
            process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(process.wait, 10) == 1
        assert await _pending_count(redis, stream) == 1  # not acked: the next worker gets it
        # The job's own work either rolled back or, on PostgreSQL's one-statement path (which
        # the server finishes once the lock frees, client or not), committed with its ledger
        # row. Either way the next worker answers it, and it is applied exactly once.
        async with fault_db.connect() as connection:
            count = await connection.execute(sa.select(hits.c.count).where(hits.c.id == 1))
            recorded = await connection.execute(
                sa.text("SELECT count(*) FROM update_worker_ledger WHERE job_id = 'job-1'")
            )
            assert (count.scalar(), recorded.scalar()) in {(0, 0), (1, 1)}
        workers.spawn()
        await settle(redis, prefix, 2, timeout=60)
        assert await workers.terminate() == [0]
    async with fault_db.connect() as connection:
        assert (
            await connection.execute(sa.select(hits.c.count).where(hits.c.id == 1))
        ).scalar() == 1


async def _pending_count(redis: Redis, stream: str) -> int:
    """Pending in the partitions of the ingest ``stream``: where job-1 waits, held by the
    worker. Not the ingest's own pending: that is the mover's, for the instant between its
    read and its ack, and waiting on it raced the job's arrival at the worker."""
    names = Names(stream.removesuffix(":jobs"))
    pending = 0
    for number in range(16):
        pending += int((await redis.xpending(names.partition(number), GROUP))["pending"])
    return pending
