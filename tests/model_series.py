"""The ordering test's tables as mapped classes with a validator each, so that
``WORKER_MODELS=tests.model_series:Base`` with ``WORKER_ORM=always`` runs the ordering test
through the unit of work (tests/test_orm.py)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, validates


class Base(DeclarativeBase):
    pass


def _not_negative(value: Any) -> Any:
    if isinstance(value, int) and value < 0:
        raise ValueError("x must not be negative")
    return value


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    x: Mapped[int]

    @validates("x")
    def _x(self, _key: str, value: Any) -> Any:
        return _not_negative(value)


class Shared(Base):
    __tablename__ = "shared"

    id: Mapped[int] = mapped_column(primary_key=True)
    x: Mapped[int]

    @validates("x")
    def _x(self, _key: str, value: Any) -> Any:
        return _not_negative(value)
