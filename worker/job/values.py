"""JSON values in and out of columns (DESIGN.md §3 "Values and types").

In: a JSON value is coerced to the column's Python type before it is bound, because asyncpg
refuses a ``str`` for a DATE or a ``float`` for a NUMERIC, and SQLite would store it as given.
Out: a value read back through RETURNING becomes JSON the same way on both backends.
"""

from __future__ import annotations

import base64
import binascii
import copy
import datetime as dt
import enum
import functools
import math
import uuid
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator

from worker.errors import InvalidValue


def coerce(column: sa.Column[Any], value: Any) -> Any:
    """Return ``value`` as the Python object that ``column``'s type binds.

    Raises :class:`InvalidValue` (``data_error``) naming the column when it cannot be done.
    """
    return coercer(column)(value)


@functools.lru_cache(maxsize=4096)
def coercer(column: sa.Column[Any]) -> Callable[[Any], Any]:
    """:func:`coerce` for one column, its type looked at once, not for every value (a
    column hashes by identity: the reflected schema's columns live as long as the worker)."""
    column_type = column.type
    if isinstance(column_type, TypeDecorator | sa.JSON | sa.ARRAY):
        # A TypeDecorator's process_bind_param owns the conversion; JSON stays as it is.
        return _as_given
    try:
        python_type = column_type.python_type
    except NotImplementedError:
        return _as_given  # a type SQLAlchemy cannot describe (NullType): bind as given
    if issubclass(python_type, enum.Enum):
        return functools.partial(_enum_or_none, column, python_type)
    convert = _CONVERTERS.get(python_type)
    if convert is None:
        return _as_given
    fits = isinstance(column_type, sa.Numeric | sa.DateTime | sa.Time)  # _fitted may change it

    def coerce_value(value: Any) -> Any:
        if value is None:
            return None
        try:
            converted = convert(value)
            return _fitted(column_type, converted) if fits else converted
        except (TypeError, ValueError, ArithmeticError, binascii.Error) as error:
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            detail = f" ({error})" if str(error) else ""
            raise InvalidValue(
                f"column `{column.table.name}.{column.name}`: {shown} is not a valid "
                f"{python_type.__name__}{detail}"
            ) from None

    return coerce_value


def _as_given(value: Any) -> Any:
    return value


def _enum_or_none(column: sa.Column[Any], enum_type: type[enum.Enum], value: Any) -> Any:
    return None if value is None else _to_enum(column, enum_type, value)


def bind_type(column: sa.Column[Any]) -> sa.types.TypeEngine[Any]:
    """The type to bind a value for ``column`` with: its own, except that a JSON column binds
    Python ``None`` as SQL NULL (DESIGN.md §2: ``null`` sets NULL), not as the JSON ``null``."""
    column_type = column.type
    if isinstance(column_type, sa.JSON) and not column_type.none_as_null:
        nullable = copy.copy(column_type)
        nullable.none_as_null = True
        return nullable
    return column_type


def _fitted(column_type: sa.types.TypeEngine[Any], value: Any) -> Any:
    """``value`` as the column stores it, the same on both backends:

    - NUMERIC(p, s): rounded to s decimals, half away from zero as PostgreSQL rounds (SQLite
      would store 12.345 in a NUMERIC(10, 2) as it is); a value with more than p - s integer
      digits is refused, as PostgreSQL refuses it (SQLite would store it).
    - date-times and times with an offset: converted to UTC. A column without a time zone
      takes the UTC wall-clock time; one with a time zone takes a value without an offset as
      UTC. (SQLite stores no offset, and asyncpg refuses an aware value for a plain
      ``timestamp``.)
    """
    if isinstance(value, Decimal) and isinstance(column_type, sa.Numeric):
        return _to_scale(value, column_type.precision, column_type.scale)
    if isinstance(value, dt.datetime) and isinstance(column_type, sa.DateTime):
        utc = value if value.tzinfo is None else value.astimezone(dt.UTC)
        if column_type.timezone:
            return utc.replace(tzinfo=dt.UTC)
        return utc.replace(tzinfo=None)
    if isinstance(value, dt.time) and isinstance(column_type, sa.Time) and value.tzinfo:
        moment = dt.datetime.combine(dt.date(2000, 1, 1), value).astimezone(dt.UTC).timetz()
        return moment if column_type.timezone else moment.replace(tzinfo=None)
    return value


def _to_scale(value: Decimal, precision: int | None, scale: int | None) -> Decimal:
    if scale is not None:
        value = value.quantize(Decimal(1).scaleb(-scale), rounding=ROUND_HALF_UP)
    if precision is not None:
        digits = len(value.as_tuple().digits) + min(int(value.as_tuple().exponent), 0)
        if value and digits > precision - (scale or 0):
            raise ValueError(f"more than {precision - (scale or 0)} digits before the point "
                             f"do not fit NUMERIC({precision}, {scale or 0})")  # fmt: skip
    return value


def to_json(value: Any) -> Any:
    """A value read from the database, as JSON (identical for both backends)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return _decimal_text(value)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, dict):
        return {str(key): to_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(item) for item in value]
    return str(value)


def _decimal_text(value: Decimal) -> str:
    # SQLite hands NUMERIC back with a fixed scale (12.2000000000) and PostgreSQL as stored
    # (12.2): normalizing gives both the same exact text, never in exponent form.
    if not value.is_finite():
        return str(value)
    return format(value.normalize(), "f")


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("a boolean is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise TypeError("expected an integer")


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("expected a number")
    return float(value)


def _to_decimal(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError("expected a number or a numeric string")
    number = Decimal(str(value))
    if not number.is_finite():
        raise InvalidOperation("not a finite number")
    return number


def _to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _to_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("expected true or false")
    return value


def _from_iso(parse: Callable[[str], Any]) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        return parse(_to_str(value))

    return convert


def _to_timedelta(value: Any) -> dt.timedelta:
    return dt.timedelta(seconds=_to_float(value))


def _to_uuid(value: Any) -> uuid.UUID:
    return uuid.UUID(_to_str(value))


def _to_bytes(value: Any) -> bytes:
    return base64.b64decode(_to_str(value), validate=True)


def _to_enum(column: sa.Column[Any], enum_type: type[enum.Enum], value: Any) -> enum.Enum:
    if isinstance(value, str) and value in enum_type.__members__:
        return enum_type[value]
    allowed = ", ".join(enum_type.__members__)
    raise InvalidValue(
        f"column `{column.table.name}.{column.name}`: {value!r} is not one of {allowed}"
    )


_CONVERTERS: dict[type[Any], Callable[[Any], Any]] = {
    int: _to_int,
    float: _to_float,
    Decimal: _to_decimal,
    str: _to_str,
    bool: _to_bool,
    dt.datetime: _from_iso(dt.datetime.fromisoformat),
    dt.date: _from_iso(dt.date.fromisoformat),
    dt.time: _from_iso(dt.time.fromisoformat),
    dt.timedelta: _to_timedelta,
    uuid.UUID: _to_uuid,
    bytes: _to_bytes,
}
