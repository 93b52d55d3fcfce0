"""A job's ``where`` filter (DESIGN.md §3) as a SQLAlchemy condition, and the column types the
filter operators and ``inc`` need. Pure: no I/O, and no SQL strings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator

from worker.errors import InvalidJob
from worker.job.filters import AllOf, Compare, Filter, Negate
from worker.job.values import coerce

if TYPE_CHECKING:
    from worker.db.schema import TableRules


def where_condition(node: Filter, rules: TableRules) -> ColumnElement[bool]:
    """A parsed ``where`` as a SQLAlchemy condition on ``rules``' table: every column looked
    up in the schema, every value coerced to its column's type and bound."""
    if isinstance(node, Compare):
        return _compare(rules.column(node.column), node)
    if isinstance(node, Negate):
        return sa.not_(where_condition(node.part, rules))
    parts = [where_condition(part, rules) for part in node.parts]
    return sa.and_(*parts) if isinstance(node, AllOf) else sa.or_(*parts)


def _compare(column: sa.Column[Any], node: Compare) -> ColumnElement[bool]:
    op, value = node.op, node.value
    if op == "is_null":
        return column.is_(None) if value else column.is_not(None)
    if op in ("eq", "neq") and value is None:
        return column.is_(None) if op == "eq" else column.is_not(None)
    if op in ("in", "nin"):
        items = [coerce(column, item) for item in value]
        return column.in_(items) if op == "in" else column.not_in(items)
    if op == "between":
        low, high = value
        return column.between(coerce(column, low), coerce(column, high))
    if op in ("like", "nlike", "ilike", "nilike"):
        if not _is_text(column):
            raise InvalidJob(
                f"`{op}` needs a text column; `{column.table.name}.{column.name}` is {column.type}"
            )
        return {
            "like": column.like,
            "nlike": column.not_like,
            "ilike": column.ilike,
            "nilike": column.not_ilike,
        }[op](value)
    # An explicit bound parameter: `column == False` alone would render the constant `false`.
    bound = sa.bindparam(None, coerce(column, value), type_=column.type)
    comparisons = {
        "eq": column.__eq__,
        "neq": column.__ne__,
        "gt": column.__gt__,
        "gte": column.__ge__,
        "lt": column.__lt__,
        "lte": column.__le__,
    }
    return comparisons[op](bound)


def _base_type(column: sa.Column[Any]) -> sa.types.TypeEngine[Any]:
    column_type = column.type
    return column_type.impl_instance if isinstance(column_type, TypeDecorator) else column_type


def is_numeric(column: sa.Column[Any]) -> bool:
    """Whether ``inc`` may add to ``column``."""
    # Float is no Numeric subclass in SQLAlchemy 2.1 (they share NumericCommon): name all three.
    return isinstance(_base_type(column), sa.Integer | sa.Numeric | sa.Float)


def _is_text(column: sa.Column[Any]) -> bool:
    return isinstance(_base_type(column), sa.String)
