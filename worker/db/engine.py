"""The database engine: pool, per-connection timeouts, and SQLite's pragmas.

Tuned for short write transactions; only this module, the executor, the ledger and the schema
loader touch the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

#: Execution option marking the executor's connections, whose SQLite transactions write.
WRITES: Final = "update_worker_writes"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-connection limits, so no transaction waits or idles forever. 0 turns one off."""

    statement_ms: int = 30_000
    lock_ms: int = 5_000
    idle_in_transaction_ms: int = 60_000


def create_engine(
    database_url: str, *, pool_size: int, timeouts: Timeouts | None = None
) -> AsyncEngine:
    """The engine for ``database_url``, tuned for short write transactions.

    No ``pool_pre_ping``: it would double the round trips of every job. A dropped connection
    instead surfaces as a disconnect, which invalidates the whole pool and which
    :func:`classify` treats as transient, so the job is retried on a fresh connection.
    """
    timeouts = timeouts or Timeouts()
    connect_args: dict[str, Any] = {}
    if database_url.startswith("postgresql"):
        # Sent in the startup packet: no extra round trip, and they hold for every transaction.
        connect_args["server_settings"] = {
            "statement_timeout": str(timeouts.statement_ms),
            "lock_timeout": str(timeouts.lock_ms),
            "idle_in_transaction_session_timeout": str(timeouts.idle_in_transaction_ms),
            # Prepared statements keep a generic plan once one looks as good as the first few
            # custom ones: a ledger lookup first planned while the ledger was small stayed a
            # sequential scan as it grew (most of PostgreSQL's CPU in a long drain). Custom
            # plans follow the tables' size; planning these short statements costs little.
            "plan_cache_mode": "force_custom_plan",
        }
    pooling: dict[str, Any] = {"pool_size": pool_size, "max_overflow": 2}
    if make_url(database_url).database in (None, "", ":memory:"):
        pooling = {}  # in-memory SQLite: one shared connection (StaticPool), no pool to size
    engine = create_async_engine(database_url, connect_args=connect_args, **pooling)
    if engine.dialect.name == "sqlite":
        _tune_sqlite(engine, busy_timeout_ms=timeouts.lock_ms)
    return engine


def _tune_sqlite(engine: AsyncEngine, *, busy_timeout_ms: int) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the driver so BEGIN IMMEDIATE below is ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            "PRAGMA journal_mode=WAL",
            f"PRAGMA busy_timeout={int(busy_timeout_ms)}",
            "PRAGMA foreign_keys=ON",
            # PostgreSQL's LIKE is case-sensitive; SQLite's is not by default. Same job, same rows.
            "PRAGMA case_sensitive_like=ON",
        ):
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(connection: Any) -> None:
        # Jobs take the write lock up front: a deferred transaction that upgrades later can
        # fail with SQLITE_BUSY at once, without waiting out busy_timeout. Everything else
        # (start-up reflection, checks) only reads, so it must not queue behind writers.
        writes = connection.get_execution_options().get(WRITES, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")
