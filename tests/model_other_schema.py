"""Models with a table in another PostgreSQL schema, for WORKER_MODELS (README: Security)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Thing(Base):
    __tablename__ = "things"
    __table_args__ = {"schema": "other"}  # noqa: RUF012 - SQLAlchemy's declarative form

    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(sa.String(50))
