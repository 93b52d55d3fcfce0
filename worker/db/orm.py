"""The unit-of-work path (``WORKER_ORM``): jobs on tables whose mapped classes carry ORM rules
run through the Session, so the rules hold for every write the worker makes.

Core ``UPDATE`` statements bypass what only the unit of work runs: ``@validates`` validators,
``before_update`` / ``after_update`` mapper events, attribute ``set`` events and the
``version_id_col`` counter. On this path a job loads the objects it matches (locked), assigns
the attributes (validators and attribute events run), and flushes (mapper events run, the
version counter is checked and raised), in the same transaction as its ledger row.

- ``inc`` adds to the loaded value: the row is locked from its load to the commit (``SELECT
  ... FOR UPDATE``; SQLite has one writer), so no other writer can change it in between and the
  addition is as atomic as the Core path's ``col = col + n``; a validator sees the new number
  (NULL stays NULL, as in SQL). Assigning the SQL expression ``Model.col + n`` instead would
  show validators an expression and cost one UPDATE statement per row at the flush.
- A validator's exception is a ``data_error`` with its message: permanent, recorded, and the
  transaction (the row) rolled back.
- ``StaleDataError`` (another writer changed a versioned row in between) is transient: the job
  runs again on a fresh load (errors.classify).
- ``expect.max_rows`` (and ``WORKER_MAX_ROWS_DEFAULT``) bound the load itself: at most one
  object past the cap is loaded, to know that the cap was passed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapper

from worker.errors import InvalidValue
from worker.job.plans import OrmUpdate, Statement
from worker.job.replies import UpdateResult

#: ``WORKER_ORM``.
OrmMode = Literal["auto", "always", "never"]


def has_rules(mapper: Mapper[Any]) -> bool:
    """Whether the unit of work does something for this class that a Core UPDATE would not."""
    if mapper.validators or mapper.version_id_col is not None:
        return True
    if mapper.dispatch.before_update or mapper.dispatch.after_update:
        return True
    return any(attribute.dispatch.set for attribute in mapper.class_manager.values())


def routed(mappers: Sequence[Mapper[Any]], mode: OrmMode) -> dict[str, type]:
    """Table (full name) -> the mapped class whose jobs take this path, under ``mode``."""
    if mode == "never":
        return {}
    chosen: dict[str, type] = {}
    for mapper in mappers:
        table = mapper.local_table
        if isinstance(table, sa.Table) and (mode == "always" or has_rules(mapper)):
            chosen[table.fullname] = mapper.class_
    return chosen


async def run(
    session: AsyncSession, statement: Statement, *, max_returning: int, label: str
) -> UpdateResult:
    """Apply one update through the unit of work; its result as the Core path would give it."""
    work = statement.orm
    assert work is not None  # noqa: S101 - the caller routes only such statements here
    mapper: Mapper[Any] = sa.inspect(work.cls)
    names = _attributes(mapper, work)
    query: sa.Select[Any] = sa.select(work.cls).with_for_update()
    if statement.row is not None:  # a key job: its one row
        pairs = zip(mapper.primary_key, statement.row[1:], strict=True)
        query = query.where(*(column == value for column, value in pairs))
    elif work.condition is not None:
        query = query.where(work.condition)
    cap = statement.guards.max_rows
    if cap is not None:
        query = query.limit(cap + 1)  # enough to know the cap was passed
    objects = list((await session.scalars(query)).all())
    if refusal := statement.guards.refusal(len(objects), label=label):
        raise refusal
    for target in objects:
        _assign(target, work, names, label=label)
    await session.flush()
    rows = None
    if work.returning:
        shown = objects[:max_returning]
        for target in shown:  # as stored: onupdate= defaults, triggers, the counter
            await session.refresh(target, [names[name] for name in work.returning])
        rows = [{name: getattr(target, names[name]) for name in work.returning}
                for target in shown]  # fmt: skip
    return statement.outcome(len(objects), rows, max_returning=max_returning, label=label)


async def run_rows(
    session: AsyncSession, statements: Sequence[Statement], *, max_returning: int
) -> list[UpdateResult]:
    """A group's one-row-by-key updates (in the given order): each class's rows loaded in one
    ``SELECT ... WHERE key IN (...) FOR UPDATE``, assigned in order, flushed together. A row a
    later job of the group changes again is flushed first, so that the events and the version
    counter count each job."""
    loaded = await _load_rows(session, statements)
    results: list[UpdateResult] = []
    # A round: statements on distinct rows. A row met again starts the next round, after a
    # flush, so each job's result (``returning`` too) is the row as that job left it.
    round_: list[tuple[Statement, Any]] = []
    for statement in statements:
        work, row = _grouped(statement)
        target = loaded.get(row)
        if refusal := statement.guards.refusal(int(target is not None), label=statement.table):
            raise refusal
        if target is not None and any(seen is target for _, seen in round_):
            results += await _finish(session, round_, max_returning=max_returning)
            round_ = []
        if target is not None:
            _assign(target, work, _attributes(sa.inspect(work.cls), work), label=statement.table)
        round_.append((statement, target))
    return results + await _finish(session, round_, max_returning=max_returning)


async def _finish(
    session: AsyncSession, round_: Sequence[tuple[Statement, Any]], *, max_returning: int
) -> list[UpdateResult]:
    """Flush a round, then each of its statements' results."""
    await session.flush()
    return [await _result(session, statement, target, max_returning=max_returning)
            for statement, target in round_]  # fmt: skip


