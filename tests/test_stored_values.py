"""What a value becomes in the database, the same on both backends: instants with an offset,
JSON ``null``, and NUMERIC scale (issue: values found by a new user)."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import REDIS_URL, WorkerFactory
from worker.client import UpdateClient
from worker.job.replies import Reply

metadata = sa.MetaData()
moments = sa.Table(
    "moments",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("at_tz", sa.DateTime(timezone=True)),
    sa.Column("at_naive", sa.DateTime),
    sa.Column("data", sa.JSON),
    sa.Column("price", sa.Numeric(10, 2)),
)


@pytest.fixture
async def client(
    engine: AsyncEngine, start_worker: WorkerFactory, prefix: str
) -> AsyncIterator[UpdateClient]:
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
        await connection.execute(moments.insert(), [{"id": 1, "data": {"a": 1}}])
    await start_worker()  # reflects `moments`
    async with UpdateClient(REDIS_URL, prefix=prefix) as made:
        yield made


async def send(client: UpdateClient, **job: Any) -> Reply:
    return await client.result(await client.submit({"table": "moments", **job}), timeout=10)


async def stored(engine: AsyncEngine, column: str) -> Any:
    async with engine.connect() as connection:
        return await connection.scalar(sa.select(moments.c[column]).where(moments.c.id == 1))


def instant(value: dt.datetime) -> dt.datetime:
    """A stored date-time as an instant: SQLite keeps no offset, and holds UTC."""
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


async def test_an_offset_is_converted_to_utc_on_both_backends(
    client: UpdateClient, engine: AsyncEngine
) -> None:
    """SQLite used to drop the offset (07:08:09 stored for 07:08:09+02:00, PostgreSQL 05:08:09)."""
    moment = "2024-05-06T07:08:09+02:00"
    reply = await send(client, key={"id": 1}, set={"at_tz": moment, "at_naive": moment})
    assert reply.status == "ok", reply
    utc = dt.datetime(2024, 5, 6, 5, 8, 9, tzinfo=dt.UTC)
    assert instant(await stored(engine, "at_tz")) == utc
    assert await stored(engine, "at_naive") == dt.datetime(2024, 5, 6, 5, 8, 9)  # UTC wall-clock


async def test_a_z_value_for_a_plain_timestamp_works_in_set_and_filter(
    client: UpdateClient, engine: AsyncEngine
) -> None:
    """On PostgreSQL this was data_error with asyncpg's text and no column name."""
    reply = await send(client, key={"id": 1}, set={"at_naive": "2024-01-01T00:00:00Z"})
    assert reply.status == "ok", reply
    found = await send(client, where={"at_naive": {"lt": "2024-01-01T00:30:00+00:30"}},
                       set={"price": 1})  # fmt: skip
    assert (found.status, found.rowcount) == ("ok", 0)  # 00:30+00:30 is 00:00 UTC: not before
    found = await send(client, where={"at_naive": {"lte": "2024-01-01T01:00:00+01:00"}},
                       set={"price": 1})  # fmt: skip
    assert (found.status, found.rowcount) == ("ok", 1)


async def test_json_null_sets_sql_null(client: UpdateClient, engine: AsyncEngine) -> None:
    """``null`` into a JSON column used to store the JSON value 'null', which IS NULL skips."""
    reply = await send(client, key={"id": 1}, set={"data": None})
    assert reply.status == "ok", reply
    async with engine.connect() as connection:
        is_null = await connection.scalar(sa.select(moments.c.data.is_(sa.null())))
    assert is_null
    again = await send(client, where={"data": None}, set={"data": {"b": [1, None]}})
    assert (again.status, again.rowcount) == ("ok", 1)
    assert await stored(engine, "data") == {"b": [1, None]}  # a null inside JSON stays JSON


async def test_numeric_is_rounded_to_the_column_scale_on_both_backends(
    client: UpdateClient, engine: AsyncEngine
) -> None:
    """SQLite stored 12.345 in a NUMERIC(10, 2) while the reply said 12.35."""
    reply = await send(client, key={"id": 1}, set={"price": "12.345"}, returning=["price"])
    assert reply.returning == [{"price": "12.35"}]
    async with engine.connect() as connection:
        text = await connection.scalar(sa.select(sa.cast(moments.c.price, sa.String)))
    assert Decimal(str(text)) == Decimal("12.35")
    rounded = await send(client, key={"id": 1}, inc={"price": -0.005}, returning=["price"])
    assert rounded.returning == [{"price": "12.34"}]  # the amount rounds to -0.01 first
    too_big = await send(client, key={"id": 1}, set={"price": "123456789"})
    assert too_big.error is not None
    assert too_big.error.code == "data_error"
    assert "moments.price" in too_big.error.message
    assert "NUMERIC(10, 2)" in too_big.error.message
