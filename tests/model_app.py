"""An application's own declarative models, for WORKER_MODELS=tests.model_app:Base.

``Note.updated_at`` has an ``onupdate=`` default and ``Note.tags`` a TypeDecorator; both must
apply to updates the worker makes.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

FIXED_NOW = dt.datetime(2030, 1, 2, 3, 4, 5)


class CommaSeparated(TypeDecorator[list[str]]):
    """A list of tags stored as one sorted, lower-cased, comma-separated string."""

    impl = sa.String(200)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> str | None:
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise TypeError("tags must be a list of strings")
        return ",".join(sorted(item.lower() for item in value))

    def process_result_value(self, value: str | None, dialect: sa.Dialect) -> list[str] | None:
        return None if value is None else value.split(",") if value else []


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(sa.String(200))
    tags: Mapped[list[str] | None] = mapped_column(CommaSeparated)
    updated_at: Mapped[dt.datetime | None] = mapped_column(onupdate=lambda: FIXED_NOW)
