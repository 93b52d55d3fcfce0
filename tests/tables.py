"""The test database: the seed tutorials' tables plus ``items``, which has one column per type."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from worker.demo import seed, seed_metadata

test_metadata = sa.MetaData()
items = sa.Table(
    "items",
    test_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(50), nullable=False),
    sa.Column("qty", sa.Integer, nullable=False),
    sa.Column("price", sa.Numeric(10, 2)),
    sa.Column("weight", sa.Float),
    sa.Column("active", sa.Boolean),
    sa.Column("tag", sa.String(20)),
    sa.Column("born", sa.Date),
    sa.Column("seen_at", sa.DateTime),
)
ITEMS: Final[list[dict[str, Any]]] = [
    {"id": 1, "name": "Apple", "qty": 10, "price": Decimal("1.50"), "weight": 0.2, "active": True,
     "tag": "fruit", "born": dt.date(2024, 1, 1), "seen_at": dt.datetime(2024, 1, 1, 8, 0)},
    {"id": 2, "name": "apricot", "qty": 0, "price": Decimal("2.25"), "weight": 0.1, "active": False,
     "tag": None, "born": dt.date(2024, 2, 1), "seen_at": dt.datetime(2024, 2, 1, 9, 30)},
    {"id": 3, "name": "Banana", "qty": 25, "price": Decimal("0.99"), "weight": 0.3, "active": True,
     "tag": "fruit", "born": dt.date(2024, 3, 1), "seen_at": None},
    {"id": 4, "name": "Carrot", "qty": 5, "price": None, "weight": None, "active": None,
     "tag": "veg", "born": None, "seen_at": dt.datetime(2024, 4, 1, 12, 0)},
]  # fmt: skip


async def seed_all(connection: AsyncConnection) -> None:
    await seed(connection)
    await connection.run_sync(test_metadata.drop_all)
    await connection.run_sync(test_metadata.create_all)
    await connection.execute(items.insert(), ITEMS)


__all__ = ["ITEMS", "items", "seed_all", "seed_metadata", "test_metadata"]
