"""JSON values into column types, and database values back into JSON."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

from worker.errors import InvalidValue
from worker.job.values import coerce, to_json

table = sa.Table(
    "t",
    sa.MetaData(),
    sa.Column("i", sa.Integer),
    sa.Column("n", sa.Numeric(10, 2)),
    sa.Column("f", sa.Float),
    sa.Column("s", sa.String),
    sa.Column("b", sa.Boolean),
    sa.Column("d", sa.Date),
    sa.Column("ts", sa.DateTime),
    sa.Column("tz", sa.DateTime(timezone=True)),
    sa.Column("tm", sa.Time),
    sa.Column("u", sa.Uuid),
    sa.Column("j", sa.JSON),
    sa.Column("bin", sa.LargeBinary),
)


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("i", 3, 3),
        ("i", 3.0, 3),
        ("n", "12.20", Decimal("12.20")),
        ("n", 12.2, Decimal("12.2")),
        ("n", 7, Decimal(7)),
        ("f", 2, 2.0),
        ("s", "x'; DROP TABLE t; --", "x'; DROP TABLE t; --"),
        ("b", True, True),
        ("d", "2024-02-29", dt.date(2024, 2, 29)),
        # A column without a time zone takes the UTC wall-clock time of a value with an offset.
        ("ts", "2024-02-29T10:11:12Z", dt.datetime(2024, 2, 29, 10, 11, 12)),
        ("ts", "2024-02-29T12:11:12+02:00", dt.datetime(2024, 2, 29, 10, 11, 12)),
        ("tz", "2024-02-29T12:11:12+02:00", dt.datetime(2024, 2, 29, 10, 11, 12, tzinfo=dt.UTC)),
        ("tz", "2024-02-29T10:11:12", dt.datetime(2024, 2, 29, 10, 11, 12, tzinfo=dt.UTC)),
        ("n", "12.345", Decimal("12.35")),
        ("n", "-0.005", Decimal("-0.01")),
        ("tm", "10:11", dt.time(10, 11)),
        (
            "u",
            "12345678-1234-5678-1234-567812345678",
            uuid.UUID("12345678-1234-5678-1234-567812345678"),
        ),
        ("j", {"a": [1, 2]}, {"a": [1, 2]}),
        ("bin", "aGk=", b"hi"),
        ("i", None, None),
    ],
)
def test_coerce_to_the_column_type(column: str, value: Any, expected: Any) -> None:
    assert coerce(table.c[column], value) == expected


@pytest.mark.parametrize(
    ("column", "value"),
    [("i", "3"), ("i", True), ("i", 1.5), ("n", "abc"), ("n", "NaN"), ("s", 5), ("b", 1),
     ("d", "yesterday"), ("u", "not-a-uuid"), ("bin", "***")],
)  # fmt: skip
def test_values_that_cannot_be_coerced_are_data_errors_naming_the_column(
    column: str, value: Any
) -> None:
    with pytest.raises(InvalidValue, match=rf"column `t\.{column}`") as caught:
        coerce(table.c[column], value)
    assert caught.value.code == "data_error"


def test_to_json_is_exact_and_backend_neutral() -> None:
    row = {
        "sqlite_numeric": Decimal("12.2000000000"),
        "pg_numeric": Decimal("12.2"),
        "hundred": Decimal("100.0000000000"),
        "zero": Decimal("0E-10"),
        "date": dt.date(2024, 1, 2),
        "ts": dt.datetime(2024, 1, 2, 3, 4, 5),
        "uuid": uuid.UUID(int=1),
        "bytes": b"\x00\x01",
        "nested": {"a": [Decimal("1.50")]},
    }
    assert to_json(row) == {
        "sqlite_numeric": "12.2",
        "pg_numeric": "12.2",
        "hundred": "100",
        "zero": "0",
        "date": "2024-01-02",
        "ts": "2024-01-02T03:04:05",
        "uuid": "00000000-0000-0000-0000-000000000001",
        "bytes": "AAE=",
        "nested": {"a": ["1.5"]},
    }