async def _load_rows(
    session: AsyncSession, statements: Sequence[Statement]
) -> dict[tuple[Any, ...], Any]:
    """Row (table, *key) -> its loaded object, one SELECT per class; missing rows absent."""
    by_class: dict[type, list[tuple[Any, ...]]] = {}
    for statement in statements:
        work, row = _grouped(statement)
        by_class.setdefault(work.cls, []).append(row)
    loaded: dict[tuple[Any, ...], Any] = {}
    for cls, rows in by_class.items():
        mapper: Mapper[Any] = sa.inspect(cls)
        table = rows[0][0]
        if len(mapper.primary_key) == 1:
            where = mapper.primary_key[0].in_([row[1] for row in rows])
        else:
            where = sa.tuple_(*mapper.primary_key).in_([row[1:] for row in rows])
        query: sa.Select[Any] = sa.select(cls).where(where).with_for_update()
        for target in (await session.scalars(query)).all():
            loaded[(table, *mapper.primary_key_from_instance(target))] = target
    return loaded


def _grouped(statement: Statement) -> tuple[OrmUpdate, tuple[Any, ...]]:
    work, row = statement.orm, statement.row
    if work is None or row is None:
        raise TypeError("only one-row-by-key statements of the unit-of-work path are grouped")
    return work, row


async def _result(
    session: AsyncSession, statement: Statement, target: Any, *, max_returning: int
) -> UpdateResult:
    work, _ = _grouped(statement)
    label = statement.table
    if target is None or not work.returning:
        rows: list[dict[str, Any]] | None = [] if work.returning else None
        return statement.outcome(int(target is not None), rows, max_returning=max_returning,
                                 label=label)  # fmt: skip
    names = _attributes(sa.inspect(work.cls), work)
    await session.refresh(target, [names[name] for name in work.returning])
    row = {name: getattr(target, names[name]) for name in work.returning}
    return statement.outcome(1, [row], max_returning=max_returning, label=label)


def _assign(target: Any, work: OrmUpdate, names: Mapping[str, str], *, label: str) -> None:
    for column, value in work.sets.items():
        _set(target, names[column], value, label=label)
    for column, amount in work.incs.items():
        current = getattr(target, names[column])  # locked since its load: see the module
        _set(target, names[column], None if current is None else current + amount, label=label)


def _set(target: Any, attribute: str, value: Any, *, label: str) -> None:
    try:
        setattr(target, attribute, value)
    except Exception as error:  # a validator or a set event refused it: the model's rule
        message = str(error).strip() or type(error).__name__
        raise InvalidValue(f"{label}: {attribute}: {message}") from error


def _attributes(mapper: Mapper[Any], work: OrmUpdate) -> dict[str, str]:
    """Column name -> the mapped attribute that holds it."""
    table = mapper.local_table
    assert isinstance(table, sa.Table)  # noqa: S101 - routed() chose only tables
    wanted = {*work.sets, *work.incs, *work.returning}
    return {name: mapper.get_property_by_column(table.c[name]).key for name in wanted}
