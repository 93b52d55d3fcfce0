"""Job + schema -> SQLAlchemy UPDATE statements. Pure: no I/O, and no SQL strings.

Every identifier is resolved through :class:`worker.db.schema.TableRules` (exact membership in the
reflected or declared schema) and every value is a bound parameter, already coerced to the
column's type.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.sql.elements import ColumnElement

from worker.errors import InvalidJob, MissingFilter, WorkerError
from worker.job import shapes
from worker.job.conditions import is_numeric, where_condition
from worker.job.models import Expect, Job, UpdateSpec
from worker.job.plans import DEFAULT_POLICY, Guards, OrmUpdate, Plan, Policy, Statement
from worker.job.values import bind_type, coerce

if TYPE_CHECKING:
    from worker.db.schema import Schema, TableRules


def compile_job(job: Job, schema: Schema, policy: Policy = DEFAULT_POLICY) -> Plan:
    """Compile every update of ``job``; a batch's errors name the failing update."""
    statements = []
    for index, spec in enumerate(job.updates):
        try:
            statements.append(compile_update(spec, schema, policy))
        except WorkerError as error:
            if job.batch:
                error.message = f"updates[{index}]: {error.message}"
                error.args = (error.message,)
            raise
    return Plan(tuple(statements))


def compile_update(spec: UpdateSpec, schema: Schema, policy: Policy = DEFAULT_POLICY) -> Statement:
    rules = schema.rules(spec.table)
    if (
        spec.key is not None
        and rules.mapped is None
        and (known := shapes.known(spec, rules, policy)) is not None
    ):
        return known
    if spec.all_rows and not policy.allow_all:
        raise MissingFilter(
            f"`all: true` is refused here (WORKER_ALLOW_ALL=false): give `{spec.table}` a "
            "`where` or a `key`"
        )
    sets = {name: coerce(rules.writable_column(name), value) for name, value in spec.values.items()}
    incs = {}
    for name, amount in spec.inc.items():
        column = rules.writable_column(name)
        if not is_numeric(column):
            raise InvalidJob(
                f"`inc` needs a numeric column; `{spec.table}.{name}` is {column.type}"
            )
        incs[name] = coerce(column, amount)
    returning = tuple(spec.returning or ())
    for name in returning:
        rules.column(name)

    guards = _guards(spec, policy)
    if rules.mapped is not None:
        return _through_orm(spec, rules, guards, sets=sets, incs=incs, returning=returning)
    if spec.key is not None:
        key = _key_values(spec.key, rules)
        keys = rules.primary_key
        shape = (tuple(sorted(sets)), tuple(sorted(incs)), keys, returning)
        params = {
            **{f"s{index}": sets[name] for index, name in enumerate(shape[0])},
            **{f"i{index}": incs[name] for index, name in enumerate(shape[1])},
            **{f"k{index}": key[name] for index, name in enumerate(keys)},
        }
        return shapes.remember(spec, rules, policy, Statement(
            table=spec.table,
            update=_by_key(rules.table, *shape),
            returns_rows=bool(returning),
            # `key` implies max_rows 1; an explicit 0 still holds.
            guards=Guards(
                guards.rows,
                guards.min_rows,
                min(guards.max_rows, 1) if guards.max_rows is not None else 1,
                max_rows_by_policy=guards.max_rows_by_policy and guards.max_rows == 0,
            ),
            row=(spec.table, *(key[name] for name in keys)),
            params=params,
            shape=(rules.table, *shape),
        ))  # fmt: skip

    condition = _condition(spec, rules)
    values: dict[sa.Column[Any], Any] = {
        (column := rules.column(name)): sa.bindparam(None, value, type_=bind_type(column))
        for name, value in sets.items()
    }
    for name, amount in incs.items():
        column = rules.column(name)
        values[column] = column + amount
    update = sa.update(rules.table).values(values)
    if condition is not None:
        update = update.where(condition)
    if returning:
        update = update.returning(*(rules.column(name) for name in returning))
    return Statement(table=spec.table, update=update, returns_rows=bool(returning), guards=guards)


