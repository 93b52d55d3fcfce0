"""Fencing in the database: generations, the share-locked check, and a bounded takeover."""

from __future__ import annotations

import asyncio
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from tests.tables import items
from worker.db import fencing
from worker.db.engine import WRITES
from worker.errors import Fenced


@pytest.fixture
async def fenced_engine(engine: AsyncEngine) -> AsyncEngine:
    async with engine.begin() as connection:
        await fencing.ensure_partitions(connection, 4)
        await fencing.ensure_partitions(connection, 4)  # a second worker starting: no change
    return engine


async def test_take_raises_the_generation_and_check_tells_stale_from_current(
    fenced_engine: AsyncEngine,
) -> None:
    async with fenced_engine.connect() as connection:
        assert await fencing.generations(connection) == {0: 0, 1: 0, 2: 0, 3: 0}
    assert await fencing.take(fenced_engine, 2, wait_s=1) == 1
    assert await fencing.take(fenced_engine, 2, wait_s=1) == 2
    sessions = async_sessionmaker(fenced_engine.execution_options(**{WRITES: True}))
    async with sessions() as session, session.begin():
        await fencing.check(session, {2: 2, 0: 0})
    async with sessions() as session, session.begin():
        with pytest.raises(Fenced) as raised:
            await fencing.check(session, {2: 1, 0: 0, 3: 7})
    assert raised.value.partitions == [2, 3]


# PostgreSQL only: on SQLite every write transaction waits for the one writer anyway.
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_a_worker_starts_while_another_ones_takeover_is_stalled(
    fenced_engine: AsyncEngine,
) -> None:
    """A takeover raised partition 1's generation and stalls before committing (SIGSTOP). A
    worker starting meanwhile finds every row in place and waits for nothing; before, its
    INSERT ... ON CONFLICT waited on the stalled update until lock_timeout failed the start."""
    async with fenced_engine.connect() as stalled:
        await stalled.execute(
            sa.update(fencing.partitions).where(fencing.partitions.c.partition == 1)
            .values(generation=fencing.partitions.c.generation + 1)
        )  # fmt: skip
        starting = fenced_engine.execution_options(isolation_level="AUTOCOMMIT")
        async with starting.connect() as connection:
            await connection.execute(sa.text("SET lock_timeout = 1000"))
            started = time.monotonic()
            await fencing.ensure_partitions(connection, 4)
            assert time.monotonic() - started < 0.5
            await fencing.ensure_partitions(connection, 6)  # a larger P adds only its rows
            assert await fencing.generations(connection) == {0: 0, 1: 0, 2: 0, 3: 0, 4: 0, 5: 0}
        await stalled.rollback()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_a_takeover_ends_a_paused_owners_transaction_within_the_bound(
    fenced_engine: AsyncEngine,
) -> None:
    """The old owner checked its fence and then stalls with the transaction open (SIGSTOP, a
    GC pause, a cut-off network). The takeover must neither wait for ever nor let it commit."""
    generation = await fencing.take(fenced_engine, 1, wait_s=1)
    sessions = async_sessionmaker(fenced_engine.execution_options(**{WRITES: True}))
    stalled = sessions()
    await stalled.begin()
    await fencing.check(stalled, {1: generation})
    await stalled.execute(sa.update(items).where(items.c.id == 1).values(qty=999))
    started = time.monotonic()
    newer = await fencing.take(fenced_engine, 1, wait_s=0.5)
    took = time.monotonic() - started
    assert newer == generation + 1
    assert 0.5 <= took < 3.0, took
    with pytest.raises(sa.exc.DBAPIError):  # its session was ended: nothing commits
        await stalled.commit()
    await stalled.close()
    async with fenced_engine.connect() as connection:
        assert await connection.scalar(sa.select(items.c.qty).where(items.c.id == 1)) == 10


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_on_sqlite_a_takeover_waits_for_the_open_write_then_fences_it(
    fenced_engine: AsyncEngine,
) -> None:
    generation = await fencing.take(fenced_engine, 1, wait_s=1)
    sessions = async_sessionmaker(fenced_engine.execution_options(**{WRITES: True}))
    async with sessions() as session, session.begin():
        await fencing.check(session, {1: generation})
        taking = asyncio.ensure_future(fencing.take(fenced_engine, 1, wait_s=1))
        await asyncio.sleep(0.2)
        assert not taking.done()  # waits on SQLite's one writer
        await session.execute(sa.update(items).where(items.c.id == 1).values(qty=11))
    assert await taking == generation + 1  # after the old owner's commit, never before
    async with sessions() as session, session.begin():
        with pytest.raises(Fenced):
            await fencing.check(session, {1: generation})
