"""A group's one-row-by-key updates as a few set-based statements.

Instead of one statement per job (a network round trip on PostgreSQL, a hop to the driver's
thread on SQLite), a group costs one ``WITH v AS (VALUES …) UPDATE … FROM v RETURNING key`` per
round and shape of job. (No locking ``SELECT … FOR UPDATE`` first any more: lanes keep two
concurrent groups off the same order key, see worker/groups.py.)
A round holds each row at most once, and the n-th job on a row goes in round n, so jobs on
the same row still apply in the order they came. Statement sizes are rounded up to a power
of two (padded with rows that match nothing), so only a handful of statements ever exist.
The returned keys tell each job whether its row matched: its rowcount, exactly as its own
UPDATE would have said.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncSession

from worker.job.compiler import Statement, key_update
from worker.job.models import UpdateResult
from worker.job.values import bind_type


async def run_rows(
    session: AsyncSession, statements: Sequence[Statement], *, max_returning: int
) -> list[UpdateResult]:
    """The result of each statement (all with a ``shape``), in the given order."""
    rounds: list[dict[Any, list[int]]] = []  # round -> shape -> statement indexes
    seen: dict[tuple[Any, ...], int] = defaultdict(int)
    for index, statement in enumerate(statements):
        row = _row(statement)
        if seen[row] == len(rounds):
            rounds.append(defaultdict(list))
        rounds[seen[row]][_shape(statement)].append(index)
        seen[row] += 1
    results: list[UpdateResult | None] = [None] * len(statements)
    for shapes in rounds:
        for shape, indexes in shapes.items():
            batch = [statements[index] for index in indexes]
            for index, result in zip(
                indexes, await _update(session, shape, batch, max_returning), strict=True
            ):
                results[index] = result
    return [result for result in results if result is not None]


async def _update(
    session: AsyncSession, shape: tuple[Any, ...], batch: list[Statement], max_returning: int
) -> list[UpdateResult]:
    keys, returning = shape[3], shape[4]
    size = _bucket(len(batch))
    params = {
        f"{name}_{row}": value
        for row, statement in enumerate(batch)
        for name, value in statement.params.items()
    }
    # Rows past the batch are all NULL: a NULL key matches no row.
    params |= {f"{name}_{row}": None for row in range(len(batch), size) for name in batch[0].params}
    found: dict[tuple[Any, ...], RowMapping] = {}
    for updated in (await session.execute(_statement(shape, size), params)).mappings():
        found[tuple(updated[f"_k{index}"] for index in range(len(keys)))] = updated
    results = []
    for statement in batch:
        match = found.get(_row(statement)[1:])
        rows = [] if match is None else [{name: match[name] for name in returning}]
        results.append(
            statement.outcome(len(rows), rows if statement.returns_rows else None,
                              max_returning=max_returning, label=statement.table)
        )  # fmt: skip
    return results


@functools.lru_cache(maxsize=1024)
def _statement(shape: tuple[Any, ...], count: int) -> sa.Update:
    """``UPDATE t SET … FROM (VALUES …) AS v WHERE t.key = v.key RETURNING key, …`` for
    ``count`` jobs of one shape, with the same parameter names as the one-row statement,
    suffixed by the job's position (``s0_3``)."""
    table, sets, incs, keys, returning = shape
    columns = {column.name: column for column in table.columns}
    names = [
        *((f"s{index}", columns[name]) for index, name in enumerate(sets)),
        *((f"i{index}", columns[name]) for index, name in enumerate(incs)),
        *((f"k{index}", columns[name]) for index, name in enumerate(keys)),
    ]
    rows = [
        tuple(sa.bindparam(f"{name}_{row}", type_=bind_type(column)) for name, column in names)
        for row in range(count)
    ]
    # WITH v(s0, k0) AS (VALUES ...): unlike FROM (VALUES ...) AS v(s0, k0), SQLite takes it too.
    values = sa.values(*(sa.column(name, bind_type(column)) for name, column in names), name="v")
    listed = values.data(rows).cte("v")
    return key_update(table, sets, incs, keys, lambda name, _: listed.c[name]).returning(
        *(columns[name].label(f"_k{index}") for index, name in enumerate(keys)),
        *(columns[name] for name in returning),
    )


def _bucket(count: int) -> int:
    """The next power of two: a handful of statement sizes instead of one per group size, so
    SQLAlchemy's compiled cache and asyncpg's prepared statements stay small and warm."""
    return 1 << max(count - 1, 0).bit_length()


def _row(statement: Statement) -> tuple[Any, ...]:
    if statement.row is None:
        raise ValueError("only one-row-by-key statements run in bulk")
    return statement.row


def _shape(statement: Statement) -> tuple[Any, ...]:
    if statement.shape is None:
        raise ValueError("only one-row-by-key statements run in bulk")
    return statement.shape
