"""The exactly-once ledger (DESIGN.md §6): one row per finished job id.

The row is inserted in the same transaction as the job's updates, with ON CONFLICT DO NOTHING:
the insert is the arbiter. When it inserts nothing, another delivery of the same id committed
first, the caller rolls its own work back and replays the stored reply instead.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from worker.db.engine import WRITES

LEDGER_TABLE: Final = "update_worker_ledger"
#: PostgreSQL's default name for the table's primary key, spelled out so that every
#: deployment's table, whoever created it, carries the same one (see worker/db/oneshot.py).
LEDGER_PRIMARY_KEY: Final = f"{LEDGER_TABLE}_pkey"

_metadata = sa.MetaData()
ledger = sa.Table(
    LEDGER_TABLE,
    _metadata,
    sa.Column("job_id", sa.String(200)),
    sa.Column("payload_hash", sa.String(64), nullable=False),
    sa.Column("reply", sa.Text, nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint("job_id", name=LEDGER_PRIMARY_KEY),
    sa.Index(f"ix_{LEDGER_TABLE}_finished_at", "finished_at"),
)


@dataclass(frozen=True, slots=True)
class Entry:
    payload_hash: str
    reply: str
    #: Set by ``find`` (the dashboard's job lookup); the worker's paths leave it out.
    finished_at: dt.datetime | None = None


async def ensure_ledger(connection: AsyncConnection) -> None:
    """Create the ledger table if it is missing.

    Workers starting together may race to create it; losing that race is fine (a savepoint
    keeps the caller's transaction usable), as long as the table is there afterwards.
    """
    try:
        async with connection.begin_nested():
            await connection.run_sync(_metadata.create_all, checkfirst=True)
    except sa.exc.DBAPIError:
        exists = await connection.run_sync(lambda sync: sa.inspect(sync).has_table(LEDGER_TABLE))
        if not exists:
            raise


async def record(session: AsyncSession, *, job_id: str, payload_hash: str, reply: str) -> bool:
    """Insert the ledger row; False when the id is already there."""
    result = await session.execute(
        _insert_once(session.get_bind().dialect.name),
        {"job_id": job_id, "payload_hash": payload_hash, "reply": reply, "finished_at": _now()},
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


async def record_many(session: AsyncSession, rows: list[tuple[str, str, str]]) -> int:
    """Insert ``(job_id, payload_hash, reply)`` rows in one statement; how many went in.

    Fewer than ``len(rows)`` means another transaction recorded one of the ids first.
    """
    if not rows:
        return 0
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        # unnest() of arrays: one SQL text whatever the row count, so one prepared statement.
        job_ids, hashes, replies = (list(column) for column in zip(*rows, strict=True))
        params: Any = {
            "job_ids": job_ids,
            "hashes": hashes,
            "replies": replies,
            "finished_at": _now(),
        }
        # Counted by the command tag ("INSERT 0 n"), not RETURNING: no row per job to fetch.
        done = await session.execute(_insert_unnested(), params)
        return int(done.rowcount)  # type: ignore[attr-defined]
    finished_at = _now()
    params = [
        {
            "job_id": job_id,
            "payload_hash": payload_hash,
            "reply": reply,
            "finished_at": finished_at,
        }
        for job_id, payload_hash, reply in rows
    ]
    # One cached statement, run as SQLAlchemy's "insertmanyvalues" batch.
    inserted = await session.execute(_insert_many(dialect), params)
    return len(inserted.all())


async def lookup_many(session: AsyncSession, job_ids: list[str]) -> dict[str, Entry]:
    """The ledger rows of those ids that have one."""
    if not job_ids:
        return {}
    postgres = session.get_bind().dialect.name == "postgresql"
    statement = _lookup_any() if postgres else _lookup_in()
    return {
        row.job_id: Entry(payload_hash=row.payload_hash, reply=row.reply)
        for row in await session.execute(statement, {"ids": job_ids})
    }


async def lookup(session: AsyncSession, job_id: str) -> Entry | None:
    statement = sa.select(ledger.c.payload_hash, ledger.c.reply).where(ledger.c.job_id == job_id)
    row = (await session.execute(statement)).one_or_none()
    return None if row is None else Entry(payload_hash=row.payload_hash, reply=row.reply)


async def find(engine: AsyncEngine, job_id: str) -> Entry | None:
    """One job's row, read-only, for an operator."""
    columns = (ledger.c.payload_hash, ledger.c.reply, ledger.c.finished_at)
    async with engine.connect() as connection:
        found = await connection.execute(sa.select(*columns).where(ledger.c.job_id == job_id))
        row = found.one_or_none()
    return None if row is None else Entry(row.payload_hash, row.reply, row.finished_at)


@functools.cache
def _insert_once(dialect: str) -> sa.Insert:
    """INSERT ... ON CONFLICT DO NOTHING, built once per dialect: it runs for every job."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return insert(ledger).on_conflict_do_nothing(index_elements=[ledger.c.job_id])


@functools.cache
def _insert_unnested() -> sa.Insert:
    arrays = (
        sa.bindparam("job_ids", type_=postgresql.ARRAY(ledger.c.job_id.type)),
        sa.bindparam("hashes", type_=postgresql.ARRAY(ledger.c.payload_hash.type)),
        sa.bindparam("replies", type_=postgresql.ARRAY(ledger.c.reply.type)),
    )
    rows = sa.func.unnest(*arrays).table_valued("job_id", "payload_hash", "reply").render_derived()
    finished_at = sa.bindparam("finished_at", type_=ledger.c.finished_at.type)
    source = sa.select(rows.c.job_id, rows.c.payload_hash, rows.c.reply, finished_at)
    columns = ["job_id", "payload_hash", "reply", "finished_at"]
    return (
        postgresql.insert(ledger)
        .from_select(columns, source)
        .on_conflict_do_nothing(index_elements=[ledger.c.job_id])
    )


@functools.cache
def _lookup_any() -> sa.Select[Any]:
    ids = sa.bindparam("ids", type_=postgresql.ARRAY(ledger.c.job_id.type))
    return sa.select(ledger.c.job_id, ledger.c.payload_hash, ledger.c.reply).where(
        ledger.c.job_id == sa.any_(ids)
    )


@functools.cache
def _lookup_in() -> sa.Select[Any]:
    ids: sa.BindParameter[list[str]] = sa.bindparam("ids", expanding=True)
    return sa.select(ledger.c.job_id, ledger.c.payload_hash, ledger.c.reply).where(
        ledger.c.job_id.in_(ids)
    )


@functools.cache
def _insert_many(dialect: str) -> sa.Insert:
    return _insert_once(dialect).returning(ledger.c.job_id)


async def prune(engine: AsyncEngine, *, older_than: dt.timedelta, batch: int = 5_000) -> int:
    """Delete the rows of jobs finished more than ``older_than`` ago, ``batch`` rows per
    transaction so no lock is held for long; how many went."""
    cutoff = _now() - older_than
    oldest = sa.select(ledger.c.job_id).where(ledger.c.finished_at < cutoff).limit(batch)
    statement = sa.delete(ledger).where(ledger.c.job_id.in_(oldest.scalar_subquery()))
    removed = 0
    while True:
        # BEGIN IMMEDIATE on SQLite, like the jobs: waits its turn instead of failing busy.
        async with engine.execution_options(**{WRITES: True}).begin() as connection:
            count = int((await connection.execute(statement)).rowcount)
        removed += count
        if count < batch:
            return removed


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
