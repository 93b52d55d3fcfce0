"""A group's one-row-by-key updates as a few set-based statements.

Instead of one statement per job (a network round trip on PostgreSQL, a hop to the driver's
thread on SQLite), a group costs one ``WITH v AS (SELECT … UNION ALL …) UPDATE … FROM v
RETURNING key`` per round and shape of job. Not ``VALUES``: SQLAlchemy cannot cache a VALUES
construct that holds bound parameters, so it compiled that statement again on every call. No
locking ``SELECT … FOR UPDATE`` first: lanes keep two concurrent groups off the same order key
(worker/db/groups.py).
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
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession

from worker.job.compiler import key_update
from worker.job.plans import Statement
from worker.job.replies import UpdateResult
from worker.job.values import bind_type

#: Rows in one statement at most: SQLite allows 500 terms in a compound SELECT.
_MOST_ROWS: Final = 256


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
            for start in range(0, len(indexes), _MOST_ROWS):
                chunk = indexes[start : start + _MOST_ROWS]
                batch = [statements[index] for index in chunk]
                for index, result in zip(
                    chunk, await _update(session, shape, batch, max_returning), strict=True
                ):
                    results[index] = result
    return [result for result in results if result is not None]


async def _update(
    session: AsyncSession, shape: tuple[Any, ...], batch: list[Statement], max_returning: int
) -> list[UpdateResult]:
    keys, returning = shape[3], shape[4]
    update: sa.Update
    params: dict[str, Any]
    if session.get_bind().dialect.name == "postgresql" and _unnestable(shape):
        update = _unnested(shape)
        params = {name: [job.params[name] for job in batch] for name in batch[0].params}
    else:
        size = _bucket(len(batch))
        update = _statement(shape, size)
        params = {
            f"{name}_{row}": value
            for row, job in enumerate(batch)
            for name, value in job.params.items()
        }
        # Rows past the batch are all NULL: a NULL key matches no row.
        params |= {f"{name}_{row}": None for row in range(len(batch), size)
                   for name in batch[0].params}  # fmt: skip
    # Each row returned: the key (_k0, _k1, ...), then the `returning` columns.
    width = len(keys)
    found = {tuple(row[:width]): row for row in await session.execute(update, params)}
    results = []
    for statement in batch:
        match = found.get(_row(statement)[1:])
        rows = [] if match is None else [dict(zip(returning, match[width:], strict=True))]
        results.append(
            statement.outcome(len(rows), rows if statement.returns_rows else None,
                              max_returning=max_returning, label=statement.table)
        )  # fmt: skip
    return results


@functools.lru_cache(maxsize=1024)
def _unnested(shape: tuple[Any, ...]) -> sa.Update:
    """PostgreSQL: ``UPDATE t SET … FROM unnest($1::int[], …) AS v(s0, k0) WHERE …``, one
    array parameter per column: one SQL text for every group size, which PostgreSQL parses and
    plans as cheaply as a one-row UPDATE."""
    table, sets, incs, keys, returning = shape
    columns = {column.name: column for column in table.columns}
    names = _names(shape)
    arrays = (sa.bindparam(name, type_=postgresql.ARRAY(bind_type(column)))
              for name, column in names)  # fmt: skip
    listed = (
        sa.func.unnest(*arrays)
        .table_valued(*(sa.column(name, bind_type(column)) for name, column in names))
        .render_derived(name="v")
    )
    return key_update(table, sets, incs, keys, lambda name, _: listed.c[name]).returning(
        *(columns[name].label(f"_k{index}") for index, name in enumerate(keys)),
        *(columns[name] for name in returning),
    )


def _unnestable(shape: tuple[Any, ...]) -> bool:
    """Whether every column the shape binds has a type whose arrays asyncpg sends as they
    are: plain numbers, text, booleans, dates and times, UUIDs. Others (JSON, enums, arrays,
    custom types) take the UNION ALL form, whose parameters bind one by one."""
    return all(_plain(column.type) for _, column in _names(shape))


def _plain(column_type: sa.types.TypeEngine[Any]) -> bool:
    if isinstance(column_type, sa.types.TypeDecorator | sa.Enum | sa.ARRAY | sa.JSON):
        return False
    return isinstance(column_type, _PLAIN_TYPES)


_PLAIN_TYPES: Final = (sa.Integer, sa.Numeric, sa.String, sa.Boolean, sa.Date, sa.DateTime,
                       sa.Time, sa.Uuid)  # fmt: skip


def _names(shape: tuple[Any, ...]) -> list[tuple[str, sa.Column[Any]]]:
    """The bound names of a shape (``s0``, ``i0``, ``k0``, ...) and their columns."""
    table, sets, incs, keys, _ = shape
    columns = {column.name: column for column in table.columns}
    return [
        *((f"s{index}", columns[name]) for index, name in enumerate(sets)),
        *((f"i{index}", columns[name]) for index, name in enumerate(incs)),
        *((f"k{index}", columns[name]) for index, name in enumerate(keys)),
    ]


@functools.lru_cache(maxsize=1024)
def _statement(shape: tuple[Any, ...], count: int) -> sa.Update:
    """``UPDATE t SET … FROM (VALUES …) AS v WHERE t.key = v.key RETURNING key, …`` for
    ``count`` jobs of one shape, with the same parameter names as the one-row statement,
    suffixed by the job's position (``s0_3``)."""
    table, sets, incs, keys, returning = shape
    columns = {column.name: column for column in table.columns}
    names = _names(shape)
    rows = [
        tuple(sa.bindparam(f"{name}_{row}", type_=bind_type(column)) for name, column in names)
        for row in range(count)
    ]
    listed = sa.union_all(
        *(sa.select(*(param.label(name) for param, (name, _) in zip(row, names, strict=True)))
          for row in rows)
    ).cte("v")  # fmt: skip
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