def _through_orm(
    spec: UpdateSpec,
    rules: TableRules,
    guards: Guards,
    *,
    sets: dict[str, Any],
    incs: dict[str, Any],
    returning: tuple[str, ...],
) -> Statement:
    """A statement for the unit-of-work path: the rows to load, and what to assign."""
    assert rules.mapped is not None  # noqa: S101 - the caller checked
    row = condition = None  # a key job is found by its row: (table, *key values)
    if spec.key is not None:
        key = _key_values(spec.key, rules)
        row = (spec.table, *(key[name] for name in rules.primary_key))
        max_rows = min(guards.max_rows, 1) if guards.max_rows is not None else 1
        guards = Guards(guards.rows, guards.min_rows, max_rows,
                        max_rows_by_policy=guards.max_rows_by_policy and max_rows == 0)  # fmt: skip
    else:
        condition = _condition(spec, rules)
    work = OrmUpdate(cls=rules.mapped, condition=condition, sets=sets, incs=incs,
                     returning=returning)  # fmt: skip
    return Statement(table=spec.table, update=_no_update(rules.table),
                     returns_rows=bool(returning), guards=guards, row=row, orm=work)  # fmt: skip


@functools.lru_cache(maxsize=1024)
def _no_update(table: sa.Table) -> sa.Update:
    """The placeholder ``update`` of a unit-of-work statement: never run."""
    return sa.update(table)


def _condition(spec: UpdateSpec, rules: TableRules) -> ColumnElement[bool] | None:
    if spec.where is not None:
        return where_condition(spec.where, rules)
    if spec.all_rows:
        return None
    raise MissingFilter(
        f"an update of `{spec.table}` needs `where` or `key`; "
        'send "all": true to update every row on purpose'
    )


@functools.lru_cache(maxsize=4096)
def _by_key(
    table: sa.Table,
    sets: tuple[str, ...],
    incs: tuple[str, ...],
    keys: tuple[str, ...],
    returning: tuple[str, ...],
) -> sa.Update:
    """The UPDATE of one row by key for one shape of job, built once: its values are bound
    parameters (``s0``, ``i0``, ``k0``, ...), so every job of that shape reuses the statement
    and SQLAlchemy's compiled form of it."""
    update = key_update(
        table, sets, incs, keys, lambda name, column: sa.bindparam(name, type_=bind_type(column))
    )
    if returning:
        by_name = {column.name: column for column in table.columns}
        update = update.returning(*(by_name[name] for name in returning))
    return update


def key_update(
    table: sa.Table,
    sets: tuple[str, ...],
    incs: tuple[str, ...],
    keys: tuple[str, ...],
    value: Callable[[str, sa.Column[Any]], ColumnElement[Any]],
) -> sa.Update:
    """``UPDATE table SET sets, incs WHERE keys`` for one shape of job, each value taken from
    ``value(name, column)`` with names ``s0``, ``i0``, ``k0``, ...: a bound parameter for one
    row, or the column of a VALUES list for many (worker/db/bulk.py)."""
    columns = {column.name: column for column in table.columns}
    assignments: dict[sa.Column[Any], Any] = {
        columns[name]: value(f"s{index}", columns[name]) for index, name in enumerate(sets)
    }
    for index, name in enumerate(incs):
        assignments[columns[name]] = columns[name] + value(f"i{index}", columns[name])
    condition = sa.and_(
        *(columns[name] == value(f"k{index}", columns[name]) for index, name in enumerate(keys))
    )
    return sa.update(table).values(assignments).where(condition)


def _guards(spec: UpdateSpec, policy: Policy) -> Guards:
    expect = spec.expect or Expect()
    max_rows = expect.max_rows
    by_policy = max_rows is None and expect.rows is None and policy.max_rows_default is not None
    if by_policy:  # a job with no cap of its own
        max_rows = policy.max_rows_default
    return Guards(rows=expect.rows, min_rows=expect.min_rows, max_rows=max_rows,
                  max_rows_by_policy=by_policy)  # fmt: skip


def _key_values(key: dict[str, Any], rules: TableRules) -> dict[str, Any]:
    """The key's values, coerced to the columns' types."""
    if set(key) != set(rules.primary_key):
        expected = ", ".join(rules.primary_key) or "(none: the table has no primary key)"
        raise InvalidJob(
            f"`key` must name the whole primary key of `{rules.table.name}`: {expected}"
        )
    values = {}
    for name, value in key.items():
        if value is None:
            raise InvalidJob(f"`key` value for `{name}` cannot be null")
        values[name] = coerce(rules.column(name), value)
    return values
