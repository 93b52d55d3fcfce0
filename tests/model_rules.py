"""Models with rules only the unit of work enforces, for WORKER_MODELS=tests.model_rules:Base:
a ``@validates`` validator, ``before_update`` and ``after_update`` mapper events, a version
counter, an ``onupdate=`` default, a TypeDecorator and a hybrid property. ``Plain`` has none
of them (so ``WORKER_ORM=auto`` keeps it on the Core path)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.hybrid import hybrid_property
from sqlalchemy.orm import DeclarativeBase, Mapped, Mapper, mapped_column, validates

from tests.model_app import FIXED_NOW, CommaSeparated

TOUCHED_BY = "update-worker"


class Base(DeclarativeBase):
    pass


class Member(Base):
    __tablename__ = "members"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(100))
    age: Mapped[int]
    touched_by: Mapped[str | None] = mapped_column(sa.String(50))
    tags: Mapped[list[str] | None] = mapped_column(CommaSeparated)
    updated_at: Mapped[dt.datetime | None] = mapped_column(onupdate=lambda: FIXED_NOW)
    version: Mapped[int] = mapped_column(nullable=False)
    __mapper_args__ = {"version_id_col": version}  # noqa: RUF012 - SQLAlchemy's own form

    @validates("age")
    def _age(self, _key: str, value: Any) -> Any:
        if isinstance(value, int) and value < 0:
            raise ValueError("age must not be negative")
        return value

    @hybrid_property
    def adult(self) -> bool:
        return self.age >= 18


audit = sa.Table(
    "member_audit",
    Base.metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("member_id", sa.Integer, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
)


class Plain(Base):
    __tablename__ = "plains"

    id: Mapped[int] = mapped_column(primary_key=True)
    n: Mapped[int]


@event.listens_for(Member, "before_update")
def _touch(_mapper: Mapper[Any], _connection: sa.Connection, target: Member) -> None:
    target.touched_by = TOUCHED_BY


@event.listens_for(Member, "after_update")
def _audit(_mapper: Mapper[Any], connection: sa.Connection, target: Member) -> None:
    connection.execute(audit.insert().values(member_id=target.id, version=target.version))
