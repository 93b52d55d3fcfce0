"""The benchmark's table as an application would map it, with one rule that only the unit of
work enforces (a validator): ``WORKER_MODELS=bench.models:Base`` with ``WORKER_ORM=always``
measures the unit-of-work path against the Core path on the same job."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, validates


class Base(DeclarativeBase):
    pass


class Counter(Base):
    __tablename__ = "counters"

    id: Mapped[int] = mapped_column(primary_key=True)
    n: Mapped[int]

    @validates("n")
    def _n(self, _key: str, value: Any) -> Any:
        if isinstance(value, int) and value < 0:
            raise ValueError("n must not be negative")
        return value
