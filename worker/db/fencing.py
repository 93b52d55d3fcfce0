"""Fencing in the database (DESIGN.md §11): a paused or cut-off old owner of a partition never
commits after its new owner has committed anything.

``update_worker_partitions (partition, generation)`` holds each partition's current owner
generation. Every transaction that applies a job reads its partitions' rows under a share lock
(``FOR SHARE`` on PostgreSQL; SQLite's write lock serializes everything anyway) and goes on
only if each generation is still the one its worker holds. A takeover raises the generation
under the row's exclusive lock, which waits for the old owner's open transactions to end; on
PostgreSQL it waits at most ``wait_s``, then ends the sessions that block it (a paused owner's
open transaction), so a takeover is bounded. SQLite has no second session to end: there a
takeover waits for the paused process's transaction, as every other writer does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Mapping
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from worker.db import ledger
from worker.db.engine import WRITES
from worker.errors import Fenced

log = logging.getLogger(__name__)

PARTITIONS_TABLE: Final = "update_worker_partitions"

_metadata = sa.MetaData()
partitions = sa.Table(
    PARTITIONS_TABLE,
    _metadata,
    sa.Column("partition", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("generation", sa.BigInteger, nullable=False),
)


async def ensure_partitions(connection: AsyncConnection, count: int) -> None:
    """Create the table and a row for each of ``count`` partitions, where missing.

    Workers starting together may race here; a savepoint keeps the caller's transaction usable.
    Only missing rows are inserted: an INSERT that meets an existing row waits for any
    transaction updating it, so a worker starting while another one's takeover stalls (a
    SIGSTOP between raising a generation and committing) would wait for that takeover too.
    """
    try:
        async with connection.begin_nested():
            await connection.run_sync(_metadata.create_all, checkfirst=True)
    except sa.exc.DBAPIError:
        exists = await connection.run_sync(
            lambda sync: sa.inspect(sync).has_table(PARTITIONS_TABLE)
        )
        if not exists:
            raise
    present = set((await connection.execute(sa.select(partitions.c.partition))).scalars())
    if missing := [number for number in range(count) if number not in present]:
        insert = postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert
        rows = [{"partition": number, "generation": 0} for number in missing]
        await connection.execute(insert(partitions).on_conflict_do_nothing(), rows)


async def generations(connection: AsyncConnection) -> dict[int, int]:
    rows = await connection.execute(sa.select(partitions.c.partition, partitions.c.generation))
    return {row.partition: row.generation for row in rows}


async def take(engine: AsyncEngine, partition: int, *, wait_s: float) -> int:
    """Raise ``partition``'s generation and return the new one: from now on, transactions
    of older generations find themselves fenced. Waits for the old owner's open transactions:
    on PostgreSQL at most ``wait_s``, then their sessions are ended."""
    writes = engine.execution_options(**{WRITES: True})
    if engine.dialect.name != "postgresql":
        async with writes.begin() as connection:
            return int((await connection.execute(_raise(), {"p": partition})).scalar_one())
    async with writes.connect() as taker, taker.begin():
        pid = (await taker.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
        raising = asyncio.ensure_future(taker.execute(_raise(), {"p": partition}))
        try:
            done, _ = await asyncio.wait({raising}, timeout=wait_s)
            if not done:
                ended = await _end_blockers(engine, pid)
                log.warning("partition %d: ended %d session(s) that held its fence past "
                            "%.1f s (a paused or cut-off old owner)", partition, ended,
                            wait_s)  # fmt: skip
            return int((await raising).scalar_one())
        finally:
            if not raising.done():  # cancelled: never leave the statement running on its own
                raising.cancel()
                await asyncio.wait({raising})


async def _end_blockers(engine: AsyncEngine, pid: int) -> int:
    """End the sessions ``pid`` waits on (a takeover waits only on fence checks)."""
    async with engine.connect() as other:
        ended = await other.execute(
            sa.text("SELECT count(pg_terminate_backend(b)) FROM unnest(pg_blocking_pids(:pid)) b"),
            {"pid": pid},
        )
        with contextlib.suppress(Exception):
            await other.commit()
        return int(ended.scalar_one())


async def check(session: AsyncSession, fences: Mapping[int, int]) -> None:
    """Inside a job's transaction: raise :class:`Fenced` unless every partition in
    ``fences`` (partition -> generation) still has that generation; the rows stay share-locked
    until the transaction ends, so no takeover completes in between."""
    if not fences:
        return
    postgres = session.get_bind().dialect.name == "postgresql"
    rows = await session.execute(_read(postgres), {"ps": sorted(fences)})
    current = {row.partition: row.generation for row in rows}
    if stale := sorted(p for p, generation in fences.items() if current.get(p) != generation):
        raise Fenced(stale)


async def check_and_look_up(
    session: AsyncSession, fences: Mapping[int, int], job_ids: list[str]
) -> dict[str, ledger.Entry]:
    """:func:`check` and :func:`ledger.lookup_many` in one statement (one round trip, or
    one hop to SQLite's thread): the ledger rows of ``job_ids`` that have one."""
    if not fences:
        return await ledger.lookup_many(session, job_ids)
    postgres = session.get_bind().dialect.name == "postgresql"
    rows = await session.execute(_read_with_ledger(postgres), {"ps": sorted(fences),
                                                                "ids": job_ids})  # fmt: skip
    found: dict[str, ledger.Entry] = {}
    current: dict[int, int] = {}
    for row in rows:
        if row.job_id is None:  # a fence row: partition and generation, as text
            current[int(row.payload_hash)] = int(row.reply)
        else:
            found[row.job_id] = ledger.Entry(payload_hash=row.payload_hash, reply=row.reply)
    if stale := sorted(p for p, generation in fences.items() if current.get(p) != generation):
        raise Fenced(stale)
    return found


@functools.cache
def _read_with_ledger(postgres: bool) -> sa.CompoundSelect[Any]:
    """``WITH fence AS (SELECT … FOR SHARE) SELECT <ledger rows> UNION ALL SELECT <fence
    rows>``: FOR SHARE may not stand in a UNION itself, but may in a WITH."""
    fence = _read(postgres).cte("fence")
    ledger_rows = ledger.ledger
    if postgres:
        ids: Any = sa.bindparam("ids", type_=postgresql.ARRAY(ledger_rows.c.job_id.type))
        known = ledger_rows.c.job_id == sa.any_(ids)
    else:
        known = ledger_rows.c.job_id.in_(sa.bindparam("ids", expanding=True))
    return sa.union_all(
        sa.select(ledger_rows.c.job_id, ledger_rows.c.payload_hash, ledger_rows.c.reply).where(
            known
        ),
        sa.select(
            sa.null().label("job_id"),
            sa.cast(fence.c.partition, sa.String).label("payload_hash"),
            sa.cast(fence.c.generation, sa.Text).label("reply"),
        ),
    )


@functools.cache
def _raise() -> sa.Update:
    return (
        sa.update(partitions)
        .where(partitions.c.partition == sa.bindparam("p"))
        .values(generation=partitions.c.generation + 1)
        .returning(partitions.c.generation)
    )


@functools.cache
def _read(postgres: bool) -> sa.Select[Any]:
    ps: sa.BindParameter[list[int]] = sa.bindparam("ps", expanding=True)
    query = sa.select(partitions.c.partition, partitions.c.generation).where(
        partitions.c.partition.in_(ps)
    )
    return query.with_for_update(read=True) if postgres else query
