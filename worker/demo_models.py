"""The seed tables as the ORM tutorial maps them, for ``update-worker demo``: ``User`` has a
validator (an age is never negative), so with ``WORKER_ORM=auto`` the demo's ORM-style job goes
through the unit of work, as the tutorial's ``session.commit()`` would; ``Book`` has no rule of
its own, so its set-based job stays a Core ``UPDATE``."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, validates


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None] = mapped_column(sa.String(100))
    age: Mapped[int | None]

    @validates("age")
    def _age(self, _key: str, value: Any) -> Any:
        if isinstance(value, int) and value < 0:
            raise ValueError("age must not be negative")
        return value


class Book(Base):
    __tablename__ = "books"

    book_id: Mapped[int] = mapped_column(primary_key=True)
    book_price: Mapped[Decimal | None] = mapped_column(sa.Numeric)
    genre: Mapped[str | None] = mapped_column(sa.String(50))
    book_name: Mapped[str | None] = mapped_column(sa.String(100))
