"""One exception tree for the worker.

Every reply error code of DESIGN.md §4 maps to exactly one class here, and :func:`classify`
is the single place where driver exceptions (SQLAlchemy, asyncpg, sqlite3, redis-py, OS) are
translated into that tree. Callers branch on the class, never on message text.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import redis.exceptions
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import exc as orm_exc

log = logging.getLogger(__name__)
T = TypeVar("T")


class WorkerError(Exception):
    """Base of every error that becomes an error reply."""

    code: ClassVar[str] = "internal"
    retryable: ClassVar[bool] = False
    #: Whether this verdict is stored in the ledger so a redelivery gets the same answer.
    #: Only verdicts about the job and its data are; a worker fault is not, and neither is a
    #: verdict that this worker's schema or settings decided (another worker, or this one
    #: after a restart, may decide otherwise): see Executor.reject.
    recorded: bool = True

    def __init__(self, message: str, *, recorded: bool | None = None) -> None:
        """``recorded=False`` marks one verdict as this worker's own (its settings decided it),
        not to be stored, whatever its class says."""
        super().__init__(message)
        self.message = message
        if recorded is not None:
            self.recorded = recorded


class InvalidJob(WorkerError):
    """The job is malformed or asks for something the contract does not allow."""

    code = "invalid_job"


class UnknownTable(InvalidJob):
    code = "unknown_table"


class UnknownColumn(InvalidJob):
    code = "unknown_column"


class ForbiddenColumn(InvalidJob):
    code = "forbidden_column"


class MissingFilter(InvalidJob):
    code = "missing_filter"


class ExpectationFailed(WorkerError):
    code = "expectation_failed"


class IdConflict(WorkerError):
    """The id was used before with a different payload."""

    code = "id_conflict"
    recorded = False  # the id already holds another verdict


class IntegrityViolation(WorkerError):
    code = "integrity_error"


class InvalidValue(WorkerError):
    """A value the column cannot take (failed coercion, or a database data exception)."""

    code = "data_error"


class JobTimeout(WorkerError):
    code = "timeout"


class Unavailable(WorkerError):
    """A transient fault: retried with backoff, and replied only once attempts run out."""

    code = "unavailable"
    retryable = True
    recorded = False

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message, recorded=False)
        self.reason = reason


class InternalError(WorkerError):
    """A fault of the worker itself. Not recorded, so a fixed worker can run the job again."""

    code = "internal"
    recorded = False


class Fenced(Exception):
    """This worker no longer owns these partitions: a newer owner raised their generation.

    Not a WorkerError, because it is never a reply: nothing was applied, and the new owner
    answers the entries (from the ledger, where this worker had committed them before)."""

    def __init__(self, partitions: list[int]) -> None:
        self.message = f"fenced out of partition(s) {partitions}: a newer owner took over"
        super().__init__(self.message)
        self.partitions = partitions


class SettingsError(Exception):
    """A bad setting. The message is one line that names the variable or flag."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long to wait before the next try of a transient failure: full-jitter exponential.

    The n-th consecutive failure waits a random time up to ``base_s * 2**(n-1)``, capped at
    ``cap_s``, so workers that failed together do not retry together.
    """

    base_s: float
    cap_s: float

    def delay(self, failures: int) -> float:
        ceiling = min(self.cap_s, self.base_s * 2 ** max(failures - 1, 0))
        return random.uniform(0, ceiling)  # noqa: S311 - jitter, not cryptography


#: Database transactions: deadlocks and busy locks clear in milliseconds.
DATABASE_BACKOFF = Backoff(base_s=0.02, cap_s=2.0)
#: Redis commands: a restarting server needs about a second.
REDIS_BACKOFF = Backoff(base_s=0.1, cap_s=2.0)


async def retry_transient(
    action: Callable[[], Awaitable[T]],
    *,
    attempts: int,
    backoff: Backoff,
    what: str,
    retried: Callable[[str], None] = lambda _reason: None,
) -> T:
    """Await ``action()``, trying again while it fails with a transient error.

    A permanent error, or the last transient one, propagates unchanged. ``retried(reason)``
    is told about each retry.
    """
    failures = 0
    while True:
        try:
            return await action()
        except Exception as error:
            failures += 1
            verdict = classify(error)
            if not verdict.retryable or failures >= attempts:
                raise
            retried(getattr(verdict, "reason", verdict.code))
            log.warning("%s failed (%s), try %d of %d; retrying", what, error, failures, attempts)
        await asyncio.sleep(backoff.delay(failures))


# SQLSTATE codes (PostgreSQL appendix A) that mean "try again".
_TRANSIENT_SQLSTATES = {
    "40P01": "deadlock",
    "40001": "serialization_failure",
    "57P01": "admin_shutdown",
    "57P02": "crash_shutdown",
    "57P03": "cannot_connect_now",
    "55P03": "lock_not_available",
}
_SQLITE_BUSY_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}


def classify(error: BaseException) -> WorkerError:
    """Translate any exception raised while running a job into the worker's error tree."""
    if isinstance(error, WorkerError):
        return error
    if isinstance(error, sa_exc.DBAPIError):
        return _classify_dbapi(error)
    if isinstance(error, orm_exc.StaleDataError):
        # A version counter (version_id_col) saw another writer change the row: load again.
        return Unavailable(f"the row changed meanwhile: {_first_line(error)}", reason="stale_data")
    if isinstance(error, sa_exc.StatementError):
        # Raised before the driver saw the statement: a bind processor (a TypeDecorator,
        # a type's own conversion) refused a value.
        return InvalidValue(f"value rejected: {_first_line(error.orig or error)}")
    if isinstance(error, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return Unavailable(f"redis: {_first_line(error)}", reason="redis_connection")
    if _redis_failing_over(error):
        return Unavailable(f"redis: {_first_line(error)}", reason="redis_failover")
    if isinstance(error, asyncio.TimeoutError | TimeoutError):
        return JobTimeout("the job did not finish in time")
    if isinstance(error, OSError):
        # ConnectionRefusedError and friends, raised by a driver's connect before it wraps them.
        return Unavailable(f"connection failed: {_first_line(error)}", reason="connection")
    return InternalError(f"{type(error).__name__}: {_first_line(error)}")


#: Replies of a Redis whose primary is changing (a failover, a resharding): each passes once
#: the cluster or Sentinel has settled. redis-py raises some as classes of their own.
_FAILOVER_ERRORS = (
    redis.exceptions.MovedError,
    redis.exceptions.AskError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.MasterDownError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.BusyLoadingError,
)
_FAILOVER_PREFIXES = ("UNBLOCKED", "READONLY", "MASTERDOWN", "LOADING", "TRYAGAIN", "CLUSTERDOWN")


def _redis_failing_over(error: BaseException) -> bool:
    if isinstance(error, _FAILOVER_ERRORS):
        return True
    return isinstance(error, redis.exceptions.ResponseError) and str(error).startswith(
        _FAILOVER_PREFIXES
    )


def _classify_dbapi(error: sa_exc.DBAPIError) -> WorkerError:
    message = _first_line(error.orig or error)
    if error.connection_invalidated:
        return Unavailable(f"database connection lost: {message}", reason="connection")
    sqlstate = _sqlstate(error)
    if sqlstate in _TRANSIENT_SQLSTATES:
        return Unavailable(message, reason=_TRANSIENT_SQLSTATES[sqlstate])
    if sqlstate is not None:
        if sqlstate.startswith("08"):
            return Unavailable(message, reason="connection")
        if sqlstate == "57014":
            return JobTimeout(f"statement cancelled: {message}")
        if sqlstate.startswith("23"):
            return IntegrityViolation(message)
        if sqlstate.startswith("22"):
            return InvalidValue(message)
    if _sqlite_code(error) in _SQLITE_BUSY_CODES or "database is locked" in message:
        return Unavailable(message, reason="sqlite_busy")
    if isinstance(error, sa_exc.IntegrityError):
        return IntegrityViolation(message)
    if isinstance(error, sa_exc.DataError):
        return InvalidValue(message)
    if isinstance(error.orig, OSError | ConnectionError):
        return Unavailable(message, reason="connection")
    return InternalError(f"database error: {message}")


def _sqlstate(error: sa_exc.DBAPIError) -> str | None:
    # asyncpg errors reach us as SQLAlchemy's adapted DBAPI error, whose ``sqlstate``
    # attribute (or the original asyncpg exception's) carries the code; a deadlock is a
    # plain DBAPIError, so the code is the only reliable signal.
    for candidate in (error.orig, getattr(error.orig, "__cause__", None)):
        code = getattr(candidate, "sqlstate", None)
        if isinstance(code, str):
            return code
    return None


def _sqlite_code(error: sa_exc.DBAPIError) -> int | None:
    code = getattr(error.orig, "sqlite_errorcode", None)
    # Extended result codes (SQLITE_BUSY_SNAPSHOT = 517, ...) keep the primary code in the low byte.
    return code & 0xFF if isinstance(code, int) else None


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:500]
