"""A lone one-row job on PostgreSQL in one statement: one network round trip instead of four.

A job alone in its unit would otherwise cost BEGIN, UPDATE, the ledger INSERT and COMMIT, each
a round trip. Here the update and the ledger row travel as one statement, run in autocommit::

    WITH applied AS (UPDATE t SET ... WHERE key = ... AND NOT EXISTS (ledger row) RETURNING 1),
         recorded AS (INSERT INTO ledger SELECT id, hash,
                      CASE WHEN EXISTS (SELECT FROM applied) THEN :reply_1 ELSE :reply_0 END, now)
    SELECT count(*) FROM applied

One statement is one transaction, so the effect and its ledger row still commit together or not
at all. The ledger's primary key is still the arbiter: when the id is already there (a
redelivery) or another delivery inserts it concurrently, the INSERT raises a unique violation,
the whole statement (the UPDATE included) rolls back, and the caller replays the stored reply.
Both possible replies are rendered beforehand, since a key update matches 0 or 1 rows.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Mapping
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from worker.db.fencing import partitions
from worker.db.ledger import LEDGER_PRIMARY_KEY, ledger
from worker.errors import Fenced
from worker.job.models import Job
from worker.job.plans import Plan, Statement

#: Execution options of the sessions this path runs in: no BEGIN, no COMMIT; the statement
#: is its own transaction.
AUTOCOMMIT: Final = {"isolation_level": "AUTOCOMMIT"}


def eligible(plan: Plan) -> bool:
    """One statement, of one row by key, returning nothing, and a row count of 1 the guards
    accept: then the statement never has to be rolled back after the fact."""
    if len(plan.statements) != 1:
        return False
    statement = plan.statements[0]
    return (
        statement.row is not None
        and statement.orm is None  # the unit of work's rules need the unit of work
        and not statement.returns_rows
        and statement.guards.violation(1) is None
    )


async def run(
    session: AsyncSession,
    statement: Statement,
    job: Job,
    *,
    replies: tuple[str, ...],
    fences: Mapping[int, int] | None = None,
) -> int:
    """Apply ``statement`` and record ``replies[rowcount]`` under the job's id; the row count.

    Raises the driver's unique violation on the ledger's key when the id is already recorded
    (see :func:`duplicate`); nothing is applied then. With a fence (one partition ->
    generation), the partition's row is read under a share lock in the same statement, and
    nothing is applied or recorded unless it still holds that generation: :class:`Fenced`.
    """
    fence = next(iter((fences or {}).items()), None)
    params = {
        **statement.params,
        "job_id": job.id,
        "payload_hash": job.payload_hash,
        "reply_0": replies[0],
        "reply_1": replies[1],
        "finished_at": dt.datetime.now(dt.UTC),
    }
    if fence is not None:
        params |= {"fence_p": fence[0], "fence_g": fence[1]}
    row = (
        await session.execute(_combined(statement.update, fenced=fence is not None), params)
    ).one()
    if fence is not None and not row.fenced:
        raise Fenced([fence[0]])
    return int(row.applied)


def duplicate(error: BaseException) -> bool:
    """Whether ``error`` is the ledger's primary key refusing an id already recorded."""
    # SQLAlchemy's adapted error carries the SQLSTATE; asyncpg's own, its cause, the constraint.
    orig = getattr(error, "orig", None)
    return any(
        getattr(candidate, "sqlstate", None) == "23505"
        and getattr(candidate, "constraint_name", None) == LEDGER_PRIMARY_KEY
        for candidate in (orig, getattr(orig, "__cause__", None))
    )


@functools.lru_cache(maxsize=4096)
def _combined(update: sa.Update, *, fenced: bool) -> sa.Select[Any]:
    """The one statement for one cached key UPDATE (see ``compiler._by_key``): so one
    compiled form, and one prepared statement per connection, per job shape."""
    job_id = sa.bindparam("job_id", type_=ledger.c.job_id.type)
    guarded = update.where(~sa.exists().where(ledger.c.job_id == job_id))
    fence = None
    if fenced:
        fence = (
            sa.select(partitions.c.partition)
            .where(partitions.c.partition == sa.bindparam("fence_p", type_=sa.Integer),
                   partitions.c.generation == sa.bindparam("fence_g", type_=sa.BigInteger))
            .with_for_update(read=True)
            .cte("fence")
        )  # fmt: skip
        guarded = guarded.where(sa.exists(sa.select(fence.c.partition)))
    applied = guarded.returning(sa.literal(1, sa.Integer).label("one")).cte("applied")
    reply = sa.case(
        (sa.exists(sa.select(applied.c.one)), sa.bindparam("reply_1", type_=ledger.c.reply.type)),
        else_=sa.bindparam("reply_0", type_=ledger.c.reply.type),
    )
    source = sa.select(
        job_id,
        sa.bindparam("payload_hash", type_=ledger.c.payload_hash.type),
        reply,
        sa.bindparam("finished_at", type_=ledger.c.finished_at.type),
    )
    if fence is not None:
        source = source.where(sa.exists(sa.select(fence.c.partition)))
    columns = ["job_id", "payload_hash", "reply", "finished_at"]
    recorded = sa.insert(ledger).from_select(columns, source).cte("recorded")
    count = sa.select(sa.func.count()).select_from(applied).scalar_subquery()
    if fence is None:
        return sa.select(count.label("applied")).add_cte(recorded)
    holds = sa.exists(sa.select(fence.c.partition))
    return sa.select(count.label("applied"), holds.label("fenced")).add_cte(recorded)
